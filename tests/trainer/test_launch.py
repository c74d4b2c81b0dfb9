"""Worker pods run `python -m kubetune.train.launch` (torchrun's arguments): the pod's exit
code must be the trainer's, not torchrun's blanket 1, so the operator can tell bad input
(no retry) from a crash (restart)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from kubetune.api import exitcodes
from kubetune.artifacts.net import free_port
from kubetune.train.launch import exit_code_of


def test_signal_deaths_read_as_a_shell_would_show_them():
    assert exit_code_of(64) == 64
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143


def test_two_ranks_with_bad_data_exit_invalid_input_not_1(tmp_path, tiny_model_dir):
    (tmp_path / "data.jsonl").write_text('{"prompt": "q", "response": "a"}\n{"prompt": 5}\n')
    job = {
        "metadata": {"name": "launch"},
        "spec": {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": "data.jsonl"},
            "distributed": {"gpusPerNode": 2, "zero": {"stage": 0}},
        },
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0"}
    torch_args = ["--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                  "-m", "kubetune.train.main", "--job", str(tmp_path / "job.yaml")]  # fmt: skip
    launched = subprocess.run([sys.executable, "-m", "kubetune.train.launch", *torch_args], env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == exitcodes.INVALID_INPUT, launched.stderr[-2000:]
    assert "data.jsonl:2" in launched.stderr
