"""The output storage refuses writes: a real SeaweedFS server whose credentials may write
checkpoints but get AccessDenied on the output bucket. The trainer's first output write (the
metrics.jsonl flush at the first checkpoint; the export would be the next) fails: it must not
report success (exit STORAGE_ERROR, no "done" event, progress.json phase failed, no adapter
published), and the operator, seeing that exit code, must not mark the job Succeeded or merge.
Once the storage is fixed, a restart resumes from the newest committed checkpoint and exports:
at most one checkpoint interval is trained again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from operator_harness import EXAMPLE, wait_for

from kubetune.api import exitcodes
from kubetune.api.progress import parse_progress
from kubetune.artifacts.embedded_s3 import SeaweedS3
from kubetune.artifacts.storage import open_store

pytestmark = pytest.mark.slow

STEPS, EVERY = 4, 2


class OutputDeniedS3(SeaweedS3):
    """Writes to the output bucket are refused until `deny_outputs` is cleared and the server restarted."""

    deny_outputs = True

    def _write_config(self) -> Path:
        actions = ["Read", "List", "Tagging", "Write:checkpoints"] if self.deny_outputs else ["Admin", "Read", "List", "Tagging", "Write"]
        config = {"identities": [{"name": "kubetune", "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}], "actions": actions}]}
        path = self.dir / "s3.json"
        path.write_text(json.dumps(config))
        return path


def write_job(tmp_path, model_dir, output: str, checkpoints: str):
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(16)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {
        "model": {"uri": str(model_dir)},
        "dataset": {"uri": "data.jsonl"},
        "method": {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": STEPS, "learningRate": 0.01, "microBatchSize": 2, "maxLength": 48, "logEverySteps": 1},
        "checkpoint": {"uri": checkpoints, "everySteps": EVERY, "keep": 2},
        "output": {"uri": output, "merge": False},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "export-fault"}, "spec": spec}))
    return path


def train(job, env) -> tuple[int, list[dict], str]:
    run = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(job)], capture_output=True, text=True, timeout=540, env=env)
    return run.returncode, [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")], run.stderr


@pytest.fixture
def denying_s3(tmp_path, monkeypatch):
    server = OutputDeniedS3(tmp_path / "s3", buckets=("checkpoints", "outputs"))
    server.deny_outputs = False  # creating buckets needs Admin
    server.start()
    server.stop()
    server.buckets, server.deny_outputs = (), True
    server.start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    yield server
    server.stop()


def test_failed_export_is_not_success_and_a_restart_exports_without_retraining(tmp_path, tiny_model_dir, denying_s3):
    output, checkpoints = "s3://outputs/export-fault", "s3://checkpoints/export-fault"
    job = write_job(tmp_path, tiny_model_dir, output, checkpoints)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
           "KUBETUNE_S3_MAX_ATTEMPTS": "1", "KUBETUNE_STORAGE_ATTEMPTS": "2", "KUBETUNE_STORAGE_RETRY_DELAY": "0.1"}  # fmt: skip

    code, events, stderr = train(job, env)
    assert code == exitcodes.STORAGE_ERROR, stderr[-3000:]
    assert not [e for e in events if e["event"] == "done"]
    assert "s3://outputs/export-fault" in stderr and "denied" in stderr
    assert parse_progress(open_store(checkpoints).get_bytes("progress.json")).phase == "failed"
    assert not open_store(output).list()  # nothing half-published
    reached = max(e["step"] for e in events if e["event"] == "step")
    committed = max((e["step"] for e in events if e["event"] == "checkpoint"), default=0)

    denying_s3.stop()
    denying_s3.deny_outputs = False
    denying_s3.start()
    code, events, stderr = train(job, env)
    assert code == exitcodes.OK, stderr[-3000:]
    resumed = next((e["step"] for e in events if e["event"] == "resume"), 0)
    assert resumed == committed and reached - resumed <= EVERY
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(resumed + 1, STEPS + 1))
    done = [e for e in events if e["event"] == "done"][0]
    assert done["outputs"]["adapter"] == f"{output}/adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {o.key for o in open_store(f"{output}/adapter").list()}
    assert parse_progress(open_store(checkpoints).get_bytes("progress.json")).phase == "done"


def test_operator_does_not_call_a_storage_error_success(operator, ns, kubectl):
    ns.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
    kubectl.apply(EXAMPLE)
    wait_for(lambda: {"qa-bot-worker-0", "qa-bot-worker-1"} <= set(ns.workers("qa-bot")), what="workers")
    ns.set_pod_status("qa-bot-worker-1", "Succeeded", exit_code=0)
    ns.set_pod_status("qa-bot-worker-0", "Failed", exit_code=exitcodes.STORAGE_ERROR)
    status = wait_for(lambda: ns.status("qa-bot").get("restarts") == 1 and ns.status("qa-bot"), what="gang restart")
    assert status["phase"] in ("Restarting", "Pending", "Running") and not status.get("outputs", {}).get("mergedUri")
    assert not ns.pods("qa-bot", "merge")
