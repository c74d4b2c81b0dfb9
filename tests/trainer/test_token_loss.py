"""Every optimizer step is the mean over all answer tokens of the step, across micro batches
and ranks, padded or packed, at every ZeRO stage: DeepSpeed's update equals the gradient of
the step's rows in one pass, and the logged loss is that pass's loss (token_loss_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.artifacts.net import free_port

WORKER = Path(__file__).resolve().parent / "token_loss_worker.py"

pytestmark = pytest.mark.slow


def run_worker(model: Path, nproc: int, accumulation: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           str(WORKER), "--model", str(model), "--accumulation", str(accumulation), "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.parametrize("nproc,accumulation", [(2, 2), (1, 3)], ids=["2-ranks", "1-rank"])
def test_step_gradient_is_the_token_mean_of_the_whole_step(tiny_model_dir, tmp_path, nproc, accumulation):
    results = run_worker(tiny_model_dir, nproc, accumulation, tmp_path / "results.jsonl")
    assert {(r["stage"], r["packed"]) for r in results} == {(s, p) for s in range(4) for p in (False, True)}
    for r in results:
        assert r["world_size"] == nproc and r["rows_per_step"] == 2 * accumulation * nproc
        # Mixed lengths: the micro batches of the step hold different answer token counts, so
        # averaging micro-batch means would be visibly off; the token-weighted step is not.
        assert len(set(r["micro_batch_tokens"])) > 1, r
        assert r["old_weighting_error"] > 1e-2, r
        assert r["error"] < 1e-5, r
        assert r["logged_loss"] == pytest.approx(r["one_pass_loss"], rel=1e-6), r
