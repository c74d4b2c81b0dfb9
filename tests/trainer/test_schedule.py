"""The learning-rate schedule is transformers' `get_scheduler` inside the DeepSpeed engine:
the learning rates kubetune-train logs are the library's values (linear warmup over
ceil(warmupRatio x steps) steps, then cosine), computed here by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

PEAK, STEPS, WARMUP_RATIO = 0.01, 6, 0.34  # ceil(0.34 x 6) = 3 warmup steps


def cosine_with_warmup(step: int, warmup: int = 3, total: int = STEPS) -> float:
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_logged_learning_rates_are_transformers_cosine_with_warmup(tmp_path, tiny_model_dir):
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    doc = {
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "lr"},
        "spec": {"model": {"uri": str(tiny_model_dir)}, "dataset": {"uri": "data.jsonl"}, "method": {"type": "full"},
                 "training": {"maxSteps": STEPS, "learningRate": PEAK, "warmupRatio": WARMUP_RATIO, "lrScheduler": "cosine",
                              "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1}},
    }  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(line) for line in proc.stdout.splitlines()]
    rates = {e["step"]: e["learning_rate"] for e in logged if e["event"] == "step"}
    # Each step logs the rate the scheduler holds after that step: factors 1/3, 2/3, 1, 0.75, 0.25, 0.
    assert rates == pytest.approx({s: PEAK * cosine_with_warmup(s) for s in range(1, STEPS + 1)}, abs=1e-12)
