"""CheckpointManager with a real in-process DeepSpeed engine (one rank) against a real
SeaweedFS S3 server (real credentials) and against file:// folders."""

from __future__ import annotations

import json
import logging
import threading
import uuid

import pytest
import torch

from kubetune.artifacts.checkpoint import CheckpointManager, NoUsableCheckpoint, RetryPolicy
from kubetune.artifacts.embedded_s3 import SeaweedS3
from kubetune.artifacts.storage import StorageError, open_store, sha256_file

FAST_RETRY = RetryPolicy(attempts=2, first_delay=0.1)


@pytest.fixture(params=["s3", "file"])
def ckpt_uri(request, tmp_path):
    if request.param == "s3":
        request.getfixturevalue("s3_env")
        return f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/checkpoints"


def manager(uri, tmp_path, keep=3, node="node-a", **kw) -> CheckpointManager:
    return CheckpointManager(uri, keep=keep, local_dir=tmp_path / node, rank=0, world_size=1, retry=FAST_RETRY, **kw)


def test_save_commits_a_manifest_listing_every_file(make_engine, train, ckpt_uri, tmp_path):
    engine = make_engine(stage=2)
    train(engine, 1)
    mgr = manager(ckpt_uri, tmp_path)
    assert mgr.latest() is None

    name = mgr.save(engine, 1, {"step": 1, "epoch": 0.25, "position": [3, 1]})

    assert name == "step-000000001" and mgr.latest() == name
    store = open_store(ckpt_uri)
    stored = {o.key: o.size for o in store.list(name + "/")}
    manifest = json.loads(store.get_bytes(f"{name}/manifest.json"))
    listed = {f["path"]: f for f in manifest["files"]}
    assert {f"{name}/{p}" for p in listed} | {f"{name}/manifest.json"} == set(stored)
    assert "rng/rank-00000.pt" in listed and any(p.endswith("optim_states.pt") for p in listed)
    for path, entry in listed.items():
        assert entry["size"] == stored[f"{name}/{path}"]
        assert entry["sha256"] == sha256_file(tmp_path / "node-a" / name / path)
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == 2 and manifest["step"] == 1
    assert manifest["client_state"] == {"step": 1, "epoch": 0.25, "position": [3, 1]}


def test_load_restores_weights_optimizer_scheduler_and_rng(make_engine, train, snapshot, tmp_path):
    uri = f"file://{tmp_path}/ck"
    engine = make_engine(stage=2)
    train(engine, 2)
    mgr = manager(uri, tmp_path)
    mgr.save(engine, 2, {"step": 2})
    saved, lr = snapshot(engine), engine.get_lr()
    train(engine, 1)  # data and dropout come from the global RNG
    after_three = snapshot(engine)

    # A fresh engine (other seed, so other weights and RNG) on a fresh "node" (empty local
    # dir): everything comes from storage.
    fresh = make_engine(stage=2, seed=99)
    restarted = manager(uri, tmp_path, node="node-b")
    assert restarted.load(fresh, restarted.latest()) == {"step": 2}
    assert restarted.loaded == "step-000000002"
    assert all(torch.equal(saved[k], v) for k, v in snapshot(fresh).items())
    assert fresh.get_lr() == lr
    # Same weights, Adam moments, schedule and RNG: the next step is bit-identical.
    train(fresh, 1)
    assert all(torch.equal(after_three[k], v) for k, v in snapshot(fresh).items())


