"""Custom resources that the real API server refuses (the session's control plane, with the
checked-in CRD applied server-side): each bad document, created with dryRun and kubectl's
strict field validation (unknown fields are errors), gets the API server's own error with the
field named. And the other side: documents the schema lets through but the spec model or the
semantic checks refuse, which the operator must turn into InvalidSpec.
"""

from __future__ import annotations

import pytest
from kube_harness import ApiError, create_namespace, namespace_name
from test_spec_catalogue import REMOVE, SEMANTIC_CATALOGUE, document

from kubetune.api import crd
from kubetune.api.spec import SpecError, parse_job
from kubetune.api.validation import check_job


@pytest.fixture(scope="module")
def create(kube_api, finetunejob_crd):
    """Create a FineTuneJob as `kubectl apply` would (strict field validation), without
    storing it; returns the API server's error causes as (field, message), [] when accepted."""
    namespace = create_namespace(kube_api, namespace_name("crd-schema"))
    path = f"/apis/{crd.API_GROUP}/{crd.API_VERSION}/namespaces/{namespace}/{crd.PLURAL}"

    def causes(doc: dict) -> list[tuple[str, str]]:
        try:
            kube_api.request("POST", path, doc, params={"dryRun": "All", "fieldValidation": "Strict"})
        except ApiError as err:
            assert err.status in (400, 422), err
            details = err.body.get("details") or {}
            return sorted((c.get("field", ""), c["message"]) for c in details.get("causes") or [{"message": err.body["message"]}])
        return []

    yield causes
    kube_api.delete(f"/api/v1/namespaces/{namespace}")


# (changes to the base document, [(field, message)] the API server answers)
CRD_CATALOGUE = [
    ({"spec__dataset": None}, [("spec.dataset", "Required value")]),
    ({"spec__model": {}}, [("spec.model.uri", "Required value")]),
    ({"spec": "lora"}, [("spec", 'Invalid value: "string": spec in body must be of type object: "string"')]),
    ({"spec__trainig": {}}, [("", 'FineTuneJob in version "v1alpha1" cannot be handled as a FineTuneJob: strict decoding error: unknown field "spec.trainig"')]),
    ({"spec__storage": {"secretAccessKey": "abc"}}, [("", 'FineTuneJob in version "v1alpha1" cannot be handled as a FineTuneJob: strict decoding error: unknown field "spec.storage.secretAccessKey"')]),
    ({"spec__dataset__uri": ""}, [("spec.dataset.uri", 'Invalid value: "": spec.dataset.uri in body should be at least 1 chars long')]),
    ({"spec__training": {"learningRate": 0}}, [("spec.training.learningRate", "Invalid value: 0: spec.training.learningRate in body should be greater than 0")]),
    ({"spec__training": {"learningRate": "1e-4"}}, [("spec.training.learningRate", 'Invalid value: "string": spec.training.learningRate in body must be of type number: "string"')]),
    ({"spec__training": {"seed": True}}, [("spec.training.seed", 'Invalid value: "boolean": spec.training.seed in body must be of type integer: "boolean"')]),
    (
        {"spec__training": {"maxSteps": 1.5}},
        [
            ("<nil>", 'Invalid value: "": Checked value must be of type integer (default format) in spec.training.maxSteps'),
            ("spec.training.maxSteps", 'Invalid value: "number": spec.training.maxSteps in body must be of type integer: "number"'),
        ],
    ),
    ({"spec__model__trustRemoteCode": "yes"}, [("spec.model.trustRemoteCode", 'Invalid value: "string": spec.model.trustRemoteCode in body must be of type boolean: "string"')]),
    ({"spec__method": {"type": "dora"}}, [("spec.method.type", 'Unsupported value: "dora": supported values: "freeze", "lora", "qlora", "ptuning", "prompt", "full"')]),
    ({"spec__method": {"lora": {"targetModules": []}}}, [("spec.method.lora.targetModules", "Invalid value: 0: spec.method.lora.targetModules in body should have at least 1 items")]),
    ({"spec__method": {"qlora": {"bits": 3}}}, [("spec.method.qlora.bits", 'Unsupported value: 3: supported values: "4", "8"')]),
    ({"spec__distributed": {"nodes": 2000}}, [("spec.distributed.nodes", "Invalid value: 2000: spec.distributed.nodes in body should be less than or equal to 1024")]),
    ({"spec__distributed": {"zero": {"offload": "disk"}}}, [("spec.distributed.zero.offload", 'Unsupported value: "disk": supported values: "none", "optimizer", "all"')]),
    ({"spec__resources": {"limits": {"cpu": 1.5}}}, [("spec.resources.limits.cpu", 'Invalid value: "number": spec.resources.limits.cpu in body must be of type integer,string: "number"')]),
    ({"spec__nodeSelector": {"gpu": 1}}, [("spec.nodeSelector.gpu", 'Invalid value: "integer": spec.nodeSelector.gpu in body must be of type string: "integer"')]),
    ({"spec__tolerations": ["x"]}, [("spec.tolerations[0]", 'Invalid value: "string": spec.tolerations[0] in body must be of type object: "string"')]),
    ({"spec__serving": {"replicas": -1}}, [("spec.serving.replicas", "Invalid value: -1: spec.serving.replicas in body should be greater than or equal to 0")]),
    ({"spec__serving": {"generation": {"topP": 1.5}}}, [("spec.serving.generation.topP", "Invalid value: 1.5: spec.serving.generation.topP in body should be less than or equal to 1")]),
    ({"spec__runPolicy": {"suspend": "no"}}, [("spec.runPolicy.suspend", 'Invalid value: "string": spec.runPolicy.suspend in body must be of type boolean: "string"')]),
    ({"spec__checkpoint": {"keep": 0}}, [("spec.checkpoint.keep", "Invalid value: 0: spec.checkpoint.keep in body should be greater than or equal to 1")]),
    ({"spec__dataset__validation": {"ratio": 1}}, [("spec.dataset.validation.ratio", "Invalid value: 1: spec.dataset.validation.ratio in body should be less than 1")]),
    (
        {"spec__training": {"epochs": 0, "microBatchSize": 0}},
        [
            ("spec.training.epochs", "Invalid value: 0: spec.training.epochs in body should be greater than 0"),
            ("spec.training.microBatchSize", "Invalid value: 0: spec.training.microBatchSize in body should be greater than or equal to 1"),
        ],
    ),
    # Not the CRD's schema: the API server's own rule for object names (the spec model refuses it too).
    ({"metadata__name": "Not_A_DNS_Name"}, [("metadata.name", "Invalid value: \"Not_A_DNS_Name\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')")]),
]


