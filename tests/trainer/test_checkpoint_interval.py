"""A checkpoint interval longer than the run (`everySteps: 1000`, `maxSteps: 4`, a usual smoke
test) is a warning everywhere — `kubetune validate`, `kubetune run`, the operator (a Warning
event when the job starts), kubetune-train — never a refusal; the final checkpoint is still
written and committed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from kubetune.api.layout import job_layout
from kubetune.api.spec import load_job
from kubetune.api.validation import check_job, job_warnings
from kubetune.artifacts.net import free_port
from kubetune.cli import main as cli_main

WARNING = (
    "spec.checkpoint.everySteps: 1000 is more than training.maxSteps 4: only the final checkpoint (and one on "
    "preemption) is written, so a run that fails before the end starts over"
)


def smoke_job(folder: Path, model_dir: Path) -> Path:
    records = [{"prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(16)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    document = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "smoke"},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": "data.jsonl"},
            "method": {"type": "full"},
            "training": {"maxSteps": 4, "microBatchSize": 2, "maxLength": 64, "logEverySteps": 1},
            "checkpoint": {"everySteps": 1000, "keep": 2},
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def every_steps_line(path: Path) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if "everySteps" in line)


def test_is_a_warning_not_a_problem(tmp_path, capsys):
    path = smoke_job(tmp_path, tmp_path / "model")
    job = load_job(path)
    assert check_job(job, on_cluster=False) == []
    assert [str(w) for w in job_warnings(job)] == [WARNING]
    assert cli_main(["validate", str(path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{path}:{every_steps_line(path)}: warning: {WARNING}"]


def test_the_operator_posts_it_once_as_a_warning_event_when_the_job_starts():
    from kubetune.api.crd import FineTuneJobStatus
    from kubetune_operator.status import Observed, decide

    job = load_job(Path(__file__).resolve().parents[2] / "examples" / "lora-multinode.yaml")
    job.spec.training.max_steps, job.spec.checkpoint.every_steps = 4, 1000
    now = datetime(2026, 12, 3, 12, 0, 0)
    observed = Observed(warnings=[str(w) for w in job_warnings(job)])
    first = decide(job, observed, None, FineTuneJobStatus(), now, job_layout(job))
    assert first.status.phase == "Pending" and "InvalidSpec" not in [c.type for c in first.status.conditions]
    assert [(e.type, e.reason, e.message) for e in first.events if e.reason == "SpecWarning"] == [("Warning", "SpecWarning", WARNING)]
    later = decide(job, observed, None, first.status, now, job_layout(job))
    assert [e for e in later.events if e.reason == "SpecWarning"] == []


def run_env(tmp_path: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
            "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # fmt: skip


@pytest.mark.slow
def test_kubetune_train_warns_and_commits_the_final_checkpoint(tmp_path, tiny_model_dir):
    job = smoke_job(tmp_path, tiny_model_dir)
    proc = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(job)], capture_output=True, text=True, timeout=300, env=run_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert WARNING in proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [4]
    checkpoints = tmp_path / "runs/smoke/output/checkpoints"
    assert (checkpoints / "step-000000004" / "manifest.json").is_file()
    assert json.loads((checkpoints / "progress.json").read_text())["last_checkpoint"] == "step-000000004"


@pytest.mark.slow
def test_kubetune_run_prints_it_and_runs(tmp_path, tiny_model_dir):
    job = smoke_job(tmp_path, tiny_model_dir)
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(job)], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=run_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{job}:{every_steps_line(job)}: warning: {WARNING}" in " ".join(proc.stdout.split())  # rich may wrap the line
    assert (tmp_path / "runs/smoke/output/checkpoints/step-000000004/manifest.json").is_file()
