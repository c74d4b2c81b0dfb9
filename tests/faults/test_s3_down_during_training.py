"""S3 goes down while `kubetune-train` is training (between checkpoints: progress.json and
metrics writes hit it, then a checkpoint falls into the outage) and comes back a few seconds
later. The trainer rides it out with bounded retries and finishes: every step once, every
checkpoint committed and complete, the adapter exported, progress.json done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import yaml

from kubetune.api.progress import parse_progress
from kubetune.artifacts.checkpoint import CheckpointManager
from kubetune.artifacts.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS, EVERY = 6, 3


def test_trainer_rides_out_an_s3_outage(tmp_path, tiny_model_dir, outage_s3):
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpoints, output = f"s3://checkpoints/{tmp_path.name}", f"s3://outputs/{tmp_path.name}"
    spec = {
        "model": {"uri": str(tiny_model_dir)},
        "dataset": {"uri": "data.jsonl"},
        "method": {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": STEPS, "learningRate": 0.01, "microBatchSize": 2, "maxLength": 48, "logEverySteps": 1},
        "checkpoint": {"uri": checkpoints, "everySteps": EVERY, "keep": 3},
        "output": {"uri": output, "merge": False},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "outage"}, "spec": spec}))
    # ~1 minute of retries (0.5 s doubling, capped): longer than a restart of the server.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
           "KUBETUNE_STORAGE_ATTEMPTS": "8", "KUBETUNE_STORAGE_RETRY_DELAY": "0.5"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "kubetune.train.main", "--job", str(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr))
    drain.start()
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if events[-1]["event"] == "step" and events[-1]["step"] == 1 and outage_s3.proc is not None:
            outage_s3.stop()  # down for the time a restart takes, while steps 2.. log and step 3 saves
            outage_s3.start()
    assert proc.wait(timeout=540) == 0, "".join(stderr)[-3000:]
    drain.join()

    assert any("retrying" in line for line in stderr), "the outage never hit the trainer"
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [3, 6]
    assert [e for e in events if e["event"] == "done"]
    manager = CheckpointManager(checkpoints, keep=3, local_dir=tmp_path / "verify", rank=0, world_size=1)
    assert manager.checkpoints() == ["step-000000006", "step-000000003"]
    assert parse_progress(open_store(checkpoints).get_bytes("progress.json")).phase == "done"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {o.key for o in open_store(f"{output}/adapter").list()}