def crd_document(changes: dict) -> dict:
    return document(**{k: (REMOVE if v is None else v) for k, v in changes.items()})


@pytest.mark.parametrize("changes, expected", CRD_CATALOGUE, ids=[next(iter(c)) for c, _ in CRD_CATALOGUE])
def test_apply_refuses(create, changes, expected):
    assert create(crd_document(changes)) == expected


def test_base_and_free_form_blocks_are_accepted(create):
    assert create(document()) == []
    # deepspeedConfig and affinity are Kubernetes/DeepSpeed syntax the schema does not model.
    doc = document(spec__affinity={"nodeAffinity": {"anything": 1}}, spec__distributed={"deepspeedConfig": {"x": {"y": [1]}}})
    assert create(doc) == []


# Past the schema, refused by the spec model's cross-field rules: the operator must answer
# these with InvalidSpec (its tests use the same parse_job), never with a started pod.
PASS_SCHEMA_FAIL_SPEC = [
    {"spec__dataset__validation": {"ratio": 0.1, "uri": "s3://data/v.jsonl"}},
    {"spec__method": {"type": "full", "lora": {"r": 8}}},
    {"spec__method": {"type": "freeze"}},
    {"spec__method": {"type": "qlora"}, "spec__distributed": {"zero": {"stage": 3}}},
    {"spec__distributed": {"zero": {"stage": 0, "offload": "optimizer"}}},
    {"spec__training": {"maxLength": 512, "maxSourceLength": 600}},
]


@pytest.mark.parametrize("changes", PASS_SCHEMA_FAIL_SPEC, ids=lambda c: next(iter(c)))
def test_schema_passes_but_spec_refuses(create, changes):
    doc = crd_document(changes)
    assert create(doc) == []
    with pytest.raises(SpecError):
        parse_job(doc)


@pytest.mark.parametrize("changes, message", SEMANTIC_CATALOGUE, ids=[next(iter(c)) for c, _ in SEMANTIC_CATALOGUE])
def test_semantic_catalogue_reaches_the_operator(create, changes, message):
    # Every semantic problem is invisible to the schema: only the operator can report it.
    doc = document(**changes)
    assert create(doc) == []
    assert [str(p) for p in check_job(parse_job(doc), on_cluster=True)] == [message]
