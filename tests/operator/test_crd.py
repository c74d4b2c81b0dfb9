"""The checked-in CRD is the generated one, is structural, and accepts every example."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from kubetune.api import crd
from kubetune.api.spec import parse_job

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / crd.CRD_FILENAME
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml"))


def job_documents():
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "FineTuneJob":
                yield pytest.param(doc, id=f"{path.name}:{doc['metadata']['name']}")


def validate(doc: dict, strict: dict) -> None:
    jsonschema.Draft4Validator.check_schema(strict)
    jsonschema.Draft4Validator(strict).validate(doc)


def schema() -> dict:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_checked_in_crd_is_not_stale():
    assert CRD_FILE.read_text() == crd.render(), "crds/ is stale: run `make crds` (python -m kubetune.api.crd)"


def walk(node, path="$"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{path}.{key}")


def test_schema_is_structural_and_explainable():
    for path, node in walk(schema()):
        assert not {"$ref", "anyOf", "allOf", "oneOf", "title", "$defs"} & node.keys(), path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        if "properties" in node:
            assert "additionalProperties" not in node, path
            for name, child in node["properties"].items():
                if path != "$" or name in ("spec", "status"):
                    assert child.get("description"), f"{path}.{name} has no description"
        assert node.get("default") is not None or "default" not in node, path


def test_schema_carries_enums_bounds_defaults_and_required():
    spec = schema()["properties"]["spec"]
    props = spec["properties"]
    assert set(spec["required"]) == {"model", "dataset"}
    assert props["method"]["properties"]["type"]["enum"] == ["freeze", "lora", "qlora", "ptuning", "prompt", "full"]
    assert props["method"]["properties"]["type"]["default"] == "lora"
    nodes = props["distributed"]["properties"]["nodes"]
    assert (nodes["minimum"], nodes["maximum"], nodes["default"]) == (1, 1024, 1)
    assert props["distributed"]["properties"]["deepspeedConfig"]["x-kubernetes-preserve-unknown-fields"] is True
    assert props["resources"]["properties"]["limits"]["additionalProperties"] == {"x-kubernetes-int-or-string": True}
    assert props["checkpoint"]["properties"]["uri"]["nullable"] is True
    lr = props["training"]["properties"]["learningRate"]
    assert lr["exclusiveMinimum"] is True and lr["minimum"] == 0
    assert schema()["properties"]["status"]["properties"]["phase"]["enum"][0] == "Pending"


def test_crd_names_columns_and_status_subresource():
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert doc["spec"]["names"]["shortNames"] == ["ftj"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Method", "Progress", "Loss", "Restarts", "Kept", "Age"]


@pytest.mark.parametrize("doc", list(job_documents()))
def test_examples_validate_against_crd_and_spec(doc):
    validate(doc, crd.strict_schema(schema()))
    parse_job(doc)


def test_strict_schema_rejects_misspelled_and_out_of_range_fields():
    strict = crd.strict_schema(schema())
    base = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"},
            "spec": {"model": {"uri": "s3://m/x"}, "dataset": {"uri": "s3://d/x"}}}  # fmt: skip
    validate(base, strict)
    for bad in ({"trainig": {}}, {"distributed": {"nodes": 0}}, {"method": {"type": "dora"}},
                {"resources": {"limits": {"cpu": 1.5}}}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            validate({**base, "spec": {**base["spec"], **bad}}, strict)
    # Free-form blocks stay free-form.
    validate({**base, "spec": {**base["spec"], "distributed": {"deepspeedConfig": {"anything": {"goes": 1}}}}}, strict)


def test_every_example_exists():
    assert len(list(job_documents())) >= 4
