"""The spec model: defaults, camelCase names, and errors that name the file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from kubetune.api.spec import SpecError, dump_job, load_job, parse_job

MINIMAL = {"metadata": {"name": "qa-bot"}, "spec": {"model": {"uri": "s3://models/base"}, "dataset": {"uri": "s3://data/qa.jsonl"}}}


def test_api_example_round_trips(tmp_path):
    # The example from shared/API.md, field for field.
    text = textwrap.dedent(
        """\
        apiVersion: kubetune.io/v1alpha1
        kind: FineTuneJob
        metadata:
          name: qa-bot
        spec:
          model:
            uri: s3://models/smollm2-135m-instruct
          dataset:
            uri: s3://data/qa.jsonl
            format: prompt_response
            columns: {prompt: question, response: answer, history: history, system: system}
            validation: {ratio: 0.1}
          method:
            type: lora
            lora: {r: 16, alpha: 64, dropout: 0.1, targetModules: [q_proj, v_proj]}
          training:
            epochs: 2
            learningRate: 1.0e-4
            weightDecay: 0.1
            warmupRatio: 0.1
            microBatchSize: 1
            gradientAccumulationSteps: 4
            maxLength: 1560
            maxSourceLength: 1024
            packing: false
            seed: 1234
            precision: bf16
            gradientCheckpointing: true
            logEverySteps: 10
          distributed:
            nodes: 1
            gpusPerNode: 4
            zero: {stage: 2, offload: none}
            deepspeedConfig: {}
          resources:
            requests: {cpu: "8", memory: 64Gi}
            limits: {nvidia.com/gpu: 4}
          nodeSelector: {}
          tolerations: []
          checkpoint:
            uri: s3://checkpoints/qa-bot
            everySteps: 100
            keep: 3
          storage:
            endpoint: http://minio.minio.svc:9000
            credentialsSecret: s3-credentials
          output:
            uri: s3://models/qa-bot
            merge: true
          serving:
            enabled: true
            engine: builtin
            replicas: 1
            generation: {temperature: 0.7, topP: 0.9, maxTokens: 256, repetitionPenalty: 1.1}
          runPolicy: {backoffLimit: 3, activeDeadlineSeconds: 86400, ttlSecondsAfterFinished: 3600, suspend: false}
        """
    )
    path = tmp_path / "job.yaml"
    path.write_text(text)
    job = load_job(path)
    spec = job.spec
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.resources.limits == {"nvidia.com/gpu": 4}
    assert spec.distributed.world_size == 4
    assert spec.serving.generation.repetition_penalty == 1.1
    doc = dump_job(job)
    assert doc["spec"]["training"]["gradientAccumulationSteps"] == 4
    assert doc["spec"]["runPolicy"]["activeDeadlineSeconds"] == 86400
    assert parse_job(doc) == job


def test_defaults():
    spec = parse_job(MINIMAL).spec
    assert spec.method.type == "lora"
    assert spec.method.settings().target_modules == ["all-linear"]
    assert spec.training.precision == "auto"
    assert spec.distributed.zero.stage == 2 and spec.distributed.zero.offload == "none"
    assert spec.checkpoint.every_steps == 100 and spec.checkpoint.keep == 3
    assert spec.serving.enabled is False


def _error(tmp_path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as info:
        load_job(path)
    return str(info.value).replace(str(path), "job.yaml")


BASE = """\
metadata:
  name: qa-bot
spec:
  model:
    uri: s3://models/base
  dataset:
    uri: s3://data/qa.jsonl
