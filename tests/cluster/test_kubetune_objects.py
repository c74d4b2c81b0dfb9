"""KubeTune's own objects on the real API server, no operator running: the checked-in CRD
(applied server-side) serves `kubectl explain` with its descriptions and `kubectl get ftj`
with its printer columns, status goes only through the status subresource, and the Helm
chart's objects are accepted, its operator pod admitted under the `restricted` Pod Security
Standard. (The API server's schema errors for bad documents: tests/hostile/test_crd_schema.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import helm_python as helm
import pytest
import yaml
from kube_harness import Kubectl, create_namespace, namespace_name, wait_for

from kubetune.api import crd

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "crds" / crd.CRD_FILENAME).read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
JOB = {"apiVersion": f"{crd.API_GROUP}/{crd.API_VERSION}", "kind": "FineTuneJob", "metadata": {"name": "qa-bot"},
       "spec": {"model": {"uri": "s3://models/base"}, "dataset": {"uri": "s3://data/qa.jsonl"}, "output": {"uri": "s3://models/qa-bot"},
                "method": {"type": "lora"}}}  # fmt: skip
# The monitoring toggles render prometheus-operator kinds, whose CRDs no registry here ships.
DASHBOARDS_ONLY = {"monitoring": {"dashboards": {"enabled": True}}}

pytestmark = pytest.mark.timeout(300)


def words(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_crd_is_established_and_kubectl_explain_shows_its_descriptions(finetunejob_crd, kubectl):
    assert finetunejob_crd == crd.CRD_NAME
    explained = words(kubectl("explain", "ftj.spec.training").stdout)
    training = SCHEMA["properties"]["spec"]["properties"]["training"]
    assert words(training["description"]) in explained
    for field, schema in training["properties"].items():
        assert f"{field} <" in explained, field
        assert words(schema["description"])[:60] in explained, field


def test_kubectl_get_shows_the_printer_columns_and_status_is_a_subresource(finetunejob_crd, kubectl, kube_api, kube_namespace):
    kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(JOB))
    path = f"/apis/{crd.API_GROUP}/{crd.API_VERSION}/namespaces/{kube_namespace}/{crd.PLURAL}/qa-bot"
    status = {"phase": "Running", "progress": {"step": 40, "totalSteps": 100, "summary": "40/100"}, "loss": 1.25, "restarts": 2}
    # Status written with the main resource is dropped; through the subresource it sticks.
    kube_api.patch(path, {"status": {"phase": "Succeeded"}})
    assert "status" not in kube_api.get(path)
    kube_api.patch(path + "/status", {"status": status})
    header, row = kubectl("get", "ftj", "qa-bot").stdout.splitlines()
    columns = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
    assert header.split() == ["NAME", *(c["name"].upper() for c in columns if not c.get("priority"))]
    wide_header = kubectl("get", "ftj", "qa-bot", "-o", "wide").stdout.splitlines()[0]
    assert wide_header.split() == ["NAME", *(c["name"].upper() for c in columns)]
    assert row.split()[:6] == ["qa-bot", "Running", "lora", "40/100", "1.25", "2"]


def test_helm_chart_objects_are_accepted_and_the_operator_pod_admitted(finetunejob_crd, control_plane, kube_api, tmp_path):
    """Both RBAC modes (cluster-wide, watched namespaces) with the dashboards, applied
    server-side into namespaces that enforce `restricted`: the ReplicaSet controller can
    create the operator's pod there."""
    release_namespace = create_namespace(kube_api, namespace_name("kubetune-system"))
    watched = create_namespace(kube_api, namespace_name("team-a"))
    kubectl = Kubectl(control_plane.kubeconfig, None, tmp_path)  # every rendered object names its namespace
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        for release, values in (("kt", DASHBOARDS_ONLY), ("ktns", {"watchNamespaces": [watched], **DASHBOARDS_ONLY})):
            rendered = chart.render(values, name=release, namespace=release_namespace, is_install=True)
            objects = [o for path, text in sorted(rendered.items()) if path.endswith(".yaml") for o in yaml.safe_load_all(text) if o]
            manifest = tmp_path / f"{release}.yaml"
            manifest.write_text(yaml.safe_dump_all(objects))
            applied = kubectl("apply", "--server-side", "--field-manager=helm", "-f", str(manifest), "-o", "name").stdout.split()
            assert len(applied) == len(objects) and {o["kind"] for o in objects} >= {"Deployment", "ServiceAccount", "ConfigMap"}
            assert kubectl("get", "-f", str(manifest), "-o", "name").stdout.split() == applied
            assert any(o["kind"] == "Role" and o["metadata"]["namespace"] == watched for o in objects) == (release == "ktns")

            deployment = next(o for o in objects if o["kind"] == "Deployment")
            selector = ",".join(f"{k}={v}" for k, v in deployment["spec"]["selector"]["matchLabels"].items())
            pods = wait_for(lambda: kube_api.get(f"/api/v1/namespaces/{release_namespace}/pods", labelSelector=selector)["items"], 60,
                            f"{release}'s operator pod created (admitted as restricted)")  # fmt: skip
            assert pods[0]["spec"]["serviceAccountName"] == deployment["spec"]["template"]["spec"]["serviceAccountName"]
            kubectl("delete", "-f", str(manifest), "--wait=false")
    for namespace in (release_namespace, watched):
        kube_api.delete(f"/api/v1/namespaces/{namespace}")
