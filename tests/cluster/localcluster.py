"""A local Kubernetes control plane: etcd, kube-apiserver, kube-controller-manager and
kube-scheduler (the upstream components, built from tests/cluster/main.go into one binary,
one process each) on 127.0.0.1, with no nodes. `scripts/local-cluster up|down DIR` and the
tests' session fixture (kube_harness.py) both use `ControlPlane`.

DIR holds everything: pki/ (a CA, the serving certificate of every component, the admin
client certificate in group system:masters, the ServiceAccount signing key pair), etcd/
(the data; it survives `down`, so `up` again resumes the same cluster), logs/NAME.log,
pids/NAME.pid, ports.json and kubeconfig (the admin's, certificates embedded).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
BINARY = REPO / ".cache" / "bin" / "kubetune-cluster"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
SERVICE_CIDR = "10.96.0.0/24"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# What the operator and its tests need from the controller manager, and no more (each
# controller costs CPU on a 2-core machine): owners' garbage collection, Deployments and
# ReplicaSets, namespace deletion, ServiceAccounts and their tokens, the kube-root-ca.crt
# ConfigMap, Service endpoints, Node health (the not-ready taint comes off a Ready node) and
# the collection of pods whose node is gone.
CONTROLLERS = (
    "garbage-collector-controller", "deployment-controller", "replicaset-controller", "namespace-controller",
    "serviceaccount-controller", "serviceaccount-token-controller", "root-ca-certificate-publisher-controller",
    "endpointslice-controller", "node-lifecycle-controller", "pod-garbage-collector-controller",
)  # fmt: skip

# What the audit log records: every request at level Metadata (who, verb, object, response
# code, user agent) once answered, except the control plane's own traffic and the node agents'.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": ["system:kube-controller-manager", "system:kube-scheduler", "system:apiserver"]},
        {"level": "None", "userGroups": ["system:nodes", "system:serviceaccounts:kube-system"]},
        {"level": "Metadata"},
    ],
}  # fmt: skip


class ClusterError(RuntimeError):
    """A component did not come up; the message ends with its last log lines."""


# -- certificates
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


def _certificate(subject: x509.Name, key, issuer: Optional[x509.Certificate], issuer_key, *, ca: bool = False,
                 usage: Optional[ExtendedKeyUsageOID] = None, sans: tuple[str, ...] = ()) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        names = [x509.IPAddress(ipaddress.ip_address(s)) if s[0].isdigit() else x509.DNSName(s) for s in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(common: str, *organizations: str) -> x509.Name:
    """A subject: Kubernetes reads the user from CN and the groups from each O."""
    return x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(pki: Path) -> None:
    """The CA, the certificates and the ServiceAccount key pair: each one that pki/ lacks."""
    pki.mkdir(parents=True, exist_ok=True)
    if not (pki / "ca.crt").exists():
        ca_key = _key()
        _write_key(pki / "ca.key", ca_key)
        ca = _certificate(_name("kubetune-local-ca"), ca_key, None, ca_key, ca=True)
        (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))  # the `kubernetes` Service's ClusterIP
    sans = ("127.0.0.1", service_ip, "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local")  # fmt: skip
    issued = {
        # One serving certificate for every component on 127.0.0.1 (and the node agents).
        "serving": (_name("kubetune-local-serving"), ExtendedKeyUsageOID.SERVER_AUTH, sans),
        "admin": (_name("kubetune-admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, ()),
        # The test node agents: a node's name and group (the audit policy leaves them out), and
        # system:masters instead of the Node authorizer.
        "node-agent": (_name("system:node:kubetune-node-agent", "system:nodes", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, ()),
        # How kube-apiserver authenticates to node agents (for pods/log).
        "apiserver-kubelet-client": (_name("kube-apiserver-kubelet-client", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH, ()),
    }
    for stem, (subject, usage, names) in issued.items():
        if (pki / f"{stem}.crt").exists():
            continue
        key = _key()
        _write_key(pki / f"{stem}.key", key)
        cert = _certificate(subject, key, ca, ca_key, usage=usage, sans=names)
        (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if not (pki / "sa.pub").exists():
        sa_key = _key()
        _write_key(pki / "sa.key", sa_key)
        (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick(cls) -> "Ports":
        return cls(*(free_port() for _ in range(5)))


class ControlPlane:
    """The four components as child processes in their own sessions, so that they outlive
    the `up` command; `down` (this object or another one on the same DIR) stops them.

    With `die_with_caller` (the tests' fixture) each component gets SIGKILL when the thread
    that started it dies (setpriv --pdeathsig), so a killed test run leaves no control plane
    behind: start components from a thread that outlives them (the main thread)."""

    def __init__(self, root: Path, binary: Path = BINARY, die_with_caller: bool = False):
        self.root = Path(root).resolve()
        self.binary = Path(binary)
        self.die_with_caller = die_with_caller
        self.pki = self.root / "pki"
        self.kubeconfig = self.root / "kubeconfig"
        self.procs: dict[str, subprocess.Popen] = {}
        ports = self.root / "ports.json"
        self.ports = Ports(**json.loads(ports.read_text())) if ports.exists() else None

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def audit_log(self) -> Path:
        """The API server's audit log (JSON lines, level Metadata, the control plane's own
        components and the node agents left out: see AUDIT_POLICY)."""
        return self.root / "logs" / "audit.log"

    def ssl_context(self, client: Optional[str] = "admin") -> ssl.SSLContext:
        """Verifies the components' serving certificate and presents a client certificate of
        pki/: "admin", "node-agent", or None (a client that authenticates with a bearer token)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client:
            context.load_cert_chain(self.pki / f"{client}.crt", self.pki / f"{client}.key")
        return context

    # -- up / down
    def up(self, timeout: float = 120) -> "ControlPlane":
        if not self.binary.exists():
            raise ClusterError(f"{self.binary} is missing: build it with `make cluster` (README: Build times)")
        running = [name for name in COMPONENTS if self.pid(name)]
        if running:
            raise ClusterError(f"{self.root} already runs {', '.join(running)}: `scripts/local-cluster down {self.root}` first")
        make_pki(self.pki)
        for folder in ("logs", "pids", "etcd"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        (self.root / "etcd").chmod(0o700)
        self.ports = Ports.pick()
        (self.root / "ports.json").write_text(json.dumps(self.ports.__dict__))
        self._write_kubeconfig()
        (self.root / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY))
        deadline = time.monotonic() + timeout
        try:
            # kube-apiserver waits for etcd by itself; the controllers need the API server first.
            for stage in (("etcd", "kube-apiserver"), ("kube-controller-manager", "kube-scheduler")):
                for name in stage:
                    self.start(name)
                for name in stage:
                    self.wait_healthy(name, deadline)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for name in reversed(COMPONENTS):
            self.stop(name)

    def start(self, name: str) -> None:
        """Start one component (again, on the same ports: `stop` + `start` restarts it)."""
        log = open(self.root / "logs" / f"{name}.log", "ab")
        with log:
            tie = ["setpriv", "--pdeathsig", "KILL", "--"] if self.die_with_caller else []
            proc = subprocess.Popen([*tie, str(self.binary), name, *self.flags(name)], stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)  # fmt: skip
        self.procs[name] = proc
        (self.root / "pids" / f"{name}.pid").write_text(str(proc.pid))

    def stop(self, name: str, grace: float = 15) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; only a process this DIR started."""
        pid = self.pid(name)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self._alive(name, pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._alive(name, pid):
                os.kill(pid, signal.SIGKILL)
                while self._alive(name, pid):
                    time.sleep(0.05)
        (self.root / "pids" / f"{name}.pid").unlink(missing_ok=True)
        self.procs.pop(name, None)

    def pid(self, name: str) -> Optional[int]:
        """The pid in pids/NAME.pid if that process is alive and is this component of this binary."""
        path = self.root / "pids" / f"{name}.pid"
        if not path.exists():
            return None
        pid = int(path.read_text())
        return pid if self._alive(name, pid) else None

    def _alive(self, name: str, pid: int) -> bool:
        proc = self.procs.get(name)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None  # our child: poll() also reaps it
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return argv[:2] == [str(self.binary).encode(), name.encode()] and state != "Z"

    # -- health
    def health_url(self, name: str) -> str:
        if name == "etcd":
            return f"http://127.0.0.1:{self.ports.etcd}/health"
        port = {"kube-apiserver": self.ports.apiserver, "kube-controller-manager": self.ports.controller_manager,
                "kube-scheduler": self.ports.scheduler}[name]  # fmt: skip
        return f"https://127.0.0.1:{port}/{'readyz' if name == 'kube-apiserver' else 'healthz'}"

    def healthy(self, name: str) -> bool:
        try:
            with urllib.request.urlopen(self.health_url(name), timeout=2, context=self.ssl_context()) as response:
                body = response.read()
        except OSError:
            return False
        return json.loads(body).get("health") == "true" if name == "etcd" else body == b"ok"

    def wait_healthy(self, name: str, deadline: float) -> None:
        while not self.healthy(name):
            if self.pid(name) is None:
                raise ClusterError(f"{name} exited while starting; last lines of {self.log(name)}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{name} not healthy at {self.health_url(name)} in time; last lines of {self.log(name)}:\n{self.tail(name)}")
            time.sleep(0.1)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    # -- configuration
    def flags(self, name: str) -> list[str]:
        pki, p = self.pki, self.ports
        serving = [f"--tls-cert-file={pki / 'serving.crt'}", f"--tls-private-key-file={pki / 'serving.key'}"]
        if name == "etcd":
            peer = f"http://127.0.0.1:{p.etcd_peer}"
            return [
                "--name=kubetune", f"--data-dir={self.root / 'etcd'}", "--unsafe-no-fsync", "--log-level=warn",
                f"--listen-client-urls=http://127.0.0.1:{p.etcd}", f"--advertise-client-urls=http://127.0.0.1:{p.etcd}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}", f"--initial-cluster=kubetune={peer}",
            ]  # fmt: skip
        if name == "kube-apiserver":
            return [
                f"--etcd-servers=http://127.0.0.1:{p.etcd}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                # The `kubernetes` Service's endpoints may not be a loopback address: none are kept.
                "--endpoint-reconciler-type=none",
                f"--secure-port={p.apiserver}", f"--cert-dir={self.root / 'apiserver'}", *serving,
                f"--client-ca-file={pki / 'ca.crt'}", "--authorization-mode=RBAC",
                # On by default since 1.25; named so that a change of defaults cannot drop it.
                "--enable-admission-plugins=PodSecurity",
                f"--service-cluster-ip-range={SERVICE_CIDR}", f"--service-account-issuer={ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
                # pods/log: the node agents serve it on 127.0.0.1 with the serving certificate.
                "--kubelet-preferred-address-types=InternalIP", f"--kubelet-certificate-authority={pki / 'ca.crt'}",
                f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
                f"--audit-policy-file={self.root / 'audit-policy.yaml'}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-mode=blocking",
                "--profiling=false",
            ]  # fmt: skip
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1", *serving, "--profiling=false"]
        if name == "kube-controller-manager":
            return [
                *common, f"--secure-port={p.controller_manager}", f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}", "--use-service-account-credentials=true",
                f"--controllers={','.join(CONTROLLERS)}", "--node-monitor-period=1s",
            ]  # fmt: skip
        if name == "kube-scheduler":
            return [*common, f"--secure-port={p.scheduler}"]
        raise ValueError(f"unknown component {name!r}")

    def _write_kubeconfig(self) -> None:
        def data(file: str) -> str:
            return base64.b64encode((self.pki / file).read_bytes()).decode()

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubetune-local", "preferences": {},
            "clusters": [{"name": "kubetune-local", "cluster": {"server": self.server, "certificate-authority-data": data("ca.crt")}}],
            "users": [{"name": "kubetune-admin", "user": {"client-certificate-data": data("admin.crt"), "client-key-data": data("admin.key")}}],
            "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": "kubetune-admin"}}],
        }  # fmt: skip
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="local-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("dir", type=Path, help="where the cluster keeps its certificates, data, logs and kubeconfig")
    args = parser.parse_args(argv)
    plane = ControlPlane(args.dir)
    if args.command == "down":
        plane.down()
        return 0
    started = time.monotonic()
    try:
        plane.up()
    except ClusterError as err:
        print(f"local-cluster: {err}", file=sys.stderr)
        return 1
    print(f"local-cluster: up in {time.monotonic() - started:.1f} s at {plane.server}\n"
          f"  export KUBECONFIG={plane.kubeconfig}\n  stop it with: scripts/local-cluster down {args.dir}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
