"""What only a real API server does to the operator, each its own test: a watch that resumes
from an expired resourceVersion (410 Gone), the API server restarted mid-job, a rotated
ServiceAccount token (the operator's, and its client's in-cluster config alone), and an RBAC
rule taken away. (Status conflicts: test_operator.py;
garbage collection of a deleted job's children: test_operator.py.)"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from kube_harness import ApiError, KubeApi, write_service_account_files
from operator_harness import EXAMPLE, path, start_example, wait_for

JOB = "qa-bot"
WORKERS = (f"{JOB}-worker-0", f"{JOB}-worker-1")

pytestmark = pytest.mark.timeout(300)


def restart_api_server(plane, down_seconds: float = 0.0) -> None:
    plane.stop("kube-apiserver")
    time.sleep(down_seconds)
    plane.start("kube-apiserver")
    plane.wait_healthy("kube-apiserver", time.monotonic() + 120)


def children_uids(ns) -> dict[tuple[str, str], str]:
    found = {("pods", n): p["metadata"]["uid"] for n, p in ns.pods(JOB).items()}
    for plural in ("configmaps", "services"):
        found.update({(plural, n): o["metadata"]["uid"] for n, o in ns.objects(plural).items() if n.startswith(f"{JOB}-")})
    return found


@pytest.mark.parametrize("operator_options", [{"verbose": True}])
def test_a_watch_that_expired_resumes_with_a_new_list(operator, ns, kubectl, kube_api, control_plane, tmp_path):
    start_example(ns, kubectl)
    ns.run_workers(JOB)
    wait_for(ns.phase_is(JOB, "Running"))
    # etcd's revision moves past the last FineTuneJob event the operator saw; a restarted API
    # server's watch cache starts at the current revision, so the operator's watch, resuming
    # from its last resourceVersion, is answered 410 Gone: kopf lists again and watches on.
    kube_api.create(path(ns.name, "configmaps"), {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "revision-marker"}})
    restart_api_server(control_plane)
    wait_for(lambda: "Restarting the watch-stream" in operator.log(), 120, "kopf's watch answered 410 Gone and restarted")

    # Events after the new list reach the operator: a new job gets its children, and a change
    # to the running one is acted on.
    start_example(ns, kubectl, tmp_path, name="second")
    kubectl("patch", "ftj", JOB, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}')
    wait_for(ns.phase_is(JOB, "Suspended"), what="the running job suspended after the new list")
    assert wait_for(ns.phase_is("second", "Pending"))["startTime"]


def test_api_server_restarted_mid_job(operator, ns, kubectl, control_plane, audit):
    start_example(ns, kubectl)
    ns.run_workers(JOB)
    wait_for(ns.phase_is(JOB, "Running"))
    before = children_uids(ns)
    pid = operator.proc.pid
    restart_api_server(control_plane, down_seconds=5)  # the operator's calls fail meanwhile

    # The same operator process carries on: the job finishes training and merges.
    for name in WORKERS:
        ns.set_pod_status(name, "Succeeded", exit_code=0)
    wait_for(ns.phase_is(JOB, "Merging"), 120)
    wait_for(lambda: ns.pods(JOB, "merge"), what="merge pod")
    ns.set_pod_status(f"{JOB}-merge", "Succeeded", exit_code=0)
    st = wait_for(ns.phase_is(JOB, "Serving"), 120)
    assert operator.proc.pid == pid and st["restarts"] == 0
    # No child was created twice: each kept its uid, and the operator created each once.
    after = children_uids(ns)
    assert {k: v for k, v in after.items() if k in before} == before
    assert sorted(audit.created(operator.user, "pods", ns.name)) == sorted([*WORKERS, f"{JOB}-merge"])
    assert audit.created(operator.user, "configmaps", ns.name) == [f"{JOB}-config"]


def credential_id(token: str) -> str:
    """How the audit log names a ServiceAccount token (its JWT ID)."""
    payload = token.split(".")[1]
    return "JTI=" + json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


def refused_status(api: KubeApi, namespace: str) -> int:
    """The status a request with this client's token is refused with (0: accepted; 403 is an
    authenticated request that RBAC refused)."""
    try:
        api.get(path(namespace, "configmaps", "kube-root-ca.crt"))
    except ApiError as err:
        return err.status
    return 0


def test_a_rotated_token_is_used_without_a_restart(operator, ns, kubectl, control_plane, audit, tmp_path):
    start_example(ns, kubectl)
    wait_for(ns.phase_is(JOB, "Pending"))
    pid, old_token = operator.proc.pid, (operator.credentials / "token").read_text()
    old_file = tmp_path / "old-token"
    old_file.write_text(old_token)

    # As the kubelet does: a new token in the file; then the old one stops working (here at
    # once: the Secret it is bound to is deleted, instead of waiting for its expiry).
    new_token = operator.rotate_token()
    operator.revoke_previous_token()
    with_old_token = KubeApi.with_token(control_plane, old_file)
    # The API server caches a token's successful authentication for up to 10 s.
    wait_for(lambda: refused_status(with_old_token, ns.name) == 401, 30, "the old token refused")

    # Both clients go on with the new token: kopf (the finalizer of a new job, Events) and the
    # operator's own (children, status).
    start_example(ns, kubectl, tmp_path, name="second")
    assert wait_for(ns.phase_is("second", "Pending"))["startTime"]
    wait_for(lambda: "Created" in ns.event_reasons("second"), what="the Created Event of the new job")
    assert operator.proc.pid == pid
    used = {(e["userAgent"].split("/")[0], e["user"]["extra"]["authentication.kubernetes.io/credential-id"][0])
            for e in audit.events(operator.user) if e["responseStatus"]["code"] < 400}  # fmt: skip
    assert {agent for agent, credential in used if credential == credential_id(new_token)} >= {"kopf", "python-httpx2"}


def test_a_missing_rbac_rule_is_named_in_the_log_and_an_event(operator, ns, kubectl, kube_api):
    (app,) = [r for r in operator.release.of_kind("ClusterRole") if r["metadata"]["name"].endswith("-app")]
    role_path = f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{app['metadata']['name']}"
    granted = app["rules"]
    without = [{**rule, "verbs": [v for v in rule["verbs"] if not (rule["resources"] == ["pods"] and v == "create")]} for rule in granted]
    assert without != granted
    kube_api.patch(role_path, {"rules": without})
    pid = operator.proc.pid

    ns.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
    kubectl.apply(EXAMPLE)
    event = wait_for(lambda: next((e for e in ns.events(JOB) if e["reason"] == "Forbidden"), None), what="a Forbidden Event")
    assert event["type"] == "Warning"
    message = event["message"]
    assert message.startswith(f"the API server refused to create pods in namespace {ns.name}: ")
    assert f'cannot create resource "pods" in API group "" in the namespace "{ns.name}"' in message and operator.user in message
    assert f"the API server refused to create pods in namespace {ns.name}" in operator.log()
    time.sleep(1.5)  # several runs: the log says it each time, the Event once
    assert ns.event_reasons(JOB).count("Forbidden") == 1 and not ns.workers(JOB)

    kube_api.patch(role_path, {"rules": granted})  # the rule back: the next run creates the workers
    wait_for(lambda: len(ns.workers(JOB)) == 2, what="workers once create pods is granted again")
    assert operator.proc.pid == pid


@pytest.mark.asyncio
async def test_in_cluster_config_verifies_the_ca_and_rereads_a_rotated_token(control_plane, kube_api, kube_namespace, tmp_path, monkeypatch):
    """The operator's client as a pod gets it: the service-account folder (token, ca.crt,
    namespace) and KUBERNETES_SERVICE_HOST/PORT. Its requests verify the API server against
    ca.crt; after the kubelet-style rotation and the old token's revocation, the next request's
    401 makes it read the file again, and kopf's next login reads the new token too."""
    from kubetune_operator.kube import Kube, connection_info, load_config

    ns = kube_namespace
    kube_api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "read-configmaps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]})  # fmt: skip
    kube_api.create(f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "read-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]})  # fmt: skip

    def bound_token(name: str) -> Path:
        secret = kube_api.create(path(ns, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}})
        bound = {"kind": "Secret", "apiVersion": "v1", "name": name, "uid": secret["metadata"]["uid"]}
        return write_service_account_files(kube_api, control_plane, ns, "default", tmp_path / "serviceaccount", bound_object=bound)

    folder = bound_token("first")
    first = (folder / "token").read_text()
    (tmp_path / "first-token").write_text(first)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(control_plane.ports.apiserver))
    config = load_config(service_account=str(folder))
    assert config.namespace == ns and connection_info(config).token == first
    kube = Kube(config)
    try:
        assert (await kube.get("ConfigMap", ns, "kube-root-ca.crt"))["data"]["ca.crt"] == control_plane.ca_file.read_text()
        bound_token("second")
        kube_api.delete(path(ns, "secrets", "first"))
        wait_for(lambda: refused_status(KubeApi.with_token(control_plane, tmp_path / "first-token"), ns) == 401, 30, "the first token refused")
        assert (await kube.get("ConfigMap", ns, "kube-root-ca.crt")) is not None  # a 401, the file read again, the request repeated
        assert connection_info(config).token == (folder / "token").read_text() != first
    finally:
        await kube.close()
