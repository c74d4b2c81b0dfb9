"""kubetune-train on 2 ranks (torchrun, gloo) with best-fit packing: the fill is reported, the
tokenized data is made once and reused by a later job on the node and by a restarted gang on a
fresh node, and a preempted-and-resumed run logs exactly the losses of an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from kubetune.api import exitcodes
from kubetune.artifacts.net import free_port

pytestmark = pytest.mark.slow

STEPS = 6
PREEMPT_AFTER = 3


def write_job(folder: Path, model: Path, data: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "model": {"uri": str(model)},
        "dataset": {"uri": str(data), "format": "prompt_response"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "targetModules": ["q_proj", "v_proj"]}},
        "training": {"maxSteps": STEPS, "learningRate": 1e-2, "microBatchSize": 2, "gradientAccumulationSteps": 2, "maxLength": 160,
                     "packing": True, "logEverySteps": 1, "seed": 5, "precision": "fp32"},
        "distributed": {"nodes": 1, "gpusPerNode": 2, "zero": {"stage": 2}},
        "checkpoint": {"everySteps": 1000, "keep": 1},
    }  # fmt: skip
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "packed"}, "spec": spec}))
    return path


def train(job: Path, cache: Path, preempt_after: int = 0) -> tuple[list[dict], str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "kubetune.train.main", "--job", str(job)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    events = []
    for line in proc.stdout:
        events.append(json.loads(line))
        if preempt_after and events[-1]["event"] == "step" and events[-1]["step"] == preempt_after:
            for worker in psutil.Process(proc.pid).children():
                worker.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    return events, stderr, proc.wait(timeout=600)


def losses(events: list[dict]) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step"}


def test_packed_run_reuses_its_tokens_and_resumes_exactly(tiny_model_dir, tmp_path):
    answers = ["yes", "It is four.", "The answer, after some thought and a long explanation, is eleven."]
    records = [{"prompt": f"Question {i}: what is {i} times {i % 5}?", "response": answers[i % 3]} for i in range(60)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    straight, stderr, code = train(write_job(tmp_path / "straight", tiny_model_dir, data), tmp_path / "node-1")
    assert code == 0, stderr[-3000:]
    start = straight[0]
    assert start["tokens_from"] == "tokenized" and start["rows"] < start["train_samples"]
    assert 0.9 < start["packing_fill"] <= 1.0
    assert straight[-1]["summary"]["packing_fill"] == start["packing_fill"]

    # Another job on the same node (its own checkpoints) finds the tokens in the node's cache.
    job = write_job(tmp_path / "chain", tiny_model_dir, data)
    first, stderr, _ = train(job, tmp_path / "node-1", preempt_after=PREEMPT_AFTER)
    assert first[0]["tokens_from"] == "local" and first[0]["packing_fill"] == start["packing_fill"]
    stopped = next(e["step"] for e in first if e["event"] == "preempted")
    assert f"exitcode  : {exitcodes.PREEMPTED}" in stderr

    # Restarted on a fresh node: the tokens come from beside the checkpoints, and the run goes
    # on from the preemption with exactly the losses of the uninterrupted run.
    second, stderr, code = train(job, tmp_path / "node-2")
    assert code == 0, stderr[-3000:]
    assert second[0]["tokens_from"] == "fetched"
    assert next(e for e in second if e["event"] == "resume")["step"] == stopped
    assert losses(first) == {s: losses(straight)[s] for s in range(1, stopped + 1)}
    assert losses(second) == {s: losses(straight)[s] for s in range(stopped + 1, STEPS + 1)}
