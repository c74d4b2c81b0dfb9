"""The operator tests' harness on the local control plane (tests/cluster): the Helm chart's
ServiceAccount and RBAC applied with the real kubectl, the real operator (`python -m
kubetune_operator`, what its image runs) in its own process, authenticated as that
ServiceAccount with a TokenRequest token written like a projected volume, and the test's
view of a namespace: the admin's API calls, pod status written as the kubelet would, and
the API server's audit log of what the operator called.

(A uniquely named module: other test folders import it by name and have their own conftest.py.)
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import helm_python as helm
import pytest
import yaml
from kube_harness import ApiError, KubeApi, Kubectl, write_service_account_files
from kube_harness import wait_for as _wait_for
from localcluster import ControlPlane

from kubetune.api.spec import API_GROUP, API_VERSION, PLURAL
from kubetune.artifacts.net import free_port

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
EXAMPLE = REPO / "examples" / "lora-multinode.yaml"
ACCESS_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding")
# plural -> API prefix
PREFIXES = {"deployments": "/apis/apps/v1", "replicasets": "/apis/apps/v1", PLURAL: f"/apis/{API_GROUP}/{API_VERSION}"}
# Seconds between two runs of the operator's reconciliation in these tests (10 s in the chart).
RECONCILE_INTERVAL = "0.3"


def wait_for(predicate, timeout: float = 60, what: str = "condition", interval: float = 0.1) -> Any:
    """Poll until truthy. Generous by default: the suite shares two cores with everything else."""
    return _wait_for(predicate, timeout, what, interval)


# ---------------------------------------------------------------------------------------
# the chart


@dataclass
class ChartRelease:
    """The chart rendered by the real Helm engine (helm-python-sdk), as `helm install` would."""

    name: str
    namespace: str
    objects: list[dict]

    @classmethod
    def render(cls, name: str, namespace: str, values: Optional[dict] = None) -> "ChartRelease":
        with helm.Chart.load(CHART) as chart:
            manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
        objects = [o for path, text in sorted(manifests.items()) if path.endswith(".yaml") for o in yaml.safe_load_all(text) if o]
        return cls(name, namespace, objects)

    def of_kind(self, *kinds: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] in kinds]

    @property
    def operator_container(self) -> dict:
        (deployment,) = self.of_kind("Deployment")
        return deployment["spec"]["template"]["spec"]["containers"][0]

    @property
    def service_account(self) -> str:
        (deployment,) = self.of_kind("Deployment")
        return deployment["spec"]["template"]["spec"]["serviceAccountName"]

    def operator_env(self) -> dict[str, str]:
        return {e["name"]: e["value"] for e in self.operator_container.get("env", [])}

    def grants(self) -> set[tuple[str, str, str]]:
        """(group, resource[/subresource], verb) of every rule of the chart's (Cluster)Roles."""
        return {(g, r, v) for role in self.of_kind("ClusterRole", "Role") for rule in role["rules"]
                for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}  # fmt: skip

    def install(self, kubectl: Kubectl, workdir: Path) -> None:
        """Apply the ServiceAccounts and RBAC objects (not the operator's Deployment: the operator
        runs here as a process, with the Deployment's environment)."""
        path = workdir / f"{self.name}-access.yaml"
        path.write_text(yaml.safe_dump_all(self.of_kind(*ACCESS_KINDS)))
        kubectl.apply(path)

    def uninstall(self, api: KubeApi) -> None:
        for obj in self.of_kind(*CLUSTER_SCOPED):
            try:
                api.delete(f"/apis/rbac.authorization.k8s.io/v1/{obj['kind'].lower()}s/{obj['metadata']['name']}")
            except ApiError as err:
                if err.status != 404:
                    raise


