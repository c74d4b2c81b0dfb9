"""The real operator (kopf, in-process) runs a FineTuneJob's whole life on kmock with real
Secrets holding distinctive canary values and a real SeaweedFS server that only accepts those
keys (the operator reads progress.json with them). Recorded once, then checked:

- no canary (plain or base64) in any object but its Secret: children, ConfigMaps, the job's
  status, Events; nor in any operator log record, nor in the operator's /metrics;
- every pod the operator really created is hardened (same check as the builder matrix);
- RBAC: every API request the operator made is granted by the chart's rules, and every rule
  the chart grants was used (or is a named kopf need that this run cannot exercise).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import urllib.request
from pathlib import Path

import helm_python as helm
import pytest
import yaml

import operator_harness as harness
from kube_emulator import Cluster
from kubetune.progress import Progress
from kubetune.testing import SeaweedS3, free_port
from kubetune_operator.settings import Settings
from test_pod_hardening import assert_hardened, pod_specs

REPO = Path(__file__).resolve().parents[2]
CANARY_KEY_ID = "KTCANARYKEYID7F3A9C"
CANARY_SECRET = "kubetune-canary-secret-7f3a9c2e"
CANARY_TOKEN = "kubetune-canary-token-51d0b7aa"

def needles(*values: str) -> list[str]:
    return [*values, *(base64.b64encode(v.encode()).decode() for v in values)]


# The key ID is in every request's SigV4 Authorization header, which botocore's DEBUG wire
# log would print: the operator keeps botocore at INFO, so no level may show it either.
SECRETS = needles(CANARY_SECRET, CANARY_TOKEN, CANARY_KEY_ID)
KINDS = {"pods": "", "services": "", "configmaps": "", "events": "", "deployments": "apps", "finetunejobs": "kubetune.io"}

pytestmark = pytest.mark.timeout(300)


class CanaryS3(SeaweedS3):
    ACCESS_KEY = CANARY_KEY_ID
    SECRET_KEY = CANARY_SECRET


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, f"{record.name} {record.getMessage()} {record.exc_text or ''}"))


@pytest.fixture(scope="module")
def life(tmp_path_factory):
    """Run one job through every phase (and a failure, an operator restart, an InvalidSpec
    job and deletion); return what the cluster, the logs and /metrics saw."""
    tmp = tmp_path_factory.mktemp("life")
    s3 = CanaryS3(tmp / "s3", buckets=("checkpoints",)).start()
    cluster = Cluster(tmp).start()
    api, kubectl = harness.Api(cluster.url), harness.Kubectl(cluster, tmp)
    settings = Settings(reconcile_interval=0.3, metrics_port=free_port(), liveness_port=free_port(), trainer_image="kubetune/trainer:test",
                        progress_retry_seconds=0.5)  # fmt: skip
    progress = Progress(phase="training", step=30, total_steps=120, loss=1.25)
    s3.client().put_object(Bucket="checkpoints", Key="qa-bot/progress.json", Body=progress.to_json())
    records = Records()  # from here on, only the operator logs (and the harness, which never sees keys)
    root = logging.getLogger()
    root.addHandler(records)
    old_level = root.level
    root.setLevel(logging.DEBUG)
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    operator = harness.Operator(cluster, settings).start()

    def wait_for(predicate, what):
        # Generous: the suite shares two cores with everything else.
        return harness.wait_for(predicate, timeout=90, what=what)

    try:
        doc = yaml.safe_load((REPO / "examples" / "lora-multinode.yaml").read_text())
        doc["spec"]["storage"]["endpoint"] = s3.endpoint
        doc["spec"]["serving"]["authSecret"] = "serve-token"
        (tmp / "job.yaml").write_text(yaml.safe_dump(doc))
        api.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": CANARY_KEY_ID, "AWS_SECRET_ACCESS_KEY": CANARY_SECRET})
        api.create_secret("serve-token", {"token": CANARY_TOKEN})
        kubectl.apply(tmp / "job.yaml")

        def status():
            return kubectl.get_json("ftj", "qa-bot").get("status") or {}

        def workers():
            return {n for n, p in cluster.objects("pods").items() if p["metadata"]["labels"].get("kubetune.io/role") == "worker"}

        wait_for(lambda: len(workers()) == 2, what="workers")
        for name in workers():
            api.set_pod_status(name, "Running")
        wait_for(lambda: status().get("progress", {}).get("step") == 30, what="progress read from S3 with the Secret's keys")
        cluster.run(lambda e: e.logs.__setitem__(("default", "qa-bot-worker-1"), "step 31\nRuntimeError: boom\n"))
        api.set_pod_status("qa-bot-worker-1", "Failed", exit_code=1)
        wait_for(lambda: status().get("restarts") == 1 and len(workers()) == 2, what="gang restart")
        operator.stop()
        operator = harness.Operator(cluster, settings).start()
        for name in workers():
            api.set_pod_status(name, "Succeeded", exit_code=0)
        wait_for(lambda: "qa-bot-merge" in cluster.objects("pods"), what="merge pod")
        api.set_pod_status("qa-bot-merge", "Succeeded", exit_code=0)
        wait_for(lambda: "qa-bot-serve" in cluster.objects("deployments"), what="serving")
        api.set_deployment_ready("qa-bot-serve", 1)
        wait_for(lambda: status().get("phase") == "Serving" and status().get("endpoint"), what="Serving")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=5).read().decode()

        doc["metadata"]["name"] = "no-secret"
        doc["spec"]["storage"]["credentialsSecret"] = "missing"
        (tmp / "bad.yaml").write_text(yaml.safe_dump(doc))
        kubectl.apply(tmp / "bad.yaml")
        wait_for(lambda: (kubectl.get_json("ftj", "no-secret").get("status") or {}).get("phase") == "Failed", what="InvalidSpec")

        objects = {plural: cluster.objects(plural) for plural in KINDS}
        cluster.run(lambda e: setattr(e, "gc_enabled", False))  # the operator must delete its children itself
        kubectl("delete", "ftj", "qa-bot", "no-secret", "--wait=false")
        wait_for(lambda: not any(cluster.objects(p) for p in KINDS if p != "events"), what="deletion of jobs and children")
        requests = cluster.run(lambda e: [(r.method.value if hasattr(r.method, "value") else str(r.method), r.resource, r.subresource, r.name, dict(r.params), r.headers.get("User-Agent", ""))
                                          for r in list(e)])  # fmt: skip
        yield {"objects": objects, "logs": records.lines, "metrics": metrics, "requests": requests}
    finally:
        operator.stop()
        root.removeHandler(records)
        root.setLevel(old_level)
        os.environ.pop("KUBECONFIG", None)
        cluster.stop()
        s3.stop()


def test_no_secret_value_in_any_object_log_or_metric(life):
    everything = SECRETS
    found = []
    for plural, objects in life["objects"].items():
        for name, obj in objects.items():
            text = json.dumps(obj)
            found += [f"{plural}/{name}" for needle in everything if needle in text]
    for level, line in life["logs"]:
        found += [f"log: {line[:300]}" for needle in everything if needle in line]
    found += ["/metrics" for needle in everything if needle in life["metrics"]]
    assert not found
    # The run really went through the places a leak could happen.
    job = life["objects"]["finetunejobs"]["qa-bot"]
    assert job["status"]["progress"]["step"] == 30 and job["status"]["restarts"] == 1
    assert "RuntimeError: boom" in job["status"].get("failure", "") or any("boom" in json.dumps(e) for e in life["objects"]["events"].values())
    assert {"qa-bot-config", "no-secret-config"} & set(life["objects"]["configmaps"])
    assert any(r[1] is not None and r[1].plural == "secrets" for r in life["requests"])


def test_every_pod_the_operator_created_is_hardened(life):
    created = [obj for plural in ("pods", "deployments") for obj in life["objects"][plural].values()]
    specs = list(pod_specs(created))
    assert {w.split()[1] for w in (where for where, _ in specs)} >= {"qa-bot-worker-0", "qa-bot-worker-1", "qa-bot-merge", "qa-bot-serve"}
    for where, spec in specs:
        assert_hardened(spec, where)



# ---------------------------------------------------------------------------------------
# RBAC: the chart against what the operator really did

# kopf's own cluster-wide observation (docs/deployment-rbac.yaml): it watches CRDs and
# namespaces only in modes this in-process run does not use; kept, but named here.
KOPF_OWN = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
    ("", "namespaces", v) for v in ("list", "watch")
}


def operator_calls(requests) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of each request kopf or the operator's client
    sent (kubectl and the test's own urllib calls stand for the user and the kubelet)."""
    calls = set()
    for method, resource, sub, name, params, agent in requests:
        if resource is None or resource.plural is None or not (agent.startswith("kopf/") or "httpx" in agent):
            continue  # discovery (non-resource URLs) or not the operator
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete" if name else "deletecollection"}.get(method)
        if method == "GET":
            verb = "get" if name else ("watch" if params.get("watch") in ("true", "1") else "list")
        calls.add((resource.group or "", resource.plural + (f"/{sub}" if sub else ""), verb))
    return calls


