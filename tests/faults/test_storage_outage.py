"""S3 unavailable at the worst moments of a checkpoint: while its files upload, and at the
commit (the manifest write). A real SeaweedFS server is stopped exactly there and started
again; a real one-rank DeepSpeed engine saves and resumes.

tests/checkpoint/test_manager.py covers an outage that starts before a save and ends within
the retry budget. Here: outages that begin mid-save, outages that outlast the budget (bounded
retries, then a clear error; the half-written checkpoint is never taken as complete and the
committed one before it still restores the same weights), and an outage during resume (an
error, never "no checkpoint, start over").
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from kubetune.artifacts.checkpoint import MANIFEST, CheckpointManager, RetryPolicy
from kubetune.artifacts.storage import StorageError, open_store

PATIENT = RetryPolicy(attempts=8, first_delay=0.25)  # ~32 s: outlasts a server restart
IMPATIENT = RetryPolicy(attempts=3, first_delay=0.2)  # gives up after ~0.6 s


def uri(tmp_path) -> str:
    return f"s3://checkpoints/{tmp_path.name}"


def manager(tmp_path, retry: RetryPolicy, node: str = "node-a") -> CheckpointManager:
    # One location per test (tmp_path is unique): the server is shared by the module.
    return CheckpointManager(uri(tmp_path), keep=3, local_dir=tmp_path / node, rank=0, world_size=1, retry=retry)


def stop_s3_before(mgr: CheckpointManager, server, method: str, key_prefix: str, restart: bool) -> list[threading.Thread]:
    """Stop the server just before the first `method` call on a key under key_prefix (uploads
    run in threads: the others wait until it is down); with restart, start it again in the
    background right away (that takes a moment)."""
    original = getattr(mgr.store, method)
    lock = threading.Lock()
    restarts: list[threading.Thread] = []
    fired = []

    def call(*args, **kwargs):
        key = args[1] if method == "put_file" else args[0]
        with lock:
            if key.startswith(key_prefix) and not fired:
                fired.append(key)
                server.stop()
                if restart:
                    restarts.append(threading.Thread(target=server.start))
                    restarts[0].start()
        return original(*args, **kwargs)

    setattr(mgr.store, method, call)
    return restarts


INJECTION_POINTS = {
    # the first DeepSpeed file of the checkpoint / the commit marker written after all files
    "data-upload": ("put_file", "step-000000004/"),
    "commit": ("put_bytes", f"step-000000004/{MANIFEST}"),
}


def test_outage_at_commit_is_retried_until_the_server_is_back(outage_s3, make_engine, train, snapshot, tmp_path, caplog):
    engine = make_engine()
    mgr = manager(tmp_path, PATIENT)
    train(engine, 2)
    mgr.save(engine, 2, {"step": 2})
    train(engine, 2)
    restarts = stop_s3_before(mgr, outage_s3, *INJECTION_POINTS["commit"], restart=True)

    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        assert mgr.save(engine, 4, {"step": 4}) == "step-000000004"
    restarts[0].join()

    assert "failed (attempt 1 of 8), retrying" in caplog.text  # the outage really hit the save
    assert mgr.checkpoints() == ["step-000000004", "step-000000002"]
    weights = snapshot(engine)
    fresh = make_engine(seed=5)
    assert manager(tmp_path, PATIENT, node="node-b").resume(fresh) == {"step": 4}
    assert all(torch.equal(weights[k], v) for k, v in snapshot(fresh).items())


@pytest.mark.parametrize("point", INJECTION_POINTS)
def test_outage_longer_than_the_retries_loses_only_the_unfinished_checkpoint(point, outage_s3, make_engine, train, snapshot, tmp_path):
    engine = make_engine()
    mgr = manager(tmp_path, IMPATIENT)
    train(engine, 2)
    mgr.save(engine, 2, {"step": 2})
    committed = snapshot(engine)
    train(engine, 2)
    method, prefix = INJECTION_POINTS[point]
    stop_s3_before(mgr, outage_s3, method, prefix, restart=False)

    with pytest.raises(StorageError, match=r"^checkpoint step-000000004 was not committed: .*failed after 3 attempts"):
        mgr.save(engine, 4, {"step": 4})

    outage_s3.start()
    stored = {o.key for o in open_store(uri(tmp_path)).list("step-000000004/")}
    assert f"step-000000004/{MANIFEST}" not in stored
    if point == "commit":
        assert stored, "every data file was uploaded; only the commit marker is missing"
    restarted = manager(tmp_path, PATIENT, node="node-b")
    assert restarted.latest() == "step-000000002"
    if stored:
        assert restarted.verify("step-000000004") == (None, "incomplete: no manifest.json (the upload did not finish)")
    # Nothing committed is lost: a restarted worker gets exactly the step-2 weights back...
    fresh = make_engine(seed=5)
    assert restarted.resume(fresh) == {"step": 2}
    assert all(torch.equal(committed[k], v) for k, v in snapshot(fresh).items())
    # ...and its next save of step 4 replaces the half-written one.
    train(fresh, 2)
    assert restarted.save(fresh, 4, {"step": 4}) == "step-000000004"
    assert restarted.checkpoints() == ["step-000000004", "step-000000002"]


def test_outage_during_resume_is_an_error_not_a_fresh_start(outage_s3, make_engine, train, tmp_path):
    engine = make_engine()
    mgr = manager(tmp_path, IMPATIENT)
    train(engine, 1)
    mgr.save(engine, 1, {"step": 1})
    outage_s3.stop()
    # Returning None here would make the trainer start over and later rotate away the good
    # checkpoints; it must fail (the trainer exits STORAGE_ERROR and the pod is retried).
    with pytest.raises(StorageError, match=rf"^listing {uri(tmp_path)} failed after 3 attempts"):
        manager(tmp_path, IMPATIENT, node="node-b").resume(make_engine(seed=5))
    outage_s3.start()
    assert manager(tmp_path, IMPATIENT, node="node-c").latest() == "step-000000001"
