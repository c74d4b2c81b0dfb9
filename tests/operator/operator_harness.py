"""Test harness of the operator tests: REST calls for core kinds, the real kubectl, the real
operator (kopf, in-process in its own thread, restartable) and a polling helper.
(A uniquely named module: other test folders have their own conftest.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import kopf

from kube_emulator import Cluster
from kubetune_operator.handlers import build_registry, new_memo
from kubetune_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl") or str(Path(os.__file__).parents[3] / "bin" / "kubectl")


class Api:
    """Plain JSON REST calls for what kubectl would send as protobuf (core kinds)."""

    def __init__(self, url: str):
        self.url = url

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def create_secret(self, name: str, data: dict[str, str], namespace: str = "default") -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.request("POST", f"/api/v1/namespaces/{namespace}/secrets",
                     {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": encoded})  # fmt: skip

    def set_pod_status(self, name: str, phase: str, exit_code: Optional[int] = None, namespace: str = "default") -> None:
        status: dict[str, Any] = {"phase": phase}
        if exit_code is not None:
            status["containerStatuses"] = [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x", "imageID": "",
                                            "state": {"terminated": {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}}}]  # fmt: skip
        self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status}, "application/merge-patch+json")

    def set_deployment_ready(self, name: str, ready: int, namespace: str = "default") -> None:
        self.request("PATCH", f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}/status",
                     {"status": {"readyReplicas": ready}}, "application/merge-patch+json")  # fmt: skip

    def delete(self, plural: str, name: str, namespace: str = "default") -> None:
        prefix = "/apis/apps/v1" if plural == "deployments" else "/api/v1"
        self.request("DELETE", f"{prefix}/namespaces/{namespace}/{plural}/{name}")


class Kubectl:
    def __init__(self, cluster: Cluster, workdir: Path):
        self.env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        self.cache = workdir / "kubectl-cache"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([KUBECTL, f"--cache-dir={self.cache}", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def apply(self, path: str | Path) -> None:
        self("apply", "--validate=false", "-f", str(path))

    def get_json(self, *args: str) -> dict:
        return json.loads(self("get", *args, "-o", "json").stdout)


class Operator:
    """The real operator (all its handlers) in a thread with its own event loop."""

    def __init__(self, cluster: Cluster, settings: Settings):
        self.cluster = cluster
        self.settings = settings
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self) -> "Operator":
        self.stop_flag = threading.Event()
        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(kopf.operator(registry=build_registry(self.settings), memo=new_memo(self.settings), clusterwide=True,
                                          standalone=True, stop_flag=self.stop_flag, ready_flag=ready,
                                          liveness_endpoint=f"http://127.0.0.1:{self.settings.liveness_port}/healthz"))  # fmt: skip
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.error = err
                ready.set()

        self.thread = threading.Thread(target=run, name="operator", daemon=True)
        self.thread.start()
        assert ready.wait(30), "operator did not start"
        assert self.error is None, self.error
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.stop_flag.set()
            self.thread.join(30)
            assert not self.thread.is_alive(), "operator did not stop"
            self.thread = None


def wait_for(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition", interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except (AssertionError, KeyError, urllib.error.URLError):
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