def test_rotation_keeps_newest_and_deletes_leftovers(make_engine, train, ckpt_uri, tmp_path):
    engine = make_engine()
    store = open_store(ckpt_uri)
    store.put_bytes("step-000000001/mp_rank_00_model_states.pt", b"half an upload")  # killed run
    store.put_bytes("step-000000009/mp_rank_00_model_states.pt", b"newer, in progress")
    mgr = manager(ckpt_uri, tmp_path, keep=2)
    for step in (2, 3, 4):
        train(engine, 1)
        mgr.save(engine, step, {"step": step})

    names = {o.key.split("/")[0] for o in store.list()}
    assert names == {"step-000000003", "step-000000004", "step-000000009"}
    assert mgr.checkpoints() == ["step-000000004", "step-000000003"]
    # Only the newest checkpoint stays on the local disk.
    assert sorted(p.name for p in (tmp_path / "node-a").iterdir()) == ["step-000000004"]


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda s, n: s.delete([f"{n}/manifest.json"]), "incomplete: no manifest.json"),
        (lambda s, n: s.put_bytes(f"{n}/manifest.json", b"{truncated"), "manifest.json is not valid JSON"),
        (lambda s, n: s.delete([f"{n}/rng/rank-00000.pt"]), "rng/rank-00000.pt is listed in manifest.json but missing"),
        (lambda s, n: s.put_bytes(f"{n}/mp_rank_00_model_states.pt", b"short"), "mp_rank_00_model_states.pt has 5 bytes in storage"),
    ],
    ids=["no-manifest", "bad-manifest", "missing-file", "wrong-size"],
)
def test_latest_skips_broken_checkpoints_with_reason(make_engine, train, s3_env, tmp_path, caplog, damage, reason):
    uri = f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    engine = make_engine()
    mgr = manager(uri, tmp_path)
    mgr.save(engine, 1, {"step": 1})
    train(engine, 1)
    mgr.save(engine, 2, {"step": 2})
    damage(open_store(uri), "step-000000002")

    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        assert mgr.latest() == "step-000000001"
    assert f"skipping checkpoint {uri}/step-000000002: {reason}" in caplog.text


def test_checksum_mismatch_falls_back_to_previous(make_engine, train, snapshot, s3_env, tmp_path, caplog):
    uri = f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    engine = make_engine()
    mgr = manager(uri, tmp_path)
    mgr.save(engine, 1, {"step": 1})
    first = snapshot(engine)
    train(engine, 1)
    mgr.save(engine, 2, {"step": 2})
    # Same size, different bytes: only the checksum can tell.
    store = open_store(uri)
    raw = bytearray(store.get_bytes("step-000000002/mp_rank_00_model_states.pt"))
    raw[-100] ^= 0xFF
    store.put_bytes("step-000000002/mp_rank_00_model_states.pt", bytes(raw))

    restarted = manager(uri, tmp_path, node="node-b")
    fresh = make_engine(seed=5)
    assert restarted.latest() == "step-000000002"  # sizes still match
    with caplog.at_level(logging.WARNING, logger="kubetune.checkpoint"):
        assert restarted.load(fresh, "step-000000002") == {"step": 1}
    assert restarted.loaded == "step-000000001"
    assert "skipping checkpoint" in caplog.text and "step-000000002: checksum mismatch: mp_rank_00_model_states.pt" in caplog.text
    assert all(torch.equal(first[k], v) for k, v in snapshot(fresh).items())
    assert restarted.latest() == "step-000000001"

    # Nothing usable left: a clear error, and resume() starts over.
    store.put_bytes("step-000000001/mp_rank_00_model_states.pt", bytes(raw))
    with pytest.raises(NoUsableCheckpoint, match="no checkpoint .* passed its checksums"):
        manager(uri, tmp_path, node="node-c").load(fresh, "step-000000001")
    assert manager(uri, tmp_path, node="node-d").resume(fresh) is None


