"""Custom resources that `kubectl apply` refuses: validated against the checked-in CRD's own
openAPIV3Schema (with kubectl's strict field validation: unknown fields are errors), with the
exact path and message. And the other side: documents the schema lets through but the spec
model or the semantic checks refuse, which the operator must turn into InvalidSpec.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from kubetune import crd
from kubetune.spec import SpecError, parse_job
from kubetune.validation import check_job

from test_spec_catalogue import REMOVE, SEMANTIC_CATALOGUE, document

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / crd.CRD_FILENAME


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft4Validator:
    # The file users apply, not the generator's output (test_crd in tests/operator checks they match).
    schema = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    strict = crd.strict_schema(schema)
    jsonschema.Draft4Validator.check_schema(strict)
    return jsonschema.Draft4Validator(strict)


def schema_errors(validator, doc) -> list[tuple[str, str]]:
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [(".".join(map(str, e.absolute_path)), e.message) for e in errors]


# (changes to the base document, [(path, message)] the schema gives)
CRD_CATALOGUE = [
    ({"spec__dataset": None}, [("spec", "'dataset' is a required property")]),
    ({"spec__model": {}}, [("spec.model", "'uri' is a required property")]),
    ({"spec": "lora"}, [("spec", "'lora' is not of type 'object'")]),
    ({"spec__trainig": {}}, [("spec", "Additional properties are not allowed ('trainig' was unexpected)")]),
    ({"spec__storage": {"secretAccessKey": "abc"}}, [("spec.storage", "Additional properties are not allowed ('secretAccessKey' was unexpected)")]),
    ({"spec__dataset__uri": ""}, [("spec.dataset.uri", "'' should be non-empty")]),
    ({"spec__training": {"learningRate": 0}}, [("spec.training.learningRate", "0 is less than or equal to the minimum of 0")]),
    ({"spec__training": {"learningRate": "1e-4"}}, [("spec.training.learningRate", "'1e-4' is not of type 'number'")]),
    ({"spec__training": {"seed": True}}, [("spec.training.seed", "True is not of type 'integer'")]),
    ({"spec__training": {"maxSteps": 1.5}}, [("spec.training.maxSteps", "1.5 is not of type 'integer', 'null'")]),
    ({"spec__model__trustRemoteCode": "yes"}, [("spec.model.trustRemoteCode", "'yes' is not of type 'boolean'")]),
    ({"spec__method": {"type": "dora"}}, [("spec.method.type", "'dora' is not one of ['freeze', 'lora', 'qlora', 'ptuning', 'prompt', 'full']")]),
    ({"spec__method": {"lora": {"targetModules": []}}}, [("spec.method.lora.targetModules", "[] should be non-empty")]),
    ({"spec__method": {"qlora": {"bits": 3}}}, [("spec.method.qlora.bits", "3 is not one of [4, 8]")]),
    ({"spec__distributed": {"nodes": 2000}}, [("spec.distributed.nodes", "2000 is greater than the maximum of 1024")]),
    ({"spec__distributed": {"zero": {"offload": "disk"}}}, [("spec.distributed.zero.offload", "'disk' is not one of ['none', 'optimizer', 'all']")]),
    ({"spec__resources": {"limits": {"cpu": 1.5}}}, [("spec.resources.limits.cpu", "1.5 is not of type 'integer', 'string'")]),
    ({"spec__nodeSelector": {"gpu": 1}}, [("spec.nodeSelector.gpu", "1 is not of type 'string'")]),
    ({"spec__tolerations": ["x"]}, [("spec.tolerations.0", "'x' is not of type 'object'")]),
    ({"spec__serving": {"replicas": -1}}, [("spec.serving.replicas", "-1 is less than the minimum of 0")]),
    ({"spec__serving": {"generation": {"topP": 1.5}}}, [("spec.serving.generation.topP", "1.5 is greater than the maximum of 1.0")]),
    ({"spec__runPolicy": {"suspend": "no"}}, [("spec.runPolicy.suspend", "'no' is not of type 'boolean'")]),
    ({"spec__checkpoint": {"keep": 0}}, [("spec.checkpoint.keep", "0 is less than the minimum of 1")]),
    ({"spec__dataset__validation": {"ratio": 1}}, [("spec.dataset.validation.ratio", "1 is greater than or equal to the maximum of 1.0")]),
    (
        {"spec__training": {"epochs": 0, "microBatchSize": 0}},
        [("spec.training.epochs", "0 is less than or equal to the minimum of 0"), ("spec.training.microBatchSize", "0 is less than the minimum of 1")],
    ),
]


def crd_document(changes: dict) -> dict:
    return document(**{k: (REMOVE if v is None else v) for k, v in changes.items()})


@pytest.mark.parametrize("changes, expected", CRD_CATALOGUE, ids=[next(iter(c)) for c, _ in CRD_CATALOGUE])
def test_apply_refuses(validator, changes, expected):
    assert schema_errors(validator, crd_document(changes)) == expected


def test_base_and_free_form_blocks_are_accepted(validator):
    assert schema_errors(validator, document()) == []
    # deepspeedConfig and affinity are Kubernetes/DeepSpeed syntax the schema does not model.
    doc = document(spec__affinity={"nodeAffinity": {"anything": 1}}, spec__distributed={"deepspeedConfig": {"x": {"y": [1]}}})
    assert schema_errors(validator, doc) == []


# Past the schema, refused by the spec model's cross-field rules: the operator must answer
# these with InvalidSpec (its tests use the same parse_job), never with a started pod.
PASS_SCHEMA_FAIL_SPEC = [
    {"spec__dataset__validation": {"ratio": 0.1, "uri": "s3://data/v.jsonl"}},
    {"spec__method": {"type": "full", "lora": {"r": 8}}},
    {"spec__method": {"type": "freeze"}},
    {"spec__method": {"type": "qlora"}, "spec__distributed": {"zero": {"stage": 3}}},
    {"spec__distributed": {"zero": {"stage": 0, "offload": "optimizer"}}},
    {"spec__training": {"maxLength": 512, "maxSourceLength": 600}},
    {"metadata__name": "Not_A_DNS_Name"},
]


@pytest.mark.parametrize("changes", PASS_SCHEMA_FAIL_SPEC, ids=lambda c: next(iter(c)))
def test_schema_passes_but_spec_refuses(validator, changes):
    doc = crd_document(changes)
    assert schema_errors(validator, doc) == []
    with pytest.raises(SpecError):
        parse_job(doc)


@pytest.mark.parametrize("changes, message", SEMANTIC_CATALOGUE, ids=[next(iter(c)) for c, _ in SEMANTIC_CATALOGUE])
def test_semantic_catalogue_reaches_the_operator(validator, changes, message):
    # Every semantic problem is invisible to the schema: only the operator can report it.
    doc = document(**changes)
    assert schema_errors(validator, doc) == []
    assert [str(p) for p in check_job(parse_job(doc), on_cluster=True)] == [message]
