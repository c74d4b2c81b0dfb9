"""The local control plane itself: the real components at the stamped version, RBAC, Pod
Security admission, ServiceAccount tokens from the TokenRequest API, restarting a component,
and `scripts/local-cluster up/down` as a person runs it."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from kube_harness import KUBECTL, ApiError, KubeApi, Kubectl, wait_for, write_service_account_files
from localcluster import COMPONENTS, REPO, ControlPlane

pytestmark = pytest.mark.timeout(300)


def test_every_component_is_healthy_at_the_stamped_version(control_plane, kubectl):
    assert all(control_plane.healthy(name) for name in COMPONENTS)
    version = json.loads(kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert (version["gitVersion"], version["major"], version["minor"]) == ("v1.37.2", "1", "37")


def test_rbac_and_pod_security_are_enforced(control_plane, kube_api, kube_namespace, tmp_path):
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/serviceaccounts", {"metadata": {"name": "nobody"}})
    files = write_service_account_files(kube_api, control_plane, kube_namespace, "nobody", tmp_path / "sa")
    as_nobody = KubeApi.with_token(control_plane, files / "token")
    whoami = as_nobody.create("/apis/authentication.k8s.io/v1/selfsubjectreviews", {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{kube_namespace}:nobody"
    with pytest.raises(ApiError) as denied:
        as_nobody.get(f"/api/v1/namespaces/{kube_namespace}/secrets")
    assert denied.value.status == 403 and 'cannot list resource "secrets"' in str(denied.value)

    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
    with pytest.raises(ApiError) as refused:
        kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", plain)
    assert refused.value.status == 403
    assert 'violates PodSecurity "restricted:latest"' in str(refused.value) and "runAsNonRoot != true" in str(refused.value)
    plain["spec"]["containers"][0]["securityContext"] = {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", plain)


def test_service_account_files_rotate_in_place(control_plane, kube_api, kube_namespace, tmp_path):
    files = write_service_account_files(kube_api, control_plane, kube_namespace, "default", tmp_path / "sa", expiration_seconds=600)
    first = (files / "token").read_text()
    assert (files / "namespace").read_text() == kube_namespace
    assert (files / "ca.crt").read_text() == control_plane.ca_file.read_text()
    write_service_account_files(kube_api, control_plane, kube_namespace, "default", tmp_path / "sa")
    second = (files / "token").read_text()
    assert second != first and sorted(p.name for p in files.iterdir()) == ["ca.crt", "namespace", "token"]
    for token in (first, second):  # both are valid until they expire
        review = kube_api.create("/apis/authentication.k8s.io/v1/tokenreviews", {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}})
        assert review["status"]["authenticated"] is True


def test_api_server_restart_keeps_the_cluster(control_plane, kube_api, kube_namespace):
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/configmaps", {"metadata": {"name": "kept"}, "data": {"a": "1"}})
    control_plane.stop("kube-apiserver")
    with pytest.raises(OSError):
        kube_api.request("GET", f"/api/v1/namespaces/{kube_namespace}/configmaps/kept", timeout=2)
    control_plane.start("kube-apiserver")
    control_plane.wait_healthy("kube-apiserver", time.monotonic() + 120)
    assert kube_api.get(f"/api/v1/namespaces/{kube_namespace}/configmaps/kept")["data"] == {"a": "1"}


def test_local_cluster_script_up_and_down(tmp_path):
    """What the README tells a person to run; a second control plane beside the session's."""
    script = str(REPO / "scripts" / "local-cluster")
    root = tmp_path / "kt"
    up = subprocess.run([script, "up", str(root)], capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={root / 'kubeconfig'}" in up.stdout
        kubectl = Kubectl(root / "kubeconfig", None, tmp_path)
        assert "kube-node-lease" in kubectl("get", "namespaces").stdout
        again = subprocess.run([script, "up", str(root)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already runs etcd, kube-apiserver" in again.stderr
        pids = {name: int((root / "pids" / f"{name}.pid").read_text()) for name in COMPONENTS}
    finally:
        down = subprocess.run([script, "down", str(root)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not any(os.path.exists(f"/proc/{pid}") and ControlPlane(root)._alive(name, pid) for name, pid in pids.items())
    assert not list((root / "pids").iterdir())


def test_a_component_that_fails_is_named_with_its_log(tmp_path):
    root = tmp_path / "broken"
    plane = ControlPlane(root)
    plane.flags = lambda name, original=plane.flags: original(name) + (["--no-such-flag"] if name == "kube-apiserver" else [])
    with pytest.raises(Exception) as failed:
        plane.up(timeout=120)
    message = str(failed.value)
    assert message.startswith("kube-apiserver exited while starting") and "unknown flag: --no-such-flag" in message
    assert plane.pid("etcd") is None  # what did start was stopped again


def test_kubectl_is_the_1_37_client():
    client = json.loads(subprocess.run([KUBECTL, "version", "--client", "-o", "json"], capture_output=True, text=True, check=True).stdout)
    assert client["clientVersion"]["minor"] == "37"


def test_audit_log_records_clients_but_not_the_control_plane_or_node_agents(control_plane, kube_api, kube_namespace, node_agent, tmp_path):
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/serviceaccounts", {"metadata": {"name": "audited"}})
    files = write_service_account_files(kube_api, control_plane, kube_namespace, "audited", tmp_path / "sa")
    with pytest.raises(ApiError):
        KubeApi.with_token(control_plane, files / "token").get(f"/api/v1/namespaces/{kube_namespace}/pods")

    def events():
        return [json.loads(line) for line in control_plane.audit_log.read_text().splitlines()]

    user = f"system:serviceaccount:{kube_namespace}:audited"
    (denied,) = wait_for(lambda: [e for e in events() if e["user"]["username"] == user], 10, "the denied list audited")
    assert (denied["verb"], denied["objectRef"]["resource"], denied["objectRef"]["namespace"], denied["responseStatus"]["code"]) == (
        "list", "pods", kube_namespace, 403)  # fmt: skip
    assert any(e["user"]["username"] == "kubetune-admin" and e["verb"] == "create" and e["objectRef"]["resource"] == "serviceaccounts" for e in events())
    users = {e["user"]["username"] for e in events()}
    assert not any(u.startswith(("system:node:", "system:kube-", "system:serviceaccount:kube-system:")) for u in users), users
