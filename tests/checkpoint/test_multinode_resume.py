"""Two "nodes" (torchrun, 2 ranks, each rank with its own local disk) resume a ZeRO-2
checkpoint from SeaweedFS S3: each node downloads only what its ranks read (the shared model
states, its own optimizer partition and RNG state), and the resumed engine holds exactly the
weights the first run ended with."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubetune.artifacts.net import free_port

DS_TRAIN = Path(__file__).resolve().parent / "ds_train.py"

pytestmark = pytest.mark.slow


def run(model: Path, ckpt: str, local: Path, steps: int, weights: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(DS_TRAIN), "--model", str(model), "--ckpt", ckpt, "--local-dir", str(local / "node{rank}"),
           "--steps", str(steps), "--every", "2", "--stage", "2", "--weights-out", str(weights)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_each_node_downloads_only_what_its_ranks_read(tiny_model_dir, seaweed, tmp_path):
    import torch

    env = {**os.environ, **seaweed.env, "OMP_NUM_THREADS": "1"}
    ckpt = f"s3://checkpoints/{uuid.uuid4().hex[:8]}"
    run(tiny_model_dir, ckpt, tmp_path / "first", 4, tmp_path / "trained.pt", env)
    # Same number of steps: the second run resumes from step 4 and trains nothing more.
    run(tiny_model_dir, ckpt, tmp_path / "fresh", 4, tmp_path / "resumed.pt", env)

    names = {rank: sorted(p.relative_to(tmp_path / "fresh" / f"node{rank}" / "step-000000004").as_posix()
                          for p in (tmp_path / "fresh" / f"node{rank}" / "step-000000004").rglob("*") if p.is_file())
             for rank in (0, 1)}  # fmt: skip
    for rank, other in ((0, 1), (1, 0)):
        assert names[rank] == sorted(["mp_rank_00_model_states.pt", f"rng/rank-0000{rank}.pt", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]), names
        assert f"zero_pp_rank_{other}_mp_rank_00_optim_states.pt" not in names[rank]
    trained, resumed = torch.load(tmp_path / "trained.pt"), torch.load(tmp_path / "resumed.pt")
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)
