"""The operator process (`python -m kubetune_operator`, as its image runs it) is SIGKILLed in
every phase of a job's life against kmock, and a new one takes over: while it creates the
children, while training runs, while merging, and while the serving Deployment comes up.
Each child is created exactly once, nothing is restarted that was fine, and the status ends
as an uninterrupted run's (Serving, no restarts, outputs and endpoint set).

The in-process restart while Running is in tests/operator (a graceful stop); this is a hard
kill at each phase, by a real signal, of a real process.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys

import pytest

import operator_harness as harness
from kube_emulator import Cluster

from kubetune.testing import free_port

JOB = "qa-bot"
WORKERS = (f"{JOB}-worker-0", f"{JOB}-worker-1")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def wait_for(predicate, what: str):
    return harness.wait_for(predicate, timeout=90, what=what)


class OperatorProcess:
    def __init__(self, cluster, workdir):
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(KUBECONFIG=str(cluster.kubeconfig), KUBETUNE_RECONCILE_INTERVAL="0.3", KUBETUNE_TRAINER_IMAGE="kubetune/trainer:test")
        self.workdir = workdir
        self.proc = None
        self.kills = 0

    def start(self) -> None:
        self.env.update(KUBETUNE_OPERATOR_METRICS_PORT=str(free_port()), KUBETUNE_OPERATOR_LIVENESS_PORT=str(free_port()))
        log = open(self.workdir / f"operator-{self.kills}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "kubetune_operator"], env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill_and_restart(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def posts(cluster) -> collections.Counter:
    """POST requests per (resource, name), accepted or refused as already existing."""

    def count(emulator):
        out = collections.Counter()
        for r in list(emulator):
            if r.method == "POST" and r.resource is not None and isinstance(r.data, dict):
                out[(r.resource.plural, r.data.get("metadata", {}).get("name"))] += 1
        return out

    return cluster.run(count)


def uids(cluster, children) -> dict:
    """The uid of each existing child: a child deleted and created again gets a new one."""
    out = {}
    for plural, name in children:
        obj = cluster.objects(plural).get(name)
        if obj is not None:
            out[(plural, name)] = obj["metadata"]["uid"]
    return out


def test_operator_killed_in_every_phase_finishes_the_job_once(tmp_path):
    cluster = Cluster(tmp_path).start()
    api, kubectl = harness.Api(cluster.url), harness.Kubectl(cluster, tmp_path)
    operator = OperatorProcess(cluster, tmp_path)

    def status() -> dict:
        return kubectl.get_json("ftj", JOB).get("status") or {}

    expected = {("configmaps", f"{JOB}-config"), ("services", f"{JOB}-workers"), ("pods", WORKERS[0]), ("pods", WORKERS[1]),
                ("pods", f"{JOB}-merge"), ("deployments", f"{JOB}-serve"), ("services", f"{JOB}-serve")}  # fmt: skip
    first_seen: dict = {}

    def remember() -> None:
        for key, uid in uids(cluster, expected).items():
            first_seen.setdefault(key, uid)

    try:
        api.create_secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"})
        kubectl.apply(harness.REPO / "examples" / "lora-multinode.yaml")
        operator.start()

        # 1. creating children: killed as soon as the first one exists
        wait_for(lambda: posts(cluster)[("configmaps", f"{JOB}-config")], what="first child created")
        operator.kill_and_restart()
        wait_for(lambda: set(WORKERS) <= set(cluster.objects("pods")) and f"{JOB}-workers" in cluster.objects("services"), what="all children")
        remember()

        # 2. running
        for name in WORKERS:
            api.set_pod_status(name, "Running")
        wait_for(lambda: status().get("phase") == "Running", what="Running")
        operator.kill_and_restart()
        # The new operator must adopt the running gang, not replace it.
        wait_for(lambda: status().get("observedGeneration") == 1 and status().get("phase") == "Running", what="Running after restart")

        # 3. merging
        for name in WORKERS:
            api.set_pod_status(name, "Succeeded", exit_code=0)
        wait_for(lambda: f"{JOB}-merge" in cluster.objects("pods"), what="merge pod")
        remember()
        operator.kill_and_restart()
        wait_for(lambda: status().get("phase") == "Merging", what="Merging after restart")
        api.set_pod_status(f"{JOB}-merge", "Succeeded", exit_code=0)

        # 4. serving
        wait_for(lambda: f"{JOB}-serve" in cluster.objects("deployments"), what="serving Deployment")
        remember()
        operator.kill_and_restart()
        api.set_deployment_ready(f"{JOB}-serve", 1)
        final = wait_for(lambda: status().get("phase") == "Serving" and status().get("endpoint") and status(), what="Serving")

        # Every child was created once: each still has the uid it had when first seen (a
        # restarted operator that replaced one would have given it a new uid), and nothing else
        # was created. A new operator may POST a child that already exists (it creates a new
        # job's children without reading first); the API server refuses that with 409.
        remember()
        assert uids(cluster, expected) == first_seen and set(first_seen) == expected, (uids(cluster, expected), first_seen)
        created = {k for k in posts(cluster) if k[0] not in ("secrets", "finetunejobs", "events")}
        assert created == expected, created
        assert final["restarts"] == 0 and final["endpoint"] == f"http://{JOB}-serve.default.svc:8000/v1"
        assert final["outputs"] == {"adapterUri": "s3://models/qa-bot/adapter", "mergedUri": "s3://models/qa-bot/model"}
        assert operator.kills == 4
    finally:
        operator.stop()
        cluster.stop()