def test_short_storage_outage_is_retried(make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_S3_MAX_ATTEMPTS", "1")  # no boto3 retries: ours must carry it
    with SeaweedS3(tmp_path / "s3", buckets=("checkpoints",)) as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        engine = make_engine()
        mgr = CheckpointManager("s3://checkpoints/outage", keep=2, local_dir=tmp_path / "local", rank=0, world_size=1, retry=RetryPolicy(attempts=6, first_delay=1.0))
        server.stop()
        restart = threading.Timer(2.0, server.start)
        restart.start()
        try:
            assert mgr.save(engine, 1, {"step": 1}) == "step-000000001"
        finally:
            restart.join()
        assert mgr.latest() == "step-000000001"

        server.stop()
        give_up = CheckpointManager("s3://checkpoints/outage", keep=2, local_dir=tmp_path / "local", rank=0, world_size=1, retry=FAST_RETRY)
        with pytest.raises(StorageError, match="checkpoint step-000000002 could not be started: .*failed after 2 attempts"):
            give_up.save(engine, 2, {"step": 2})
        server.start()
        assert mgr.latest() == "step-000000001"


def test_large_files_upload_in_parts(s3_env, tmp_path):
    from boto3.s3.transfer import TransferConfig

    store = open_store("s3://checkpoints/multipart")
    store.transfer = TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20, max_concurrency=4)
    big = tmp_path / "big.pt"
    big.write_bytes(bytes(range(256)) * (12 * 2**20 // 256))
    store.put_file(big, "step-000000001/big.pt")
    head = store.client.head_object(Bucket="checkpoints", Key="multipart/step-000000001/big.pt")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: 3 parts of 5 MiB


class Recorded:
    """A store that records its writes; put_file waits for `gate` (an upload that takes a while)
    and raises `fail` for keys starting with `fail_prefix` (an upload that fails)."""

    def __init__(self, inner, gate: threading.Event | None = None, fail_prefix: str | None = None):
        self.inner, self.gate, self.fail_prefix, self.writes = inner, gate, fail_prefix, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_file(self, local, key):
        if self.gate is not None:
            self.gate.wait()
        if self.fail_prefix and key.startswith(self.fail_prefix):
            raise StorageError(f"injected failure uploading {key}")
        self.inner.put_file(local, key)
        self.writes.append(key)

    def put_bytes(self, key, data, if_absent=False):
        self.inner.put_bytes(key, data, if_absent)
        self.writes.append(key)


def test_training_goes_on_while_the_checkpoint_uploads(make_engine, train, snapshot, ckpt_uri, tmp_path):
    engine = make_engine(stage=2)
    train(engine, 1)
    gate = threading.Event()
    mgr = manager(ckpt_uri, tmp_path, store=Recorded(open_store(ckpt_uri), gate))

    name = mgr.save(engine, 1, {"step": 1}, wait=False)
    saved = snapshot(engine)
    # Returned with the upload still held back: not committed, so not a checkpoint yet.
    assert mgr.uploading and mgr.committed is None and mgr.latest() is None
    train(engine, 2)  # the training changes the weights while the upload is in flight
    gate.set()
    assert mgr.wait() == name == mgr.committed == mgr.latest()
    assert not mgr.uploading and mgr.committed_time

    # What was committed is the state at save time, not the state trained since.
    fresh = make_engine(stage=2, seed=9)
    assert manager(ckpt_uri, tmp_path, node="node-b").load(fresh, name) == {"step": 1}
    assert all(torch.equal(saved[k], v) for k, v in snapshot(fresh).items())


def test_at_most_one_upload_in_flight(make_engine, train, tmp_path):
    uri = f"file://{tmp_path}/ck"
    engine = make_engine()
    gate = threading.Event()
    store = Recorded(open_store(uri), gate)
    mgr = manager(uri, tmp_path, store=store)
    mgr.save(engine, 1, {"step": 1}, wait=False)
    train(engine, 1)

    second = threading.Thread(target=mgr.save, args=(engine, 2, {"step": 2}), kwargs={"wait": False})
    second.start()
    second.join(timeout=3)
    # The next save waits for the upload in flight before it writes anything.
    assert second.is_alive() and not (tmp_path / "node-a" / "step-000000002").exists() and store.writes == []
    gate.set()
    second.join()
    mgr.wait()
    first_of_second = min(i for i, key in enumerate(store.writes) if key.startswith("step-000000002/"))
    assert store.writes.index("step-000000001/manifest.json") < first_of_second
    assert store.writes[-1] == "step-000000002/manifest.json"
    assert mgr.checkpoints() == ["step-000000002", "step-000000001"]


def test_a_failed_background_upload_is_raised_by_the_next_save(make_engine, train, tmp_path):
    uri = f"file://{tmp_path}/ck"
    engine = make_engine()
    mgr = manager(uri, tmp_path, store=Recorded(open_store(uri), fail_prefix="step-000000002/"))
    mgr.save(engine, 1, {"step": 1}, wait=False)
    train(engine, 1)
    assert mgr.save(engine, 2, {"step": 2}, wait=False) == "step-000000002"  # the failure comes later
    train(engine, 1)
    with pytest.raises(StorageError, match=r"^checkpoint step-000000002 was not committed: rank 0: .*injected failure"):
        mgr.save(engine, 3, {"step": 3})
    assert mgr.committed == "step-000000001" and mgr.checkpoints() == ["step-000000001"]
    assert not (tmp_path / "node-a" / "step-000000003").exists()  # the failed save stopped the next one
    mgr.wait()  # the error was handed over once
