"""Hostile and wrong job documents: each one is refused with the exact message the user sees.

Three layers, in the order a job meets them:
- the spec model (`parse_job` / `load_job`): wrong types, unknown fields, out-of-range values;
- locations (`parse_uri`, store keys): path traversal and odd schemes;
- semantic checks (`check_job(on_cluster=True)`): documents that parse but cannot run, which
  the operator turns into an InvalidSpec condition instead of starting pods.
The CRD-schema layer (what `kubectl apply` refuses) is in test_crd_schema.py.
"""

from __future__ import annotations

import copy

import pytest

from kubetune.api.spec import SpecError, load_job, parse_job
from kubetune.api.uri import UriError, parse_uri
from kubetune.api.validation import check_job
from kubetune.artifacts.storage import LocalStore

BASE = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "qa-bot"},
    "spec": {"model": {"uri": "s3://models/base"}, "dataset": {"uri": "s3://data/qa.jsonl"}, "output": {"uri": "s3://models/qa-bot"}},
}
REMOVE = object()
UNKNOWN = "unknown field (check the spelling; see `kubectl explain ftj.spec`)"


def document(**changes) -> dict:
    """BASE with dotted paths (`spec__training__seed` -> spec.training.seed) set or removed."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = doc
        for key in parents:
            node = node.setdefault(key, {})
        if value is REMOVE:
            node.pop(last)
        else:
            node[last] = value
    return doc


def spec_error(doc) -> str:
    with pytest.raises(SpecError) as info:
        parse_job(doc)
    return str(info.value)


# (changes to BASE, exact message of parse_job)
SPEC_CATALOGUE = [
    ({"kind": "Deployment"}, "<job>: kind: Input should be 'FineTuneJob' (got 'Deployment')"),
    ({"apiVersion": "kubetune.io/v1"}, "<job>: apiVersion: Input should be 'kubetune.io/v1alpha1' (got 'kubetune.io/v1')"),
    ({"metadata__name": "../etc"}, "<job>: metadata.name: String should match pattern '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$' (got '../etc')"),
    ({"metadata__name": "a" * 64}, f"<job>: metadata.name: String should have at most 63 characters (got '{'a' * 64}')"),
    ({"spec__model": REMOVE}, "<job>: spec.model: required field is missing"),
    ({"spec__model__uri": ""}, "<job>: spec.model.uri: String should have at least 1 character (got '')"),
    ({"spec__model__uri": 42}, "<job>: spec.model.uri: Input should be a valid string (got 42)"),
    # Credentials have no field: putting them in the spec is refused, not silently stored.
    ({"spec__model__token": "hf_abc"}, f"<job>: spec.model.token: {UNKNOWN}"),
    ({"spec__storage__accessKeyId": "AKIA0000"}, f"<job>: spec.storage.accessKeyId: {UNKNOWN}"),
    ({"spec__storage__credentialsSecret": {"name": "s3"}}, "<job>: spec.storage.credentialsSecret: Input should be a valid string"),
    ({"spec__dataset__format": "csv"}, "<job>: spec.dataset.format: Input should be 'prompt_response', 'alpaca', 'conversation', 'sharegpt', 'openai' or 'text' (got 'csv')"),
    ({"spec__dataset__validation": {"ratio": 0.1, "uri": "s3://data/v.jsonl"}}, "<job>: spec.dataset.validation: set either ratio or uri, not both"),
    ({"spec__dataset__validation": {"ratio": 1.0}}, "<job>: spec.dataset.validation.ratio: Input should be less than 1 (got 1.0)"),
    ({"spec__dataset__columns": {"prompt": 3}}, "<job>: spec.dataset.columns.prompt: Input should be a valid string (got 3)"),
    ({"spec__dataset__columns": {"answer": "a"}}, f"<job>: spec.dataset.columns.answer: {UNKNOWN}"),
    ({"spec__method": {"lora": {"r": 0}}}, "<job>: spec.method.lora.r: Input should be greater than or equal to 1 (got 0)"),
    ({"spec__method": {"lora": {"r": "eight"}}}, "<job>: spec.method.lora.r: Input should be a valid integer (got 'eight')"),
    ({"spec__method": {"lora": {"targetModules": []}}}, "<job>: spec.method.lora.targetModules: List should have at least 1 item after validation, not 0"),
    ({"spec__method": {"lora": {"dropout": 1.0}}}, "<job>: spec.method.lora.dropout: Input should be less than 1 (got 1.0)"),
    ({"spec__method": {"type": "qlora", "qlora": {"bits": 3}}}, "<job>: spec.method.qlora.bits: Input should be 4 or 8 (got 3)"),
    ({"spec__method": {"type": "freeze", "freeze": {}}}, "<job>: spec.method.freeze: set trainableModules or lastLayers"),
    ({"spec__method": {"type": "full", "adapterUri": "s3://m/a"}}, "<job>: spec.method: method.adapterUri continues a LoRA adapter; it needs method.type lora or qlora, not 'full'"),
    ({"spec__training": {"epochs": "two"}}, "<job>: spec.training.epochs: Input should be a valid number (got 'two')"),
    ({"spec__training": {"maxSteps": 1.5}}, "<job>: spec.training.maxSteps: Input should be a valid integer (got 1.5)"),
    ({"spec__training": {"epochs": float("inf")}}, "<job>: spec.training.epochs: Input should be a finite number (got inf)"),
    ({"spec__training": {"learningRate": 2.0}}, "<job>: spec.training.learningRate: Input should be less than or equal to 1 (got 2.0)"),
    ({"spec__training": {"precision": "int8"}}, "<job>: spec.training.precision: Input should be 'auto', 'fp32', 'fp16' or 'bf16' (got 'int8')"),
    ({"spec__training": {"lrScheduler": "step"}}, "<job>: spec.training.lrScheduler: Input should be 'cosine', 'linear' or 'constant' (got 'step')"),
    ({"spec__training": {"maxLength": 4}}, "<job>: spec.training.maxLength: Input should be greater than or equal to 8 (got 4)"),
    ({"spec__training": {"maxSourceLength": 2000}}, "<job>: spec.training: training.maxSourceLength (2000) must be smaller than training.maxLength (1024)"),
    ({"spec__distributed": {"zero": {"stage": 4}}}, "<job>: spec.distributed.zero.stage: Input should be less than or equal to 3 (got 4)"),
    ({"spec__distributed": {"zero": {"stage": 0, "offload": "optimizer"}}}, "<job>: spec.distributed.zero: zero.offload optimizer needs zero.stage 1, 2 or 3"),
    ({"spec__distributed": {"nodes": 0}}, "<job>: spec.distributed.nodes: Input should be greater than or equal to 1 (got 0)"),
    ({"spec__distributed": {"deepspeedConfig": "fast"}}, "<job>: spec.distributed.deepspeedConfig: Input should be a valid dictionary (got 'fast')"),
    ({"spec__nodeSelector": {"gpu": True}}, "<job>: spec.nodeSelector.gpu: Input should be a valid string (got True)"),
    ({"spec__tolerations": {"key": "x"}}, "<job>: spec.tolerations: Input should be a valid list"),
    ({"spec__checkpoint": {"everySteps": 0}}, "<job>: spec.checkpoint.everySteps: Input should be greater than or equal to 1 (got 0)"),
    ({"spec__serving": {"engine": "tgi"}}, "<job>: spec.serving.engine: Input should be 'builtin' or 'vllm' (got 'tgi')"),
    ({"spec__serving": {"port": 70000}}, "<job>: spec.serving.port: Input should be less than or equal to 65535 (got 70000)"),
    ({"spec__serving": {"generation": {"temperature": 3}}}, "<job>: spec.serving.generation.temperature: Input should be less than or equal to 2 (got 3)"),
    ({"spec__runPolicy": {"backoffLimit": -1}}, "<job>: spec.runPolicy.backoffLimit: Input should be greater than or equal to 0 (got -1)"),
    ({"spec__image": {"pullPolicy": "Sometimes"}}, "<job>: spec.image.pullPolicy: Input should be 'Always', 'IfNotPresent' or 'Never' (got 'Sometimes')"),
    ({"spec__retention": {"replay": {"ratio": -0.5}}}, "<job>: spec.retention.replay.ratio: Input should be greater than or equal to 0 (got -0.5)"),
    ({"spec__retention": {"probes": {"warnBelow": 90}}}, "<job>: spec.retention.probes.warnBelow: Input should be less than or equal to 1 (got 90)"),
    ({"spec__retention": {"replay": {"prompts": "x.jsonl"}}}, f"<job>: spec.retention.replay.prompts: {UNKNOWN}"),
    ({"spec__retention": {"paraphrases": {"count": 5}}}, "<job>: spec.retention.paraphrases.count: Input should be less than or equal to 4 (got 5)"),
    ({"spec__retention": {"paraphrases": {"count": "2"}}}, "<job>: spec.retention.paraphrases.count: Input should be a valid integer (got '2')"),
    ({"spec__retention": {"paraphrases": {"maxNewTokens": 4}}}, "<job>: spec.retention.paraphrases.maxNewTokens: Input should be greater than or equal to 8 (got 4)"),
    ({"spec__retention": {"replay": {"loss": "kld"}}}, "<job>: spec.retention.replay.loss: Input should be 'kl' or 'tokens' (got 'kld')"),
    (
        {"spec__retention": {}, "spec__dataset__format": "text"},
        "<job>: spec.retention: replays and probes chat answers, but dataset.format text trains plain text without a chat "
        "template; use a chat format (prompt_response, alpaca, conversation, sharegpt, openai) or remove spec.retention",
    ),
    (
        {"spec__method": {"type": "qlora"}, "spec__distributed": {"zero": {"stage": 3}}},
        "<job>: spec: method.type qlora cannot be combined with distributed.zero.stage 3 (quantized weights cannot be partitioned); use stage 0-2",
    ),
    (
        {"spec__method": {"type": "prompt"}, "spec__serving": {"enabled": True, "engine": "vllm"}},
        "<job>: spec: serving.engine vllm cannot serve ptuning/prompt adapters; use engine builtin",
    ),
]


@pytest.mark.parametrize("changes, expected", SPEC_CATALOGUE, ids=[next(iter(c)) for c, _ in SPEC_CATALOGUE])
def test_spec_model_refuses(changes, expected):
    assert spec_error(document(**changes)) == expected


@pytest.mark.parametrize(
    "doc, expected",
    [
        (None, "<job>:1: expected a FineTuneJob mapping, got NoneType"),
        ("kind: FineTuneJob", "<job>:1: expected a FineTuneJob mapping, got str"),
        ({}, "<job>: metadata: required field is missing\n<job>: spec: required field is missing"),
    ],
)
def test_not_a_job_at_all(doc, expected):
    assert spec_error(doc) == expected


def _file_error(path) -> str:
    with pytest.raises(SpecError) as info:
        load_job(path)
    return str(info.value).replace(str(path), "job.yaml")


def test_job_files_that_are_not_yaml_jobs(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"metadata: {name: a}\nspec: {model: {uri: \xff\xfe}}\n")
    assert _file_error(path) == "job.yaml: not UTF-8 text (invalid start byte at byte 40)"
    # PyYAML's safe loader must never construct Python objects from tags.
    path.write_text('metadata: {name: a}\nspec: !!python/object/apply:os.system ["touch pwned"]\n')
    assert _file_error(path) == "job.yaml:2: invalid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"
    assert not (tmp_path / "pwned").exists()
    assert _file_error(tmp_path / "missing.yaml") == "job.yaml: file not found"


def test_duplicate_sections_are_refused_not_merged(tmp_path):
    # YAML would keep the last duplicate key and hide the first; the API server's strict
    # decoding refuses duplicate fields, and so does the parser.
    path = tmp_path / "job.yaml"
    path.write_text("metadata: {name: a}\nspec:\n  model: {uri: m}\n  dataset: {uri: d}\n  training: {seed: 1}\n  training: {seed: x}\n")
    assert _file_error(path) == "job.yaml:6: spec.training: duplicate field (first on line 5); the API server refuses duplicate fields"


def test_bad_quantity_names_the_field_once():
    message = spec_error(document(spec__resources={"requests": {"cpu": 1.5}}))
    assert len(message.splitlines()) == 1
    assert message.startswith("<job>: spec.resources.requests.cpu: ")


def test_yaml_alias_bomb_is_refused(tmp_path):
    lines = ["metadata: {name: a}", "spec:", "  model: {uri: m}", "  dataset: {uri: d}", "  bogus:", '    l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"    l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    path = tmp_path / "job.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert "alias" in _file_error(path)


# ---------------------------------------------------------------------------------------
# Locations: traversal and odd schemes (tests/core covers the basic ones)

URI_CATALOGUE = [
    ("gs://bucket/x", "unsupported scheme 'gs' in 'gs://bucket/x'; expected one of s3://, file://, pvc://, hf:// or a path"),
    ("http://evil.example/x", "unsupported scheme 'http' in 'http://evil.example/x'; expected one of s3://, file://, pvc://, hf:// or a path"),
    ("s3://b/a/b/../../../x", "'s3://b/a/b/../../../x' contains '..'; locations may not climb out of their bucket"),
    ("s3://b/..", "'s3://b/..' contains '..'; locations may not climb out of their bucket"),
    ("pvc://claim/./../x", "'pvc://claim/./../x' contains '..'; locations may not climb out of their volume"),
    ("s3://b/k\x00.jsonl", "NUL byte in location 's3://b/k\\x00.jsonl'"),
    ("pvc:///data", "'pvc:///data' has no claim name"),
    ("hf:///model", "'hf:///model' has no organisation name"),
]


@pytest.mark.parametrize("value, expected", URI_CATALOGUE)
def test_locations_refused(value, expected):
    with pytest.raises(UriError) as info:
        parse_uri(value)
    assert str(info.value) == expected


@pytest.mark.parametrize("value", ["pvc://../etc/passwd", "pvc://./x", "s3://../x", "s3:// /x", "S3://0 /", "pvc://a b/x"])
def test_dot_bucket_or_claim_refused(value):
    with pytest.raises(UriError):
        parse_uri(value)


@pytest.mark.parametrize("part", ["../x", "a/../../x", "/etc/passwd"])
def test_join_and_store_keys_refuse_traversal(tmp_path, part):
    with pytest.raises(UriError) as info:
        parse_uri("s3://b/p").join(part)
    assert str(info.value) == f"path part {part!r} must be relative and must not contain '..'"
    store = LocalStore(parse_uri(str(tmp_path / "root")))
    (tmp_path / "secret").write_text("s")
    for operation in (lambda: store.get_bytes(part), lambda: store.put_bytes(part, b"x"), lambda: store.delete([part])):
        with pytest.raises(UriError) as info:
            operation()
        assert str(info.value) == f"object key {part!r} climbs out of its root"
    assert (tmp_path / "secret").read_text() == "s"


# ---------------------------------------------------------------------------------------
# Documents that parse but cannot run: the operator's InvalidSpec problems

SEMANTIC_CATALOGUE = [
    ({"spec__model__uri": "/home/me/model"}, "spec.model.uri: '/home/me/model' is a local path, which pods cannot see; use s3://BUCKET/KEY or pvc://CLAIM/PATH"),
    ({"spec__dataset__uri": "hf://org/data"}, "spec.dataset.uri: hf:// is only supported for spec.model.uri"),
    ({"spec__dataset__uri": "s3://data/../secrets/x.jsonl"}, "spec.dataset.uri: 's3://data/../secrets/x.jsonl' contains '..'; locations may not climb out of their bucket"),
    ({"spec__checkpoint": {"uri": "pvc://claim/../../etc"}}, "spec.checkpoint.uri: 'pvc://claim/../../etc' contains '..'; locations may not climb out of their volume"),
    ({"spec__output": REMOVE}, "spec.output.uri: required on a cluster: where the trained model goes (e.g. s3://models/NAME)"),
    ({"spec__output__uri": "ftp://x/y"}, "spec.output.uri: unsupported scheme 'ftp' in 'ftp://x/y'; expected one of s3://, file://, pvc://, hf:// or a path"),
    (
        {"spec__distributed": {"deepspeedConfig": {"train_batch_size": 7}}},
        "spec.distributed.deepspeedConfig.train_batch_size: 7 does not match the job: 1 (microBatchSize 1 x gradientAccumulationSteps 1 x nodes 1 x gpusPerNode 1); remove it, it is derived from those fields",
    ),
    ({"spec__distributed": {"deepspeedConfig": {"zero_optimization": {"stage": 3}}}}, "spec.distributed.deepspeedConfig.zero_optimization.stage: 3 contradicts distributed.zero.stage 2"),
    ({"spec__method": {"type": "prompt"}, "spec__distributed": {"zero": {"stage": 3}}}, "spec.distributed.zero.stage: method prompt keeps the base model whole; use stage 0-2"),
    ({"spec__method": {"lora": {"targetModules": ["all-linear", "q_proj"]}}}, "spec.method.lora.targetModules: all-linear already selects every linear layer; list either all-linear or module names"),
    ({"spec__training": {"eval": {"generate": True}}}, "spec.training.eval.generate: needs a validation set: set dataset.validation ({ratio: 0.1} or {uri: ...})"),
    ({"spec__retention": {"replay": {"uri": "/home/me/prompts.jsonl"}}}, "spec.retention.replay.uri: '/home/me/prompts.jsonl' is a local path, which pods cannot see; use s3://BUCKET/KEY or pvc://CLAIM/PATH"),
    ({"spec__retention": {"probes": {"uri": "s3://data/../x.jsonl"}}}, "spec.retention.probes.uri: 's3://data/../x.jsonl' contains '..'; locations may not climb out of their bucket"),
    ({"metadata__name": "1abc"}, "metadata.name: '1abc' must start with a letter: the job's Services are named after it"),
]


@pytest.mark.parametrize("changes, expected", SEMANTIC_CATALOGUE, ids=[next(iter(c)) for c, _ in SEMANTIC_CATALOGUE])
def test_semantic_problems(changes, expected):
    job = parse_job(document(**changes))
    assert [str(p) for p in check_job(job, on_cluster=True)] == [expected]


def test_valid_base_has_no_problems():
    # Guards the catalogue: each entry above fails for its own change, not for the base.
    assert check_job(parse_job(BASE), on_cluster=True) == []
