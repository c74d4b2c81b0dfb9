"""A kubelet (and Deployment controller) for the kmock cluster: runs each pod's command as a
local process on CPU and reports phases, exit codes, logs and readiness back to the API.

What a node would provide is emulated explicitly:
- volumes: ConfigMaps are written to files, emptyDirs are folders; container paths under a
  mount (args and env values) are rewritten to the pod's folder (/dev/shm stays the real one);
- env: `value` as is, `secretKeyRef`/`configMapKeyRef` resolved from the API objects;
- cluster DNS: POD.SUBDOMAIN names resolve to 127.0.0.1; fixed container ports (rendezvous,
  metrics, the server port) are mapped to free local ports, one set per pod group;
- Deployments: one replica per Deployment, readiness from its httpGet readinessProbe.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil

from kube_emulator import Cluster
from kubetune.testing import free_port
from operator_harness import Api

LOCAL_ONLY_MOUNTS = ("/dev/shm",)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    uid: str = ""
    deployment: Optional[str] = None
    ready_url: Optional[str] = None
    reported: str = ""


@dataclass
class Kubelet:
    cluster: Cluster
    api: Api
    workdir: Path
    base_env: dict[str, str]
    # Node-level settings that win over the pod's env (e.g. a shared JIT cache, like a hostPath).
    node_env: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    processes: dict[str, Process] = field(default_factory=dict)
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (group, container port) -> local port

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._sync_lock = threading.Lock()  # kill() reports between two sync passes, never during one
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self.errors: list[str] = []

    def start(self) -> "Kubelet":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        for proc in list(self.processes.values()):
            self._kill(proc)

    def kill(self, pod: str) -> None:
        """SIGKILL every process of a pod, like a crashed node or an OOM kill of the container.

        Its death is reported at once, as a node's kubelet does, not on the next sync pass,
        where a peer that only lost its rendezvous could be reported first."""
        with self._sync_lock:
            kill_tree(self.processes[pod].popen.pid)
            self._report(pod, self.processes[pod])

    def log(self, pod: str) -> str:
        proc = self.processes.get(pod)
        return proc.log_path.read_text(errors="replace") if proc and proc.log_path.exists() else ""

    def service_url(self, service: str, port: int) -> str:
        """Where a Service's port is reachable locally (its pods share the Service name as group)."""
        return f"http://127.0.0.1:{self.ports[(service, port)]}"

    # -- the sync loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._sync_lock:
                    self._sync()
            except Exception as err:  # noqa: BLE001 - keep syncing; the test reports errors
                self.errors.append(repr(err))
            self._stop.wait(0.2)

    def _sync(self) -> None:
        pods = self.cluster.objects("pods", self.namespace)
        for name, proc in list(self.processes.items()):
            if proc.deployment is None and (name not in pods or pods[name]["metadata"]["uid"] != proc.uid):
                self._kill(proc)  # the pod was deleted: SIGTERM like the kubelet
                del self.processes[name]
        for name, pod in pods.items():
            if name not in self.processes and (pod.get("status") or {}).get("phase", "Pending") == "Pending":
                self._start(name, pod["spec"], group=pod["spec"].get("subdomain") or name)
                self.processes[name].uid = pod["metadata"]["uid"]
                self.api.set_pod_status(name, "Running")
        deployments = self.cluster.objects("deployments", self.namespace)
        for name, deployment in deployments.items():
            key = f"deploy/{name}"
            if key not in self.processes:
                spec = deployment["spec"]["template"]["spec"]
                self._start(key, spec, group=name, deployment=name)
        for key, proc in list(self.processes.items()):
            if proc.deployment is not None and proc.deployment not in deployments:
                self._kill(proc)
                del self.processes[key]
        for key, proc in self.processes.items():
            self._report(key, proc)

    def _report(self, key: str, proc: Process) -> None:
        code = proc.popen.poll()
        log = proc.log_path.read_text(errors="replace") if proc.log_path.exists() else ""
        if proc.deployment is None:
            self.cluster.run(lambda e: e.logs.__setitem__((self.namespace, key), log))
            if code is not None and not proc.reported:
                proc.reported = "Succeeded" if code == 0 else "Failed"
                # A signal death reads like the container runtime reports it: 128 + signal.
                self.api.set_pod_status(key, proc.reported, exit_code=code if code >= 0 else 128 - code)
        elif code is None and proc.reported != "ready" and proc.ready_url:
            try:
                with urllib.request.urlopen(proc.ready_url, timeout=2) as response:
                    if response.status == 200:
                        proc.reported = "ready"
                        self.api.set_deployment_ready(proc.deployment, 1)
            except OSError:
                pass

    # -- running a pod
    def _start(self, key: str, spec: dict, group: str, deployment: Optional[str] = None) -> None:
        root = self.workdir / key.replace("/", "_")
        root.mkdir(parents=True, exist_ok=True)
        mounts = self._volumes(spec, root)
        container = spec["containers"][0]
        for init in spec.get("initContainers", []):
            subprocess.run(self._command(init, mounts, group), env=self._env(init, mounts, group), check=True, timeout=300)
        command = self._command(container, mounts, group)
        env = self._env(container, mounts, group)
        log_path = root / "container.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
        proc = Process(key, popen, log_path, deployment=deployment)
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        if probe:
            proc.ready_url = f"http://127.0.0.1:{self._port(group, probe['port'])}{probe['path']}"
        self.processes[key] = proc

    def _volumes(self, spec: dict, root: Path) -> dict[str, Path]:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in spec["containers"][0].get("volumeMounts", []):
            path = mount["mountPath"]
            if path in LOCAL_ONLY_MOUNTS:
                continue
            local = root / path.lstrip("/")
            local.mkdir(parents=True, exist_ok=True)
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                data = self.cluster.objects("configmaps", self.namespace)[volume["configMap"]["name"]]["data"]
                for file, text in data.items():
                    (local / file).write_text(text)
            elif "secret" in volume:
                secret = self.cluster.objects("secrets", self.namespace)[volume["secret"]["secretName"]]
                for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in secret["data"]]:
                    (local / item["path"]).write_bytes(base64.b64decode(secret["data"][item["key"]]))
            mounts[path] = local
        return mounts

    def _rewrite(self, value: str, mounts: dict[str, Path], group: str) -> str:
        for path, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        if value.endswith(f".{group}") and not value.startswith(("s3:", "http")):
            return "127.0.0.1"  # cluster DNS: POD.SUBDOMAIN
        return value

    def _port(self, group: str, port: int | str) -> int:
        key = (group, int(port))
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def _command(self, container: dict, mounts: dict[str, Path], group: str) -> list[str]:
        args = [self._rewrite(a, mounts, group) for a in container["command"] + container.get("args", [])]
        ported = {p["containerPort"] for p in container.get("ports", [])}
        for i, arg in enumerate(args[:-1]):
            if arg in ("--master_port", "--port") and int(args[i + 1]) in ported | {29500}:
                args[i + 1] = str(self._port(group, int(args[i + 1])))
            if arg == "--host":
                args[i + 1] = "127.0.0.1"
        if args[0] in ("python", "python3"):
            args[0] = sys.executable
        else:
            args[0] = str(Path(sys.executable).parent / args[0])
        return args

    def _env(self, container: dict, mounts: dict[str, Path], group: str) -> dict[str, str]:
        env = dict(self.base_env)
        for item in container.get("env", []):
            if "value" in item:
                value = self._rewrite(item["value"], mounts, group)
            else:
                ref = item["valueFrom"]
                kind, plural = ("secretKeyRef", "secrets") if "secretKeyRef" in ref else ("configMapKeyRef", "configmaps")
                obj = self.cluster.objects(plural, self.namespace)[ref[kind]["name"]]
                raw = obj["data"][ref[kind]["key"]]
                value = base64.b64decode(raw).decode() if plural == "secrets" else raw
            env[item["name"]] = value
        env.update(self.node_env)
        if "KUBETUNE_METRICS_PORT" in env:
            env["KUBETUNE_METRICS_PORT"] = str(self._port(group, int(env["KUBETUNE_METRICS_PORT"])))
        return env

    def _kill(self, proc: Process) -> None:
        """Like a pod deletion: SIGTERM to the container's main process, SIGKILL to all after the grace period."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(60)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(proc.popen.pid)
        proc.popen.wait()


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
