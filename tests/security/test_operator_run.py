"""The real operator (its own process, logged in as the chart's ServiceAccount, with the
chart's RBAC, DEBUG logging on) runs a FineTuneJob's whole life on the local control plane,
with real Secrets holding distinctive canary values and a real SeaweedFS server that only
accepts those keys (the operator reads progress.json with them). Recorded once, then checked:

- no canary (plain or base64) in any object but its Secret: children, ConfigMaps, the job's
  status, Events; nor in the operator's log, nor in its /metrics;
- every pod the operator really created is hardened (same check as the builder matrix), and
  the namespace's `restricted` Pod Security admission let each of them in;
- RBAC, from the API server's audit log: every request the operator made was allowed by the
  chart's rules, the operator's own client made only the calls it declares, and every rule
  the chart grants was used (or is a named kopf need that this run cannot exercise).
"""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from kube_harness import Kubectl, create_namespace, namespace_name
from operator_harness import EXAMPLE, AuditLog, Namespace, running_operator, wait_for
from test_pod_hardening import assert_hardened, pod_specs

from kubetune.api.progress import Progress
from kubetune.artifacts.embedded_s3 import SeaweedS3

CANARY_KEY_ID = "KTCANARYKEYID7F3A9C"
CANARY_SECRET = "kubetune-canary-secret-7f3a9c2e"
CANARY_TOKEN = "kubetune-canary-token-51d0b7aa"


def needles(*values: str) -> list[str]:
    return [*values, *(base64.b64encode(v.encode()).decode() for v in values)]


# The key ID is in every request's SigV4 Authorization header, which botocore's DEBUG wire
# log would print: the operator keeps botocore at INFO, so no level may show it either.
SECRETS = needles(CANARY_SECRET, CANARY_TOKEN, CANARY_KEY_ID)
KINDS = {"pods": "Pod", "services": "Service", "configmaps": "ConfigMap", "events": "Event", "deployments": "Deployment",
         "replicasets": "ReplicaSet", "finetunejobs": "FineTuneJob"}  # fmt: skip

pytestmark = pytest.mark.timeout(300)


class CanaryS3(SeaweedS3):
    ACCESS_KEY = CANARY_KEY_ID
    SECRET_KEY = CANARY_SECRET


@pytest.fixture(scope="module")
def life(control_plane, kube_api, finetunejob_crd, tmp_path_factory, request):
    """Run one job through every phase (and a failure, an operator restart, an InvalidSpec
    job and deletion); return what the cluster, the operator's log, /metrics and the audit
    log saw."""
    tmp = tmp_path_factory.mktemp("life")
    s3 = CanaryS3(tmp / "s3", buckets=("checkpoints",)).start()
    namespace = create_namespace(kube_api, namespace_name(request.node.name))
    ns = Namespace(kube_api, namespace)
    progress = Progress(phase="training", step=30, total_steps=120, loss=1.25)
    s3.client().put_object(Bucket="checkpoints", Key="qa-bot/progress.json", Body=progress.to_json())
    kubectl = Kubectl(control_plane.kubeconfig, namespace, tmp)
    try:
        with running_operator(control_plane, kube_api, namespace, tmp, verbose=True) as operator:
            doc = yaml.safe_load(EXAMPLE.read_text())
            doc["spec"]["storage"]["endpoint"] = s3.endpoint
            doc["spec"]["serving"]["authSecret"] = "serve-token"
            (tmp / "job.yaml").write_text(yaml.safe_dump(doc))
            ns.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET})
            ns.create_secret("serve-token", {"token": CANARY_TOKEN})
            kubectl.apply(tmp / "job.yaml")

            wait_for(lambda: len(ns.workers("qa-bot")) == 2, what="workers")
            ns.run_workers("qa-bot")
            wait_for(lambda: ns.status("qa-bot").get("progress", {}).get("step") == 30, what="progress read from S3 with the Secret's keys")
            ns.set_pod_status("qa-bot-worker-1", "Failed", exit_code=1)
            wait_for(lambda: ns.status("qa-bot").get("restarts") == 1 and len(ns.workers("qa-bot")) == 2, what="gang restart")
            operator.stop()
            operator.start()
            for name in ns.workers("qa-bot"):
                ns.set_pod_status(name, "Succeeded", exit_code=0)
            wait_for(lambda: ns.pods("qa-bot", "merge"), what="merge pod")
            ns.set_pod_status("qa-bot-merge", "Succeeded", exit_code=0)
            wait_for(lambda: ns.get("deployments", "qa-bot-serve"), what="serving")
            ns.make_ready("qa-bot-serve")
            wait_for(lambda: ns.status("qa-bot").get("phase") == "Serving" and ns.status("qa-bot").get("endpoint"), what="Serving")
            metrics = operator.metrics()

            doc["metadata"]["name"] = "no-secret"
            doc["spec"]["storage"]["credentialsSecret"] = "missing"
            (tmp / "bad.yaml").write_text(yaml.safe_dump(doc))
            kubectl.apply(tmp / "bad.yaml")
            wait_for(lambda: ns.status("no-secret").get("phase") == "Failed", what="InvalidSpec")

            objects = {plural: {n: {"kind": kind, **o} for n, o in ns.objects(plural).items()} for plural, kind in KINDS.items()}
            kubectl("delete", "ftj", "qa-bot", "no-secret", "--wait=false")
            wait_for(lambda: not ns.objects("finetunejobs"), what="deletion of the jobs (the operator's finalizer)")
        yield {"objects": objects, "log": operator.log(), "metrics": metrics, "audit": AuditLog(control_plane.audit_log).events(operator.user),
               "release": operator.release}  # fmt: skip
    finally:
        kube_api.delete(f"/api/v1/namespaces/{namespace}")
        s3.stop()


