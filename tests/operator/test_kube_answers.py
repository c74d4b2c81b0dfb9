"""The operator's client (kubetune_operator/kube.py) on answers the real API server never
gives, which kmock scripts: a refusal that is not a Kubernetes Status object (plain text or
HTML from a proxy or gateway in front of the API server) must still name the call that was
refused. Everything else of the client runs against the real API server (test_operator.py,
test_real_api.py)."""

from __future__ import annotations

import pytest
import yaml

from kubetune_operator.kube import ApiError, Kube, load_config

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "qa-bot-worker-0", "namespace": "jobs"},
       "spec": {"containers": [{"name": "trainer", "image": "kubetune/trainer"}]}}  # fmt: skip


@pytest.fixture
def kube(kmock, tmp_path, monkeypatch) -> Kube:
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "jobs"}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    return Kube(load_config())


@pytest.mark.asyncio
async def test_a_refusal_without_a_status_object_still_names_the_call(kmock, kube):
    kmock["post /api/v1/namespaces/jobs/pods"] << 403 << b"<html>denied by the gateway</html>"
    with pytest.raises(ApiError) as refused:
        await kube.create(POD)
    assert refused.value.status == 403 and (refused.value.verb, refused.value.resource) == ("create", "pods")
    assert str(refused.value) == "create pods jobs/qa-bot-worker-0: HTTP 403 Forbidden: <html>denied by the gateway</html>"
    await kube.close()


@pytest.mark.asyncio
async def test_a_missing_object_without_a_status_object_is_absent(kmock, kube):
    kmock["get /api/v1/namespaces/jobs/configmaps/qa-bot-config"] << 404 << b"not here"
    assert await kube.get("ConfigMap", "jobs", "qa-bot-config") is None
    await kube.close()
