"""Shared helpers of the operator tests: example jobs and manifest validation."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

from kubetune.api.spec import FineTuneJob, parse_job

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
K8S_VERSION = "1.32"
# examples/quickstart.yaml is a local run (`kubetune run`, relative paths); the rest are for clusters.
LOCAL_EXAMPLES = ("quickstart.yaml",)


def cluster_examples() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.yaml")
                  if p.name not in LOCAL_EXAMPLES and yaml.safe_load(p.read_text()).get("kind") == "FineTuneJob")  # fmt: skip


def example(name: str, namespace: str = "default", uid: str = "0b6a2c1e-5d1f-4c1a-9e1b-1234567890ab") -> FineTuneJob:
    doc = yaml.safe_load((EXAMPLES / name).read_text())
    doc["metadata"].update(namespace=namespace, uid=uid, generation=1)
    return parse_job(doc, name)


def k8s_validate(manifest: dict) -> None:
    """Validate against the real Kubernetes OpenAPI schema; raises on the first error."""
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
