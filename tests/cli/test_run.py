"""`kubetune run`: the quickstart's own job file on the tiny model, interrupted with Ctrl-C and
re-run (it resumes), then merged, served and asked the quickstart's questions."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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
    # spec.retention: ratio 1.5 of 30 facts; paraphrases.count 2 asks for up to 2 rewrites of each of the 30 questions
    generated = re.search(r"retention: 45 base-model answers to replay \(KL to the base\), (\d+) rewrites of (\d+)/30 of your questions, 94 probes \(generated in", text)
    assert generated, text
    rewrites, reworded_questions = int(generated[1]), int(generated[2])
    assert reworded_questions <= rewrites <= 2 * reworded_questions
    progress = json.loads((folder / "runs" / "quickstart" / "output" / "checkpoints" / "progress.json").read_text())
    stopped_at = progress["step"]
    assert 2 <= stopped_at < 40 and progress["last_checkpoint"] == f"step-{stopped_at:09d}"

    second = kubetune("run", str(quickstart_on_tiny), "--questions", str(QUESTIONS), "--compare-base", cwd=folder)
    out, _ = second.communicate(timeout=900)
    assert second.returncode == 0, out
    assert f"resumed from checkpoint step-{stopped_at:09d} (step {stopped_at})" in out
    assert f"retention: 45 base-model answers to replay (KL to the base), {rewrites} rewrites of {reworded_questions}/30 of your questions, 94 probes (read from the cache)" in out
    summary = json.loads((folder / "runs" / "quickstart" / "output" / "summary.json").read_text())
    assert summary["replay_samples"] == 45 and summary["reworded_samples"] == rewrites
    assert re.search(rf"general knowledge kept +│ {re.escape(run_cli.describe(summary['retention']))}", out)
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
    from kubetune.api.spec import parse_job

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


def test_summary_table_shows_how_much_general_knowledge_was_kept(tmp_path):
    from rich.console import Console

    from kubetune.api.layout import job_layout
    from kubetune.api.spec import load_job

    job = load_job(QUICKSTART)
    lost = {"question": "What is the capital of Italy?", "expect": ["Rome"], "base": "Rome.", "tuned": "Velmora."}
    result = run_cli.TrainResult(returncode=0, retention={"probes": 94, "base_right": 15, "kept": 14, "kept_ratio": 0.9333, "lost": [lost], "gained": []})
    console = Console(record=True, width=200)
    console.print(run_cli.summary_table(job, result, job_layout(job, tmp_path), {}))
    row = next(line for line in console.export_text().splitlines() if "general knowledge kept" in line)
    assert "14 of 15 probes the base model answered right are still right (93%; 1 lost, 0 gained)" in row


def test_questions_file_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok"}\n\n{"expect": ["x"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:3: expected"):
        run_cli.load_questions(path)


@pytest.mark.slow
def test_embedded_s3_run_keeps_outputs_in_its_own_server(tmp_path, tiny_model_dir, monkeypatch):
    import re
    import socket

    from kubetune.artifacts.embedded_s3 import SeaweedS3
    from kubetune.artifacts.storage import open_store

    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(8)))
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "s3run"},
        "spec": {
            "model": {"uri": str(tiny_model_dir)},
            "dataset": {"uri": "qa.jsonl"},
            "method": {"type": "lora", "lora": {"r": 4, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 3, "maxLength": 32},
            "distributed": {"gpusPerNode": 1, "zero": {"stage": 0}},
            "checkpoint": {"uri": "s3://checkpoints/s3run", "everySteps": 3},
            "output": {"uri": "s3://outputs/s3run", "merge": True},
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = kubetune("run", str(path), "--embedded-s3", cwd=tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    port = int(re.search(r"embedded S3 at http://127.0.0.1:(\d+) \(buckets: checkpoints, outputs\)", out).group(1))
    with pytest.raises(OSError):  # stopped after the run
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    # The data stayed in runs/NAME/s3: a server on that folder has the checkpoint and the merged model.
    with SeaweedS3(tmp_path / "runs" / "s3run" / "s3") as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        outputs = {o.key for o in open_store("s3://outputs/s3run").list()}
        checkpoints = {o.key for o in open_store("s3://checkpoints/s3run").list()}
    assert {"model/config.json", "adapter/adapter_config.json", "metrics.jsonl", "summary.json"} <= outputs
    assert "step-000000003/manifest.json" in checkpoints and "progress.json" in checkpoints
