"""A node for the local control plane: it does a kubelet's part of the API contract and runs
each pod's containers as local processes on CPU.

On the API, like a kubelet:
- registers a Node (capacity: cpu, memory, nvidia.com/gpu, pods; Ready; its address
  127.0.0.1 and the port of its log endpoint) and renews its Lease in kube-node-lease;
  the real scheduler binds pods to it, the node-lifecycle controller lifts the not-ready taint;
- runs the pods bound to it (all namespaces), writes their status through the status
  subresource (phase, init/containerStatuses with exit codes and restarts, Ready from the
  httpGet readinessProbe, podIP/hostIP);
- serves /containerLogs over TLS, so `kubectl logs` and pods/log work through the API server;
- on a pod's deletion: SIGTERM, SIGKILL after its grace period, then the final DELETE;
  a pod that vanished has its processes killed.

What a node would provide is emulated explicitly (as the kmock-era kubelet did):
- images: the container's command runs here; `python` is this interpreter, other commands
  come from this environment's bin folder or PATH;
- volumes: ConfigMaps and Secrets are written to files, anything else is a folder; container
  paths under a mount (args and env values) are rewritten to the pod's folder (/dev/shm stays
  the real one);
- env: `value` as is, `secretKeyRef`/`configMapKeyRef` read from the API;
- cluster DNS: POD.SUBDOMAIN names resolve to 127.0.0.1; fixed container ports (rendezvous,
  metrics, the server port) map to free local ports, one set per pod group (the subdomain,
  else the pod's Deployment, else the pod).
"""

from __future__ import annotations

import base64
import datetime
import http.server
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil

from kube_harness import ApiError, KubeApi
from localcluster import ControlPlane, free_port

LOCAL_ONLY_MOUNTS = ("/dev/shm",)
CAPACITY = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "8", "pods": "110"}
LEASE_SECONDS = 40
RENEW_EVERY = 10.0


def now(micro: bool = False) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    spec: dict
    log_path: Path
    popen: Optional[subprocess.Popen] = None
    started_at: str = ""
    finished_at: str = ""
    exit_code: Optional[int] = None
    restarts: int = 0
    exited_at: float = 0.0  # time.monotonic() of the last exit, for the restart delay
    last_exit: Optional[dict] = None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.popen is not None and self.exit_code is None

    def status(self, waiting: str = "ContainerCreating") -> dict:
        if self.popen is None:
            state: dict = {"waiting": {"reason": "CrashLoopBackOff" if self.restarts else waiting}}
        elif self.exit_code is None:
            state = {"running": {"startedAt": self.started_at}}
        else:
            state = {"terminated": {"exitCode": self.exit_code, "reason": "Completed" if self.exit_code == 0 else "Error",
                                    "startedAt": self.started_at, "finishedAt": self.finished_at}}  # fmt: skip
        status = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "", "ready": self.ready,
                  "restartCount": self.restarts, "started": self.running(), "state": state}  # fmt: skip
        if self.popen is not None:
            status["containerID"] = f"local://{self.popen.pid}"
        if self.last_exit:
            status["lastState"] = {"terminated": self.last_exit}
        return status


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    spec: dict
    root: Path
    group: str
    init: list[Container]
    containers: list[Container]
    lock: threading.Lock = field(default_factory=threading.Lock)
    mounts: dict[str, Path] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)  # container name -> environment
    waiting: Optional[tuple[str, str]] = None  # (reason, message) while the pod cannot start
    started_at: str = ""
    stopping: bool = False
    reported: Any = None
    ready_urls: dict[str, str] = field(default_factory=dict)

    def all(self) -> list[Container]:
        return self.init + self.containers

    def phase(self) -> str:
        never = self.spec.get("restartPolicy", "Always") == "Never"
        if any(c.exit_code not in (None, 0) for c in self.init) and never:
            return "Failed"
        if all(c.popen is None and c.restarts == 0 for c in self.containers):
            return "Pending"
        if any(c.exit_code is None or c.popen is None for c in self.containers):  # running, starting or restarting
            return "Running"
        return "Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed"