"""


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("  method:\n    type: lorra\n", "job.yaml:9: spec.method.type: Input should be 'freeze', 'lora', 'qlora', 'ptuning', 'prompt' or 'full' (got 'lorra')"),
        ("  training:\n    learningRate: -1\n", "job.yaml:9: spec.training.learningRate: Input should be greater than 0 (got -1)"),
        ("  training:\n    learnigRate: 0.1\n", "job.yaml:9: spec.training.learnigRate: unknown field (check the spelling; see `kubectl explain ftj.spec`)"),
        ("  distributed:\n    zero: {stage: 2, offload: all}\n", "job.yaml:9: spec.distributed.zero: zero.offload all (parameters too) needs zero.stage 3"),
        (
            "  method:\n    type: full\n    lora: {r: 8}\n",
            "job.yaml:8: spec.method: method.lora is set but method.type is 'full'; remove method.lora or set method.type: lora",
        ),
        (
            "  training:\n    maxLength: 512\n    maxSourceLength: 600\n",
            "job.yaml:8: spec.training: training.maxSourceLength (600) must be smaller than training.maxLength (512)",
        ),
        ("  method:\n    type: freeze\n", "job.yaml:8: spec.method: method.type freeze needs method.freeze.trainableModules or method.freeze.lastLayers"),
    ],
)
def test_errors_name_line_and_field(tmp_path, extra, expected):
    assert _error(tmp_path, BASE + extra) == expected


def test_missing_required_and_bad_yaml(tmp_path):
    assert _error(tmp_path, "metadata:\n  name: a\nspec:\n  model: {uri: x}\n") == "job.yaml:3: spec.dataset: required field is missing"
    assert _error(tmp_path, "metadata:\n  name: a\nspec: [\n") == "job.yaml:4: invalid YAML: expected the node content, but found '<stream end>'"
    assert _error(tmp_path, "- a\n- b\n") == "job.yaml:1: expected a FineTuneJob mapping, got list"
    assert "metadata.name: String should match pattern" in _error(tmp_path, BASE.replace("qa-bot", "QA_Bot"))


def test_several_problems_reported_together(tmp_path):
    message = _error(tmp_path, BASE + "  training:\n    epochs: 0\n    microBatchSize: 0\n")
    assert message.splitlines() == [
        "job.yaml:9: spec.training.epochs: Input should be greater than 0 (got 0)",
        "job.yaml:10: spec.training.microBatchSize: Input should be greater than or equal to 1 (got 0)",
    ]


@pytest.mark.parametrize(
    "extra, expected",
    [
        # The CRD's types are what the API server enforces; the CLI must refuse the same documents.
        ("  training:\n    seed: true\n", "job.yaml:9: spec.training.seed: Input should be a valid integer (got True)"),
        ("  training:\n    packing: 'yes'\n", "job.yaml:9: spec.training.packing: Input should be a valid boolean (got 'yes')"),
        ("  training:\n    maxSteps: '100'\n", "job.yaml:9: spec.training.maxSteps: Input should be a valid integer (got '100')"),
        ("  training:\n    learningRate: '1e-4'\n", "job.yaml:9: spec.training.learningRate: Input should be a valid number (got '1e-4')"),
        ("  serving:\n    enabled: 1\n", "job.yaml:9: spec.serving.enabled: Input should be a valid boolean (got 1)"),
    ],
)
def test_types_are_as_strict_as_the_crd(tmp_path, extra, expected):
    assert _error(tmp_path, BASE + extra) == expected


def test_ints_are_accepted_where_numbers_are_expected(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(BASE + "  training:\n    learningRate: 1\n    epochs: 2\n")
    training = load_job(path).spec.training
    assert training.learning_rate == 1.0 and training.epochs == 2.0


def test_line_of_points_at_the_field_or_its_nearest_parent():
    from kubetune.api.spec import line_of

    text = BASE + "  resources:\n    limits:\n      nvidia.com/gpu: 1\n"
    assert line_of(text, "spec.dataset.uri") == 7
    assert line_of(text, ("spec", "resources", "limits", "nvidia.com/gpu")) == 10
    assert line_of(text, "spec.resources.limits.nvidia.com/gpu") == 9  # dotted key: its parent
    assert line_of(text, "spec.training.seed") == 3  # absent: spec itself
    assert line_of("spec: [", "spec") is None