def declared_calls(calls) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of kube.CALLS entries written resource[/sub][.group]."""
    return {(group, resource, verb) for verb, name in calls for resource, _, group in [name.partition(".")]}


@pytest.fixture(scope="module")
def chart_grants() -> set[tuple[str, str, str]]:
    with helm.Chart.load(REPO / "charts" / "kubetune") as chart:
        rendered = chart.render({}, name="kt", namespace="kubetune-system", is_install=True)
    roles = [o for path, text in rendered.items() if path.endswith(".yaml")
             for o in yaml.safe_load_all(text) if o and o["kind"] in ("ClusterRole", "Role")]  # fmt: skip
    return {(g, r, v) for role in roles for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_every_call_the_operator_made_is_granted_by_the_chart(life, chart_grants):
    used = operator_calls(life["requests"])
    assert ("", "pods", "create") in used and ("kubetune.io", "finetunejobs/status", "patch") in used  # the run was real
    assert sorted(used - chart_grants) == []


def test_the_client_declares_every_call_it_makes(life):
    from kubetune_operator.kube import CALLS

    declared = declared_calls(CALLS)
    by_client = {c for c in operator_calls([r for r in life["requests"] if "httpx" in r[5]])}
    assert sorted(by_client - declared) == []


def test_the_chart_grants_nothing_the_operator_does_not_use(life, chart_grants):
    from kubetune_operator.kube import CALLS

    declared = declared_calls(CALLS)
    needed = operator_calls(life["requests"]) | declared | KOPF_OWN
    assert sorted(chart_grants - needed) == []
