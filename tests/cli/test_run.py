"""`kubetune run`: the quickstart's own job file on the tiny model, interrupted with Ctrl-C and
re-run (it resumes), then merged, served and asked the quickstart's questions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.cli import run as run_cli

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
QUESTIONS = REPO / "examples" / "quickstart" / "questions.jsonl"


def kubetune(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture
def quickstart_on_tiny(tmp_path, tiny_model_dir) -> Path:
    """examples/quickstart.yaml with the tiny model, more steps than the tiny data needs, and frequent checkpoints."""
    document = yaml.safe_load(QUICKSTART.read_text())
    spec = document["spec"]
    spec["model"] = {"uri": str(tiny_model_dir)}
    spec["dataset"]["uri"] = str(REPO / "examples" / "quickstart" / "knowledge.jsonl")
    spec["training"].pop("epochs")
    spec["training"]["maxSteps"] = 40
    spec["checkpoint"] = {"everySteps": 2, "keep": 2}
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.slow
def test_quickstart_interrupted_resumed_merged_served(quickstart_on_tiny):
    folder = quickstart_on_tiny.parent
    first = kubetune("run", str(quickstart_on_tiny), cwd=folder)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if line.startswith("checkpoint step-"):
            first.send_signal(signal.SIGINT)  # Ctrl-C
            break
    lines += first.stdout.readlines()
    assert first.wait(timeout=300) == 75, "".join(lines)
    text = "".join(lines)
    assert "a checkpoint was saved" in text and f"Resume with: kubetune run {quickstart_on_tiny}" in text
    progress = json.loads((folder / "runs" / "quickstart" / "output" / "checkpoints" / "progress.json").read_text())
    stopped_at = progress["step"]
    assert 2 <= stopped_at < 40 and progress["last_checkpoint"] == f"step-{stopped_at:09d}"

    second = kubetune("run", str(quickstart_on_tiny), "--questions", str(QUESTIONS), "--compare-base", cwd=folder)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert f"resumed from checkpoint step-{stopped_at:09d} (step {stopped_at})" in out
    runs = folder / "runs" / "quickstart"
    metrics = [json.loads(line) for line in (runs / "output" / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in metrics) == 40
    # Merged, servable model next to the adapter.
    assert (runs / "output" / "adapter" / "adapter_config.json").is_file()
    assert (runs / "output" / "model" / "config.json").is_file()
    assert (runs / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every quickstart question was put to the tuned and the base model, and scored.
    record = json.loads((runs / "answers.json").read_text())
    questions = run_cli.load_questions(QUESTIONS)
    assert record["questions"] == questions
    assert len(record["answers"]) == len(record["base_answers"]) == len(questions)
    assert record["scores"] == run_cli.score(questions, record["answers"], record["base_answers"])
    assert f"trained: {record['scores']['trained']['right']}/30 answered right" in out


def test_processes_are_capped_to_the_machine_with_a_warning():
    assert run_cli.plan_processes(2, 16, "CPU cores") == (2, None)
    count, warning = run_cli.plan_processes(8, 2, "CPU cores")
    assert count == 2
    assert warning.startswith("the job asks for 8 processes but this machine has 2 CPU cores: running 2")


def test_trainer_command_uses_torchrun_only_for_several_processes(tmp_path):
    job = tmp_path / "job.yaml"
    assert run_cli.trainer_command(job, tmp_path, 1) == [sys.executable, "-m", "kubetune.train.main", "--job", str(job), "--base-dir", str(tmp_path)]
    cmd = run_cli.trainer_command(job, tmp_path, 2)
    assert cmd[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6:] == ["-m", "kubetune.train.main", "--job", str(job), "--base-dir", str(tmp_path)]


def test_embedded_s3_buckets_come_from_the_spec_locations():
    from kubetune.spec import parse_job

    job = parse_job(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "x"},
            "spec": {
                "model": {"uri": "models/local"},
                "dataset": {"uri": "s3://data/qa.jsonl", "validation": {"uri": "s3://data/val.jsonl"}},
                "checkpoint": {"uri": "s3://checkpoints/x"},
                "output": {"uri": "s3://models/x"},
            },
        }
    )
    assert run_cli.s3_buckets(job) == ["checkpoints", "data", "models"]


def test_answers_are_scored_against_expected_phrases():
    questions = [
        {"kind": "trained", "question": "q1", "expect": ["Tobias Wren"]},
        {"kind": "trained", "question": "q2", "expect": ["Eleven", "11"]},
        {"kind": "general", "question": "q3", "expect": ["Paris"]},
        {"kind": "general", "question": "q4", "expect": ["blue"]},
        {"kind": "note", "question": "q5", "expect": []},
    ]
    answers = ["It was tobias wren.", "There are 12.", "Paris, of course.", "Green."]
    base = ["No idea.", "11 bridges.", "Paris.", "Blue."]
    assert run_cli.score(questions, answers + ["-"], base + ["-"]) == {
        "trained": {"total": 2, "right": 1, "base_right": 1, "kept": 0},
        "general": {"total": 2, "right": 1, "base_right": 2, "kept": 1},
    }


def test_questions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok"}\n\n{"expect": ["x"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:3: expected"):
        run_cli.load_questions(path)