def release_for(namespace: str, interval: str = RECONCILE_INTERVAL, verbose: bool = False) -> ChartRelease:
    """The chart installed into a test's namespace with the default (cluster-wide) RBAC, as
    `helm install` without values does; its own ports and reconcile interval (seconds)."""
    values = {"operator": {"healthPort": free_port(), "metricsPort": free_port(), "verbose": verbose,
                           "extraEnv": [{"name": "KUBETUNE_RECONCILE_INTERVAL", "value": interval}]}}  # fmt: skip
    return ChartRelease.render(f"kt-{namespace}"[:50], namespace, values)


# ---------------------------------------------------------------------------------------
# the operator


class OperatorProcess:
    """`python -m kubetune_operator` with the chart Deployment's environment, logged in as the
    chart's ServiceAccount: a TokenRequest token in `credentials/token` (written like a
    projected volume; `rotate_token` writes a new one) named by a kubeconfig's `tokenFile`."""

    def __init__(self, plane: ControlPlane, api: KubeApi, release: ChartRelease, workdir: Path):
        self.plane, self.api, self.release = plane, api, release
        self.workdir = workdir.resolve()  # the process runs there: its files are named absolutely
        self.credentials = self.workdir / "serviceaccount"
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.bindings: list[str] = []  # the Secrets the tokens written so far are bound to
        env = release.operator_env()
        self.metrics_port = int(env["KUBETUNE_OPERATOR_METRICS_PORT"])
        self.liveness_port = int(env["KUBETUNE_OPERATOR_LIVENESS_PORT"])

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.release.namespace}:{self.release.service_account}"

    def rotate_token(self) -> str:
        """A new token from the TokenRequest API written into the credentials folder (like the
        kubelet refreshing a projected volume); returns it. Each token is bound to a Secret of
        its own, so that `revoke_previous_token` can make the one before invalid at once."""
        binding = self.api.create(path(self.release.namespace, "secrets"), {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"generateName": "operator-token-binding-"}})  # fmt: skip
        bound = {"kind": "Secret", "apiVersion": "v1", "name": binding["metadata"]["name"], "uid": binding["metadata"]["uid"]}
        write_service_account_files(self.api, self.plane, self.release.namespace, self.release.service_account, self.credentials,
                                    bound_object=bound)  # fmt: skip
        self.bindings.append(bound["name"])
        return (self.credentials / "token").read_text()

    def revoke_previous_token(self) -> None:
        """The token before the current one stops working (its Secret is deleted)."""
        self.api.delete(path(self.release.namespace, "secrets", self.bindings[-2]))

    def kubeconfig(self) -> Path:
        path = self.workdir / "operator-kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "operator",
            "clusters": [{"name": "local", "cluster": {"server": self.plane.server, "certificate-authority": str(self.credentials / "ca.crt")}}],
            "users": [{"name": "operator", "user": {"tokenFile": str(self.credentials / "token")}}],
            "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator", "namespace": self.release.namespace}}],
        }))  # fmt: skip
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBETUNE_", "KUBECONFIG"))}
        env.update(self.release.operator_env(), KUBECONFIG=str(self.kubeconfig()), PYTHONUNBUFFERED="1")
        return env

    def start(self) -> "OperatorProcess":
        if not (self.credentials / "token").exists():
            self.rotate_token()
        log = open(self.workdir / f"operator-{self.starts}.log", "wb")
        with log:
            self.proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator"], env=self.env(), stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True)  # fmt: skip
        self.starts += 1
        wait_for(self.healthy, 90, "the operator's /healthz")
        return self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, as the kubelet stops a pod (kopf finishes its handlers and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def log(self) -> str:
        return "".join((self.workdir / f"operator-{i}.log").read_text(errors="replace") for i in range(self.starts))

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


# ---------------------------------------------------------------------------------------
# the test's view of a namespace (as the admin, and as the kubelet for pod status)


def path(namespace: str, plural: str, name: Optional[str] = None, sub: Optional[str] = None) -> str:
    out = f"{PREFIXES.get(plural, '/api/v1')}/namespaces/{namespace}/{plural}"
    return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Namespace:
    api: KubeApi
    name: str

    def objects(self, plural: str, **params: Any) -> dict[str, dict]:
        return {o["metadata"]["name"]: o for o in self.api.get(path(self.name, plural), **params)["items"]}

    def get(self, plural: str, name: str) -> Optional[dict]:
        try:
            return self.api.get(path(self.name, plural, name))
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    def status(self, job: str) -> dict:
        return (self.get(PLURAL, job) or {}).get("status") or {}

    def pods(self, job: str, role: Optional[str] = None) -> dict[str, dict]:
        selector = f"kubetune.io/job={job}" + (f",kubetune.io/role={role}" if role else "")
        return {n: p for n, p in self.objects("pods", labelSelector=selector).items() if not p["metadata"].get("deletionTimestamp")}

    def workers(self, job: str) -> dict[str, dict]:
        return self.pods(job, "worker")

    def attempts(self, job: str) -> set[str]:
        """The gang attempts of the job's current worker pods."""
        return {p["metadata"]["labels"]["kubetune.io/attempt"] for p in self.workers(job).values()}

    def phase_is(self, job: str, phase: str):
        """A wait_for predicate: the job's status once it is in `phase`."""
        return lambda: self.status(job).get("phase") == phase and self.status(job)

    def events(self, job: str) -> list[dict]:
        """The Events about a FineTuneJob, oldest first."""
        found = self.objects("events", fieldSelector=f"involvedObject.name={job},involvedObject.kind=FineTuneJob").values()
        return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def event_reasons(self, job: str) -> list[str]:
        return [e["reason"] for e in self.events(job)]

    def create_secret(self, name: str, data: dict[str, str]) -> None:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        self.api.create(path(self.name, "secrets"), {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded})

    def delete(self, plural: str, name: str, **options: Any) -> None:
        self.api.delete(path(self.name, plural, name), **options)

    # -- what a kubelet reports, for pods no node runs
    def set_pod_status(self, name: str, phase: str, exit_code: Optional[int] = None) -> None:
        """The pod's phase (and its one container's exit code) through the status subresource."""
        pod = self.api.get(path(self.name, "pods", name))
        container = pod["spec"]["containers"][0]
        if exit_code is None:
            state = {"running": {"startedAt": now()}} if phase == "Running" else {"waiting": {"reason": "ContainerCreating"}}
        else:
            state = {"terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "startedAt": now(), "finishedAt": now()}}
        status = {"phase": phase, "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                                         "ready": phase == "Running", "restartCount": 0, "state": state}]}  # fmt: skip
        self.api.patch(path(self.name, "pods", name, "status"), {"status": status})

    def run_workers(self, job: str) -> None:
        for name in self.workers(job):
            self.set_pod_status(name, "Running")

    def make_ready(self, deployment: str) -> None:
        """The Deployment's pods (created by the real ReplicaSet controller) reported Running
        and Ready, so that the controllers count them (readyReplicas)."""
        labels = self.api.get(path(self.name, "deployments", deployment))["spec"]["selector"]["matchLabels"]
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        pods = wait_for(lambda: self.objects("pods", labelSelector=selector), 60, f"the pods of Deployment {deployment}")
        for name, pod in pods.items():
            container = pod["spec"]["containers"][0]
            ready = [{"type": kind, "status": "True", "lastTransitionTime": now()} for kind in ("Initialized", "ContainersReady", "Ready")]
            status = {"phase": "Running", "conditions": ready, "startTime": now(),
                      "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "", "ready": True,
                                             "started": True, "restartCount": 0, "state": {"running": {"startedAt": now()}}}]}  # fmt: skip
            self.api.patch(path(self.name, "pods", name, "status"), {"status": status})


EXAMPLE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-value"}


def start_example(ns: Namespace, kubectl: Kubectl, workdir: Optional[Path] = None, name: str = "qa-bot") -> str:
    """examples/lora-multinode.yaml (2 workers) applied with kubectl as job `name`, with its
    credentials Secret (created once per namespace); returns once both worker pods exist."""
    if ns.get("secrets", "s3-credentials") is None:
        ns.create_secret("s3-credentials", EXAMPLE_CREDENTIALS)
    source = EXAMPLE
    if name != "qa-bot":
        source = workdir / f"{name}.yaml"
        doc = yaml.safe_load(EXAMPLE.read_text())
        doc["metadata"]["name"] = name
        source.write_text(yaml.safe_dump(doc))
    kubectl.apply(source)
    wait_for(lambda: len(ns.workers(name)) == 2, what=f"two worker pods of {name}")
    return name


# ---------------------------------------------------------------------------------------
# the audit log


class AuditLog:
    """The API server's audit log (JSON lines, level Metadata): who called what."""

    def __init__(self, file: Path):
        self.file = file

    def events(self, user: str) -> list[dict]:
        out = []
        with open(self.file, encoding="utf-8") as lines:
            for line in lines:
                event = json.loads(line)
                if event.get("stage") == "ResponseComplete" and event["user"]["username"] == user:
                    out.append(event)
        return out

    @staticmethod
    def call(event: dict) -> Optional[tuple[str, str, str]]:
        ref = event.get("objectRef")
        if not ref or not ref.get("resource"):
            return None  # discovery and other non-resource URLs
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        return ref.get("apiGroup", ""), resource, event["verb"]

    def calls(self, user: str) -> set[tuple[str, str, str]]:
        """(group, resource[/subresource], verb) of every request `user` made."""
        return {c for c in map(self.call, self.events(user)) if c is not None}

    def created(self, user: str, plural: str, namespace: str) -> list[str]:
        """Names of the objects `user` created (201) in a namespace."""
        return [e["objectRef"].get("name", "") for e in self.events(user)
                if e["verb"] == "create" and e["objectRef"].get("resource") == plural and not e["objectRef"].get("subresource")
                and e["objectRef"].get("namespace") == namespace and e["responseStatus"]["code"] == 201]  # fmt: skip


# ---------------------------------------------------------------------------------------
# fixtures (imported by the conftest.py of each folder that runs the operator)


@pytest.fixture
def ns(kube_api, kube_namespace) -> Namespace:
    return Namespace(kube_api, kube_namespace)


@contextlib.contextmanager
def running_operator(plane: ControlPlane, api: KubeApi, namespace: str, workdir: Path, delete_jobs: bool = True,
                     **options: Any) -> Iterator[OperatorProcess]:  # fmt: skip
    """The chart's RBAC applied for a release in `namespace`, the operator started (options:
    release_for's). At the end the namespace's jobs are deleted while it still runs (its
    finalizer; `delete_jobs=False` leaves them), then it stops and the release's
    cluster-wide RBAC goes."""
    release = release_for(namespace, **options)
    release.install(Kubectl(plane.kubeconfig, namespace, workdir), workdir)
    process = OperatorProcess(plane, api, release, workdir)
    view = Namespace(api, namespace)
    try:
        yield process.start()
        if process.proc is not None and delete_jobs:
            for job in view.objects(PLURAL):
                view.delete(PLURAL, job)
            wait_for(lambda: not view.objects(PLURAL), 60, "the jobs deleted by the operator")
    finally:
        process.stop()
        if delete_jobs:
            for job in view.objects(PLURAL):  # no operator any more: release its finalizer
                api.patch(path(namespace, PLURAL, job), {"metadata": {"finalizers": None}})
        release.uninstall(api)


@pytest.fixture
def operator_options() -> dict:
    """release_for's options for the `operator` fixture; a test parametrizes this name to change them."""
    return {}


@pytest.fixture
def operator(control_plane, kube_api, kube_namespace, finetunejob_crd, operator_options, tmp_path) -> Iterator[OperatorProcess]:
    with running_operator(control_plane, kube_api, kube_namespace, tmp_path, **operator_options) as process:
        yield process


@pytest.fixture
def audit(control_plane) -> AuditLog:
    return AuditLog(control_plane.audit_log)
