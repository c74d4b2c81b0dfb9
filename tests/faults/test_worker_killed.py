"""A training gang (torchrun, 2 ranks, DeepSpeed ZeRO-2, checkpoints in SeaweedFS S3) is
SIGKILLed at seeded random points, restarted as a whole (what the operator does), and must
finish with exactly the weights of an uninterrupted run, losing at most one checkpoint
interval per kill.

The training program is the checkpoint tests' DeepSpeed loop (tests/checkpoint/ds_train.py);
its fixed-point kill tests live there. Here the kill point is random: any step, any moment in
it (between steps, inside a save, during the upload or the commit), and either the whole gang
or a single rank (torchrun then takes the other one down).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from kubetune.artifacts.net import free_port

DS_TRAIN = Path(__file__).resolve().parents[1] / "checkpoint" / "ds_train.py"
STEPS, EVERY = 6, 2
SEEDS = [11, 23]  # one kill each, chained: the second kill hits a run that itself resumed
LAUNCH_TIMEOUT = 300
STEP_SLEEP = 0.3

pytestmark = pytest.mark.slow


def launch(model: Path, ckpt: str, local: Path, env: dict, weights_out: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(DS_TRAIN), "--model", str(model), "--ckpt", ckpt, "--local-dir", str(local / "rank{rank}"),
           "--steps", str(STEPS), "--every", str(EVERY), "--keep", "2", "--stage", "2",
           # The tiny model steps in milliseconds: slow it so a kill lands mid-run.
           "--step-sleep", str(STEP_SLEEP)]  # fmt: skip
    if weights_out is not None:
        cmd += ["--weights-out", str(weights_out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def events(proc: subprocess.Popen):
    for line in proc.stdout:
        if line.startswith("{"):
            yield json.loads(line)


def finish(proc: subprocess.Popen) -> list[dict]:
    seen = list(events(proc))
    stderr = proc.stderr.read()
    assert proc.wait(timeout=LAUNCH_TIMEOUT) == 0, stderr[-3000:]
    return seen


def run_and_kill(proc: subprocess.Popen, rng: random.Random) -> tuple[list[dict], str]:
    """Let the run go k steps (k random among those left), wait a random fraction of a step or
    save, then SIGKILL the gang or one rank. Returns the events seen and what was killed."""
    seen: list[dict] = []
    start = 0
    target = None
    victim = rng.choice(["gang", "one rank"])
    for event in events(proc):
        seen.append(event)
        if event["event"] == "resume":
            start = event["step"]
        if event["event"] == "step":
            if target is None:
                target = rng.randint(start + 1, STEPS - 1)
            if event["step"] == target:
                time.sleep(rng.uniform(0.0, 2 * STEP_SLEEP))
                if victim == "gang":
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    workers = psutil.Process(proc.pid).children()
                    os.kill(rng.choice(workers).pid, signal.SIGKILL)
                break
    proc.wait(timeout=LAUNCH_TIMEOUT)
    if _alive(proc.pid):  # a rank torchrun has not reaped yet
        os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "the run finished before it could be killed"
    return seen, victim


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_random_kills_then_gang_restart_give_the_uninterrupted_weights(tiny_model_dir, seaweed, tmp_path):
    env = {**os.environ, **seaweed.env, "OMP_NUM_THREADS": "1", "KUBETUNE_S3_MAX_ATTEMPTS": "3"}
    reference = tmp_path / "reference.pt"
    finish(launch(tiny_model_dir, f"s3://checkpoints/{uuid.uuid4().hex[:8]}", tmp_path / "ref", env, reference))

    ckpt = f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    last_step = 0
    history = []
    for seed in SEEDS:
        # Every restart gets fresh local disks, like pods rescheduled on other nodes.
        seen, victim = run_and_kill(launch(tiny_model_dir, ckpt, tmp_path / f"kill-{seed}", env), random.Random(seed))
        resumed = next((e["step"] for e in seen if e["event"] == "resume"), 0)
        assert resumed >= last_step - EVERY, f"resumed at {resumed} after reaching {last_step}: more than one interval lost"
        last_step = max(e["step"] for e in seen if e["event"] == "step")
        history.append((seed, victim, resumed, last_step))

    final = tmp_path / "final.pt"
    seen = finish(launch(tiny_model_dir, ckpt, tmp_path / "final", env, final))
    resumed = next(e for e in seen if e["event"] == "resume")
    assert last_step - EVERY <= resumed["step"] <= last_step, history
    assert [e["step"] for e in seen if e["event"] == "step"] == list(range(resumed["step"] + 1, STEPS + 1))

    expected, got = torch.load(reference), torch.load(final)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"weights differ after kills {history}: {different[:5]}"