class NodeAgent:
    def __init__(self, api: KubeApi, plane: ControlPlane, workdir: Path, base_env: dict[str, str],
                 node_env: Optional[dict[str, str]] = None, name: Optional[str] = None,
                 capacity: Optional[dict[str, str]] = None):  # fmt: skip
        self.api, self.plane, self.workdir = api, plane, Path(workdir)
        self.base_env = dict(base_env)
        # Node-level settings that win over the pod's env (e.g. a shared JIT cache, like a hostPath).
        self.node_env = dict(node_env or {})
        self.name = name or f"node-{uuid.uuid4().hex[:8]}"
        self.capacity = dict(capacity or CAPACITY)
        self.pods: dict[tuple[str, str], PodRun] = {}
        self.ports: dict[tuple[str, int], int] = {}  # (group, container port) -> local port
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()  # kill() reports between two sync passes, never during one
        self._thread = threading.Thread(target=self._loop, name=f"node-agent {self.name}", daemon=True)
        self._renewed = 0.0

    # -- lifecycle
    def start(self) -> "NodeAgent":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._logs = LogServer(self)
        node = self.api.create("/api/v1/nodes", self._node())
        self.api.create(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": node["metadata"]["uid"]}]},
            "spec": {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now(micro=True)},
        })  # fmt: skip
        self._renewed = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop syncing, kill every process, and remove the Node (its Lease goes with it; pods
        left bound to it are collected by the pod garbage collector)."""
        self._stop.set()
        self._thread.join(60)
        for run in list(self.pods.values()):
            self._kill_run(run, grace=0)
        self._logs.close()
        try:
            self.api.delete(f"/api/v1/nodes/{self.name}")
        except ApiError as err:
            if err.status != 404:
                raise

    def kill(self, pod: str, namespace: Optional[str] = None) -> None:
        """SIGKILL every process of a pod, like a crashed node or an OOM kill of the container.

        Its death is reported at once, as a node's kubelet does, not on the next sync pass,
        where a peer that only lost its rendezvous could be reported first."""
        with self._sync_lock:
            run = self.run(pod, namespace)
            for container in run.all():
                if container.popen is not None:
                    kill_tree(container.popen.pid)
            self._observe(run)
            self._report(run)

    def run(self, pod: str, namespace: Optional[str] = None) -> PodRun:
        found = [r for (ns, name), r in self.pods.items() if name == pod and namespace in (None, ns)]
        if len(found) != 1:
            raise KeyError(f"{len(found)} pods named {pod!r} on {self.name} (namespace {namespace or 'any'})")
        return found[0]

    def log(self, pod: str, namespace: Optional[str] = None, container: Optional[str] = None) -> str:
        try:
            run = self.run(pod, namespace)
        except KeyError:
            return ""
        # Like `kubectl logs`: the first (app) container unless one is named.
        path = next((c.log_path for c in run.all() if c.name == container), None) if container else run.containers[0].log_path
        return path.read_text(errors="replace") if path and path.exists() else ""

    def service_url(self, service: str, port: int) -> str:
        """Where a Service's port is reachable locally (its pods' group is the Service's name:
        a worker group's subdomain, or the Deployment of the same name)."""
        return f"http://127.0.0.1:{self.ports[(service, port)]}"

    # -- the Node
    def _node(self) -> dict:
        return {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name, "labels": {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux",
                                                       "kubernetes.io/arch": "amd64"}},
            "status": {
                "capacity": self.capacity, "allocatable": self.capacity,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubetune node agent is ready",
                                "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self._logs.port}},
                "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "kubetune node agent",
                             "containerRuntimeVersion": "local://processes", "kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
                             "operatingSystem": "linux", "architecture": "amd64"},
            },
        }  # fmt: skip

    def _renew_lease(self) -> None:
        if time.monotonic() - self._renewed >= RENEW_EVERY:
            self.api.patch(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}", {"spec": {"renewTime": now(micro=True)}})
            self._renewed = time.monotonic()

    # -- the sync loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._sync_lock:
                    self._sync()
            except Exception as err:  # noqa: BLE001 - keep syncing; the test asserts there were none
                self.errors.append(repr(err))
            self._stop.wait(0.2)

    def _sync(self) -> None:
        self._renew_lease()
        pods = self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.name}")["items"]
        current = {(p["metadata"]["namespace"], p["metadata"]["name"]): p for p in pods}
        for key, run in list(self.pods.items()):
            pod = current.get(key)
            if pod is None or pod["metadata"]["uid"] != run.uid:
                self._kill_run(run, grace=0)  # gone (force-deleted): nothing to report
                del self.pods[key]
        for key, pod in current.items():
            run = self.pods.get(key)
            if pod["metadata"].get("deletionTimestamp"):
                if run is None or not run.stopping:
                    self._terminate(key, pod, run)
                continue
            if run is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this agent: nothing to run
                run = self.pods[key] = self._new_run(pod)
            if run.waiting is not None or run.started_at == "":
                self._prepare(run)
            self._observe(run)
            self._advance(run)
            self._report(run)

    def _new_run(self, pod: dict) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        root = self.workdir / meta["namespace"] / meta["name"]
        root.mkdir(parents=True, exist_ok=True)
        init = [Container(c, root / f"{c['name']}.log") for c in spec.get("initContainers", [])]
        containers = [Container(c, root / f"{c['name']}.log") for c in spec["containers"]]
        return PodRun(meta["namespace"], meta["name"], meta["uid"], spec, root, pod_group(pod), init, containers)

    def _prepare(self, run: PodRun) -> None:
        """Volumes and env from the API. A missing ConfigMap or Secret leaves the pod waiting
        (CreateContainerConfigError), tried again on the next pass."""
        try:
            run.mounts = self._volumes(run)
            run.envs = {c.name: self._env(run, c.spec) for c in run.all()}
        except (ApiError, KeyError) as err:
            run.waiting = ("CreateContainerConfigError", str(err))
            return
        run.waiting = None
        run.started_at = now()

    def _advance(self, run: PodRun) -> None:
        """Start what is due: the init containers one after the other, each once the one
        before succeeded, then the containers; a container to restart 1 s after it exited.
        Only the sync loop's thread starts processes: they die with it (see _spawn)."""
        if run.started_at == "" or run.stopping:
            return
        for container in run.init:
            if container.popen is None:
                return self._spawn(run, container)
            if container.exit_code != 0:
                return  # running, or failed: restartPolicy Never fails the pod; a kubelet would retry otherwise
        for container in run.containers:
            if container.popen is None and (container.restarts == 0 or time.monotonic() - container.exited_at >= 1):
                self._spawn(run, container)

    def _spawn(self, run: PodRun, container: Container) -> None:
        # SIGKILL when the sync loop's thread ends (a killed test run leaves no pods running).
        command = ["setpriv", "--pdeathsig", "KILL", "--", *self._command(run, container.spec)]
        with run.lock, open(container.log_path, "ab") as log:
            container.popen = subprocess.Popen(command, env=run.envs[container.name], stdout=log, stderr=subprocess.STDOUT,
                                               cwd=run.root, start_new_session=True)  # fmt: skip
            container.started_at, container.exit_code, container.ready = now(), None, False
            probe = (container.spec.get("readinessProbe") or {}).get("httpGet")
            if probe:
                run.ready_urls[container.name] = f"http://127.0.0.1:{self._port(run.group, probe['port'])}{probe.get('path', '/')}"

    def _observe(self, run: PodRun) -> None:
        """Exit codes, restarts (restartPolicy Always/OnFailure) and readiness of the processes."""
        policy = run.spec.get("restartPolicy", "Always")
        with run.lock:
            for container in run.all():
                if container.popen is None or container.exit_code is not None:
                    continue
                code = container.popen.poll()
                if code is None:
                    container.ready = container.ready or self._probe(run.ready_urls.get(container.name))
                    continue
                # A signal death reads like the container runtime reports it: 128 + signal.
                container.exit_code = code if code >= 0 else 128 - code
                container.finished_at, container.ready = now(), False
                if any(c is container for c in run.containers) and not run.stopping and (policy == "Always" or (policy == "OnFailure" and code != 0)):
                    container.last_exit = container.status()["state"]["terminated"]
                    container.restarts += 1
                    container.popen, container.exited_at = None, time.monotonic()

    def _probe(self, url: Optional[str]) -> bool:
        if url is None:
            return True
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return 200 <= response.status < 400
        except OSError:
            return False

    def _report(self, run: PodRun) -> None:
        status = pod_status(run)
        if status != run.reported:
            self.api.patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status}, kind="strategic-merge")
            run.reported = status

    # -- deletion
    def _terminate(self, key: tuple[str, str], pod: dict, run: Optional[PodRun]) -> None:
        """Graceful deletion: stop the containers (in a thread: the grace period can be long),
        then confirm with the final DELETE, as the kubelet does."""
        if run is None:
            run = self.pods[key] = self._new_run(pod)
        run.stopping = True
        grace = pod["metadata"].get("deletionGracePeriodSeconds", 30)

        def finish() -> None:
            try:
                self._kill_run(run, grace)
                path = f"/api/v1/namespaces/{run.namespace}/pods/{run.name}"
                self.api.delete(path, gracePeriodSeconds=0, preconditions={"uid": run.uid})
            except ApiError as err:
                if err.status not in (404, 409):
                    self.errors.append(repr(err))

        threading.Thread(target=finish, name=f"delete {run.name}", daemon=True).start()

    def _kill_run(self, run: PodRun, grace: float) -> None:
        """SIGTERM to each container's main process, SIGKILL to all after the grace period."""
        with run.lock:
            run.stopping = True
            procs = [c.popen for c in run.all() if c.popen is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            kill_tree(proc.pid)
            proc.wait()

    # -- running a container
    def _volumes(self, run: PodRun) -> dict[str, Path]:
        volumes = {v["name"]: v for v in run.spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        base = f"/api/v1/namespaces/{run.namespace}"
        for mount in (m for c in run.all() for m in c.spec.get("volumeMounts", [])):
            path = mount["mountPath"]
            if path in LOCAL_ONLY_MOUNTS or path in mounts:
                continue
            local = run.root / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                data = self.api.get(f"{base}/configmaps/{volume['configMap']['name']}").get("data") or {}
                for item in volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                    (local / item["path"]).write_text(data[item["key"]])
            elif "secret" in volume:
                data = self.api.get(f"{base}/secrets/{volume['secret']['secretName']}").get("data") or {}
                for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                    (local / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
            mounts[path] = local / mount.get("subPath", "")
        return mounts

    def _rewrite(self, run: PodRun, value: str) -> str:
        for path, local in sorted(run.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        if value.endswith(f".{run.group}") and not value.startswith(("s3:", "http")):
            return "127.0.0.1"  # cluster DNS: POD.SUBDOMAIN
        return value

    def _port(self, group: str, port: int | str) -> int:
        key = (group, int(port))
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def _command(self, run: PodRun, container: dict) -> list[str]:
        args = [self._rewrite(run, a) for a in container.get("command", []) + container.get("args", [])]
        ported = {p["containerPort"] for p in container.get("ports", [])}
        for i, arg in enumerate(args[:-1]):
            if arg in ("--master_port", "--port") and int(args[i + 1]) in ported | {29500}:
                args[i + 1] = str(self._port(run.group, int(args[i + 1])))
            if arg == "--host":
                args[i + 1] = "127.0.0.1"
        if args[0] in ("python", "python3"):
            args[0] = sys.executable
        else:
            local = Path(sys.executable).parent / args[0]
            args[0] = str(local) if local.exists() else (shutil.which(args[0]) or args[0])
        return args

    def _env(self, run: PodRun, container: dict) -> dict[str, str]:
        env = dict(self.base_env)
        base = f"/api/v1/namespaces/{run.namespace}"
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self._rewrite(run, item["value"])
                continue
            ref = item["valueFrom"]
            kind, plural = ("secretKeyRef", "secrets") if "secretKeyRef" in ref else ("configMapKeyRef", "configmaps")
            try:
                data = self.api.get(f"{base}/{plural}/{ref[kind]['name']}").get("data") or {}
                raw = data[ref[kind]["key"]]
            except (ApiError, KeyError):
                if ref[kind].get("optional"):
                    continue
                raise
            env[item["name"]] = base64.b64decode(raw).decode() if plural == "secrets" else raw
        env.update(self.node_env)
        if "KUBETUNE_METRICS_PORT" in env:
            env["KUBETUNE_METRICS_PORT"] = str(self._port(run.group, int(env["KUBETUNE_METRICS_PORT"])))
        return env


def pod_group(pod: dict) -> str:
    """Pods that share a network here (ports, names): a worker group's subdomain, the
    Deployment a ReplicaSet's pod belongs to, else the pod alone."""
    meta = pod["metadata"]
    if pod["spec"].get("subdomain"):
        return pod["spec"]["subdomain"]
    template_hash = (meta.get("labels") or {}).get("pod-template-hash")
    for owner in meta.get("ownerReferences") or []:
        if owner["kind"] == "ReplicaSet" and template_hash and owner["name"].endswith(f"-{template_hash}"):
            return owner["name"][: -len(template_hash) - 1]
    return meta["name"]


def pod_status(run: PodRun) -> dict:
    """The pod's status as the kubelet writes it (a strategic merge patch: conditions merge by type)."""
    phase = run.phase()
    started = [c for c in run.containers if c.popen is not None]
    ready = phase == "Running" and len(started) == len(run.containers) and all(c.ready for c in run.containers)
    initialized = all(c.exit_code == 0 for c in run.init)
    waiting = run.waiting[0] if run.waiting else "ContainerCreating"

    def condition(kind: str, true: bool) -> dict:
        return {"type": kind, "status": "True" if true else "False", "lastProbeTime": None}

    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [condition("PodReadyToStartContainers", run.started_at != ""), condition("Initialized", initialized),
                       condition("ContainersReady", ready), condition("Ready", ready)],
        "containerStatuses": [c.status(waiting if initialized else "PodInitializing") for c in run.containers],
    }  # fmt: skip
    if run.init:
        status["initContainerStatuses"] = [c.status(waiting) for c in run.init]
    if run.waiting:
        for entry in status["containerStatuses"]:
            entry["state"]["waiting"]["message"] = run.waiting[1]
    if run.started_at:
        status.update(startTime=run.started_at, hostIP="127.0.0.1", hostIPs=[{"ip": "127.0.0.1"}], podIP="127.0.0.1", podIPs=[{"ip": "127.0.0.1"}])
    return status


class LogServer:
    """The node's /containerLogs endpoint for the API server's pods/log: TLS with the cluster's
    serving certificate, clients must present a certificate of the cluster's CA."""

    def __init__(self, agent: NodeAgent):
        self.agent = agent
        handler = type("Handler", (LogHandler,), {"agent": agent})
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(agent.plane.pki / "serving.crt", agent.plane.pki / "serving.key")
        context.load_verify_locations(agent.plane.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="node-agent logs", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class LogHandler(http.server.BaseHTTPRequestHandler):
    """GET /containerLogs/NAMESPACE/POD/CONTAINER?tailLines=N&limitBytes=N&follow=true"""

    agent: NodeAgent

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = dict(urllib.parse.parse_qsl(url.query))
        if len(parts) != 4 or parts[0] != "containerLogs":
            return self.send_error(404)
        _, namespace, pod, name = parts
        try:
            run = self.agent.run(pod, namespace)
            container = next(c for c in run.all() if c.name == name)
        except (KeyError, StopIteration):
            return self.send_error(404, f"container {name} of pod {namespace}/{pod} is not on this node")
        text = container.log_path.read_bytes() if container.log_path.exists() else b""
        if "tailLines" in query:
            lines = text.splitlines(keepends=True)
            text = b"".join(lines[-int(query["tailLines"]):]) if int(query["tailLines"]) > 0 else b""
        if "limitBytes" in query:
            text = text[: int(query["limitBytes"])]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(text)
        if query.get("follow") == "true":
            self._follow(container, container.log_path.stat().st_size if container.log_path.exists() else 0)

    def _follow(self, container: Container, offset: int) -> None:
        while True:
            done = not container.running()
            with open(container.log_path, "rb") as log:
                log.seek(offset)
                chunk = log.read()
            if chunk:
                self.wfile.write(chunk)
                self.wfile.flush()
                offset += len(chunk)
            if done:
                return
            time.sleep(0.2)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in new sessions)."""
    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in family:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