def test_no_secret_value_in_any_object_log_or_metric(life):
    found = []
    for plural, objects in life["objects"].items():
        for name, obj in objects.items():
            text = json.dumps(obj)
            found += [f"{plural}/{name}" for needle in SECRETS if needle in text]
    found += [f"log line: {line[:300]}" for line in life["log"].splitlines() for needle in SECRETS if needle in line]
    found += ["/metrics" for needle in SECRETS if needle in life["metrics"]]
    assert not found
    # The run really went through the places a leak could happen: the keys were read and used
    # (progress from the canary S3), a failure was reported, DEBUG logging was on.
    job = life["objects"]["finetunejobs"]["qa-bot"]
    assert job["status"]["progress"]["step"] == 30 and job["status"]["restarts"] == 1
    assert "qa-bot-worker-1" in json.dumps([e for e in life["objects"]["events"].values() if e["reason"] == "GangRestart"])
    assert {"qa-bot-config", "no-secret-config"} & set(life["objects"]["configmaps"])
    assert ("", "secrets", "get") in operator_calls(life["audit"]) and "[DEBUG" in life["log"]


def test_every_pod_the_operator_created_is_hardened_and_was_admitted(life):
    created = [obj for plural in ("pods", "deployments") for obj in life["objects"][plural].values()]
    specs = list(pod_specs(created))
    assert {w.split()[1] for w in (where for where, _ in specs)} >= {"qa-bot-worker-0", "qa-bot-worker-1", "qa-bot-merge", "qa-bot-serve"}
    for where, spec in specs:
        assert_hardened(spec, where)
    # The ReplicaSet controller's serving pod too; none was refused by `restricted` admission.
    assert any(n.startswith("qa-bot-serve-") for n in life["objects"]["pods"])
    refused = [e for e in life["audit"] if e["verb"] == "create" and e["responseStatus"]["code"] == 403]
    assert not refused and "Forbidden" not in {e["reason"] for e in life["objects"]["events"].values()}


# ---------------------------------------------------------------------------------------
# RBAC: the chart against what the operator really did (the API server's audit log)

# kopf's own cluster-wide observation (docs/deployment-rbac.yaml): CRDs and namespaces are
# watched only in modes this run does not use; kept, but named here.
KOPF_OWN = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
    ("", "namespaces", v) for v in ("list", "watch")
}


def operator_calls(events, agent: str = "") -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of the operator's requests (optionally only those
    whose User-Agent starts with `agent`), as the audit log names them."""
    return {c for e in events if e["userAgent"].startswith(agent) and (c := AuditLog.call(e)) is not None}


def declared_calls(calls) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of kube.CALLS entries written resource[/sub][.group]."""
    return {(group, resource, verb) for verb, name in calls for resource, _, group in [name.partition(".")]}


def test_every_call_the_operator_made_is_granted_by_the_chart(life):
    used = operator_calls(life["audit"])
    assert ("", "pods", "create") in used and ("kubetune.io", "finetunejobs/status", "patch") in used  # the run was real
    assert sorted(used - life["release"].grants()) == []
    # and the API server, enforcing exactly those rules, refused none of them
    assert not [AuditLog.call(e) for e in life["audit"] if e["responseStatus"]["code"] == 403]


def test_the_client_declares_every_call_it_makes(life):
    from kubetune_operator.kube import CALLS

    by_client = operator_calls(life["audit"], agent="python-httpx")
    assert ("", "pods", "create") in by_client
    assert sorted(by_client - declared_calls(CALLS)) == []


def test_the_chart_grants_nothing_the_operator_does_not_use(life):
    from kubetune_operator.kube import CALLS

    needed = operator_calls(life["audit"]) | declared_calls(CALLS) | KOPF_OWN
    assert sorted(life["release"].grants() - needed) == []
