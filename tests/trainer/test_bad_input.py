"""Invalid jobs and data: kubetune-train exits 64 with exactly this message, before loading a model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import yaml

from kubetune.api import exitcodes
from kubetune.artifacts.net import free_port
from kubetune.train.main import execute, parse_args

GOOD = {"prompt": "q", "response": "a"}


def job(model_dir: str, **spec) -> dict:
    base = {"model": {"uri": model_dir}, "dataset": {"uri": "data.jsonl"}, "training": {"maxSteps": 1}}
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "bad"}, "spec": base}


CASES = [
    # (spec changes, data lines, expected stderr without the "kubetune-train: " prefix; {dir} = job folder)
    ({"method": {"type": "lora", "lorra": {}}}, [GOOD],
     "{dir}/job.yaml:14: spec.method.lorra: unknown field (check the spelling; see `kubectl explain ftj.spec`)"),
    ({"training": {"maxSteps": 1, "maxSourceLength": 4096}}, [GOOD],
     "{dir}/job.yaml:10: spec.training: training.maxSourceLength (4096) must be smaller than training.maxLength (1024)"),
    ({"dataset": {"uri": "data.jsonl", "format": "sharegpt"}}, [GOOD],
     "1 of 1 records in {dir}/data.jsonl do not fit format 'sharegpt':\n"
     "{dir}/data.jsonl:1: conversations: missing (expected column 'conversations' or 'messages'; set spec.dataset.columns to rename)"),
    ({}, [], "dataset {dir}/data.jsonl contains no records"),
    ({"method": {"type": "qlora"}}, [GOOD],
     "method.type qlora quantizes the base model with bitsandbytes, which needs a CUDA GPU; this machine has none. "
     "Use method.type lora to train the same adapters unquantized."),
    ({"model": {"uri": "missing-model"}}, [GOOD], "spec.model.uri: missing-model does not exist"),
    ({"model": {"uri": "hf://org/name"}}, [GOOD],
     "spec.model.uri 'hf://org/name': KubeTune does not download from model hubs; copy the model to s3://, a volume "
     "(pvc://) or a local folder and point spec.model.uri there"),
]


@pytest.fixture
def single_process(monkeypatch):
    """Cases that get past the data start a one-process group: undo it after the test."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("changes,lines,expected", CASES)
def test_invalid_input_exits_64_with_exact_message(tmp_path, tiny_model_dir, capsys, monkeypatch, single_process, changes, lines, expected):
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    document = job(str(tiny_model_dir), **changes)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code = execute(parse_args(["--job", str(tmp_path / "job.yaml")]))
    assert code == exitcodes.INVALID_INPUT
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    assert capsys.readouterr().err.strip() == "kubetune-train: " + expected.format(dir=tmp_path)
    progress = tmp_path / "runs/bad/output/checkpoints/progress.json"
    if "model" in changes:  # failed after the run started: the operator sees why
        assert json.loads(progress.read_text())["error"] == "ModelSourceError: " + expected.format(dir=tmp_path)
        assert json.loads(progress.read_text())["phase"] == "failed"
    else:  # refused before anything was written
        assert not progress.exists()


def test_command_line_exit_code_and_stderr(tmp_path, tiny_model_dir):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(str(tiny_model_dir))))
    (tmp_path / "data.jsonl").write_text("{not json}\n")
    proc = subprocess.run([sys.executable, "-m", "kubetune.train.main", "--job", str(tmp_path / "job.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == exitcodes.INVALID_INPUT
    assert proc.stdout == ""
    assert proc.stderr.strip().endswith(
        f"kubetune-train: {tmp_path}/data.jsonl:1: invalid JSON: Expecting property name enclosed in double quotes (column 2)")


def test_merge_without_an_adapter_method_is_refused(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(str(tiny_model_dir), method={"type": "full"})))
    assert execute(parse_args(["--job", str(tmp_path / "job.yaml"), "--merge"])) == exitcodes.INVALID_INPUT
    assert capsys.readouterr().err.strip() == (
        "kubetune-train --merge: nothing to merge: method.type 'full' with output.merge True "
        "(merging needs method.type lora or qlora and output.merge: true)"
    )
