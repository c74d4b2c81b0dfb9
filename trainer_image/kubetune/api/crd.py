"""The FineTuneJob CustomResourceDefinition, generated from the pydantic spec model.

`python -m kubetune.api.crd` prints the CRD YAML checked in at crds/finetunejobs.kubetune.io.yaml
(`make crds`). The spec schema comes from `kubetune.api.spec.FineTuneJobSpec`; the status schema
from `FineTuneJobStatus` below (what the operator writes). Pydantic's JSON schema is turned
into a Kubernetes *structural* schema: $refs inlined, `X | None` as `nullable: true`, `int |
str` quantities as `x-kubernetes-int-or-string`, no titles, a description on every field.

Pure: imports pydantic and PyYAML only (the operator image has no torch).
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .spec import API_GROUP, API_VERSION, KIND, PLURAL, SHORT_NAME, FineTuneJobSpec, Phase

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILENAME = f"{CRD_NAME}.yaml"
LOST_SHOWN = 10  # lost probe questions kept in status.retention.lost


# ---------------------------------------------------------------------------------------
# status: written by the operator only


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(StatusModel):
    type: str = Field(description="Condition type: Ready, Training, Merged, Serving, InvalidSpec, Failed, SpecChangeRefused, Suspended.")
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: Optional[str] = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: Optional[int] = Field(None, description="metadata.generation this condition was computed from.")


class ProgressStatus(StatusModel):
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int = Field(0, description="Optimizer steps planned.")
    percent: float = Field(0.0, description="step / totalSteps in percent.")
    eta_seconds: Optional[float] = Field(None, description="Estimated seconds until training ends.")
    summary: str = Field("", description="step/totalSteps, for the Progress printer column.")


class OutputsStatus(StatusModel):
    adapter_uri: Optional[str] = Field(None, description="Where the trained adapter was written.")
    merged_uri: Optional[str] = Field(None, description="Where the merged (or fully trained) model was written.")


class RetentionStatus(StatusModel):
    probes: int = Field(0, description="Held-out probe questions the base model and the tuned model both answered (spec.retention.probes).")
    base_right: int = Field(0, description="Probes the base model answered right (its answer contained an expected phrase).")
    kept: int = Field(0, description="Of those, probes the tuned model still answers right.")
    kept_ratio: Optional[float] = Field(None, description="kept / baseRight, the share of general knowledge kept (absent when the base model answered none right).")
    warn_below: float = Field(0.9, description="spec.retention.probes.warnBelow: below it the operator emits one KnowledgeLost Warning Event.")
    lost: list[str] = Field(default_factory=list, description=f"Probe questions the base model answered right and the tuned model no longer does (the first {LOST_SHOWN}).")


class FineTuneJobStatus(StatusModel):
    phase: Optional[Phase] = Field(None, description="Pending | Running | Restarting | Merging | Serving | Succeeded | Failed | Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Detailed state with reasons and messages.")
    progress: Optional[ProgressStatus] = Field(None, description="Training progress read from the trainer's progress.json.")
    loss: Optional[float] = Field(None, description="Last logged training loss.")
    restarts: int = Field(0, description="Gang restarts so far (preemptions are not counted).")
    last_checkpoint: Optional[str] = Field(None, description="Newest complete checkpoint (URI).")
    outputs: Optional[OutputsStatus] = Field(None, description="Output locations once written.")
    endpoint: Optional[str] = Field(None, description="In-cluster URL of the inference server (OpenAI API under /v1).")
    observed_generation: Optional[int] = Field(None, description="metadata.generation the operator acted on.")
    training_generation: Optional[int] = Field(None, description="metadata.generation the running workers were started with.")
    start_time: Optional[str] = Field(None, description="When the workers were first created (RFC 3339).")
    completion_time: Optional[str] = Field(None, description="When the job reached Succeeded, Serving or Failed (RFC 3339).")
    failure_reason: Optional[str] = Field(None, description="Reason of the failure: InvalidSpec, InvalidInput, BackoffLimitExceeded, DeadlineExceeded, MergeFailed.")
    failure: Optional[str] = Field(None, description="Why the job failed: pod, exit code, last log lines.")
    attempt: int = Field(0, description="Gang generation, incremented on every gang restart; worker pods carry it as label kubetune.io/attempt.")
    last_failed_pod: Optional[str] = Field(None, description="Worker whose failure caused the last gang restart.")
    retention: Optional[RetentionStatus] = Field(None, description="How much general knowledge training kept (spec.retention), from the trainer's probes.")

    def condition(self, type_: str) -> Optional[Condition]:
        return next((c for c in self.conditions if c.type == type_), None)

    def document(self) -> dict[str, Any]:
        """The status as the API holds it: camelCase keys, unset (None) fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# ---------------------------------------------------------------------------------------
# pydantic JSON schema -> Kubernetes structural schema


class SchemaError(ValueError):
    pass


def _resolve(node: dict, defs: dict) -> dict:
    """Inline `$ref` (alone, with siblings, or wrapped in allOf) into one schema node."""
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node.update(node.pop("allOf")[0])
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = copy.deepcopy(target)
        merged.update(node)  # the field's own description/default win over the type's
        node = merged
    return node


def structural(node: dict, defs: dict, path: str = "") -> dict:
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    variants = node.pop("anyOf", None)
    nullable = False
    if variants is not None:
        resolved = [_resolve(v, defs) for v in variants]
        non_null = [v for v in resolved if v.get("type") != "null"]
        nullable = len(non_null) < len(resolved)
        types = sorted(v.get("type") for v in non_null)
        if len(non_null) == 1:
            node = {**non_null[0], **node}
        elif types == ["integer", "string"]:
            node = {**node, "x-kubernetes-int-or-string": True}
        else:
            raise SchemaError(f"{path}: union {types} has no structural form")
    for key in ("description", "type", "enum", "format", "pattern", "minimum", "maximum",
                "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems",
                "x-kubernetes-int-or-string", "x-kubernetes-preserve-unknown-fields"):
        if key in node:
            out[key] = node[key]
    # JSON Schema 2020 exclusive bounds are numbers; OpenAPI v3.0 (Kubernetes) uses booleans.
    for bound, flag in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in out and not isinstance(out[bound], bool):
            out[flag] = out.pop(bound)
            out[bound] = True
    if nullable:
        out["nullable"] = True
    if "default" in node and node["default"] is not None:
        out["default"] = node["default"]
    if "properties" in node:
        out["type"] = "object"
        out["properties"] = {k: structural(v, defs, f"{path}.{k}") for k, v in node["properties"].items()}
        for name, child in out["properties"].items():
            if not child.get("description"):
                raise SchemaError(f"{path}.{name}: field has no description (kubectl explain shows it)")
        if node.get("required"):
            out["required"] = list(node["required"])
    elif out.get("x-kubernetes-preserve-unknown-fields"):
        pass  # free-form (deepspeedConfig, affinity): no additionalProperties
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = structural(node["additionalProperties"], defs, f"{path}.*")
    if "items" in node:
        out["items"] = structural(node["items"], defs, f"{path}[]")
    if "type" not in out and not out.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{path}: no type in {node}")
    return out


def model_schema(model: type[BaseModel]) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    raw.setdefault("description", (model.__doc__ or model.__name__).strip().splitlines()[0])
    return structural(raw, defs, model.__name__)


def open_api_schema() -> dict:
    spec = model_schema(FineTuneJobSpec)
    spec["description"] = "What to fine-tune, how, where it runs and where the results go."
    status = model_schema(FineTuneJobStatus)
    status["description"] = "Written by the operator."
    return {
        "type": "object",
        "description": "A fine-tuning run: distributed training, LoRA merge and an inference server.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method.type", "description": "Fine-tuning method."},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary", "description": "Optimizer steps done/planned."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "description": "Last training loss."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "description": "Gang restarts."},
    {"name": "Kept", "type": "number", "jsonPath": ".status.retention.keptRatio", "priority": 1,
     "description": "Share of the probes the base model answered right that the tuned model still answers right (spec.retention)."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def build_crd() -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["kubetune", "all"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def strict_schema(schema: dict) -> dict:
    """The CRD schema as draft-4 JSON Schema (OpenAPI 3.0's boolean exclusive bounds) for
    `jsonschema.Draft4Validator`, with unknown fields rejected as `kubectl apply`
    (fieldValidation=Strict) does, nullable as a null type, int-or-string as such."""
    schema = copy.deepcopy(schema)

    def walk(node: dict) -> None:
        if node.pop("x-kubernetes-int-or-string", False):
            node["type"] = ["integer", "string"]
        if node.pop("nullable", False):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = node["enum"] + [None]
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for child in node.get("properties", {}).values():
            walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])

    walk(schema)
    return schema


def render() -> str:
    header = "# Generated by `python -m kubetune.api.crd` from kubetune/api/spec.py; do not edit (make crds).\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
