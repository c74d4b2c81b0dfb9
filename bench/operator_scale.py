"""Operator scale on the real API server: N FineTuneJobs created at once on the local control
plane (tests/cluster: etcd, kube-apiserver with RBAC, Pod Security admission and an audit
log, kube-controller-manager, kube-scheduler; no nodes), with the real operator (`python -m
kubetune_operator`) in its own process, logged in as the Helm chart's ServiceAccount with
the chart's RBAC and settings, its jobs' credentials Secret, and a real SeaweedFS as their
storage endpoint.

Measured: time until every job has all its children (ConfigMap, workers Service, one worker
Pod per node; seen by watches on the three kinds), each job's latency from its create call
to its last child (p50/p99), the operator's CPU seconds and peak RSS, and API requests per
job from the API server's audit log: the operator's own, plus the job's create, by "verb
resource[/subresource]" (`requests_per_job_by_verb`).
Floor: the same N job creates plus the same child creates (the operator's own pure builders
with the chart's settings, owned by the created jobs), sent directly as the cluster admin
through the operator's own client (lightkube), all jobs concurrently, each job's children in
order, in a namespace of their own after the operator stopped.

    python -m bench.operator_scale [--quick] [--jobs N] [--workdir DIR]   # prints the JSON
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from bench.common import REPO, BenchError, equal_work, percentile, ratio, same

for _folder in ("tests/cluster", "tests/operator"):  # the local control plane and the operator tests' harness, reused as is
    if str(REPO / _folder) not in sys.path:
        sys.path.insert(0, str(REPO / _folder))

TEMPLATE = REPO / "examples" / "lora-multinode.yaml"
CRD = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
SECRET = "s3-credentials"
WORKLOAD_SERVICE_ACCOUNT = "kubetune-workload"
JOBS = 200
CHILD_KINDS = ("configmaps", "services", "pods")


def job_documents(n: int, endpoint: str) -> list[dict]:
    template = yaml.safe_load(TEMPLATE.read_text())
    docs = []
    for i in range(n):
        doc = copy.deepcopy(template)
        name = f"scale-{i:04d}"
        doc["metadata"] = {"name": name}
        doc["spec"]["checkpoint"]["uri"] = f"s3://checkpoints/{name}"
        doc["spec"]["output"]["uri"] = f"s3://models/{name}"
        doc["spec"]["storage"]["endpoint"] = endpoint
        docs.append(doc)
    return docs


def children(job_object: dict, settings) -> list[dict]:
    """What the operator creates for a new job (its own builders), for the created job object."""
    from kubetune.api.spec import parse_job
    from kubetune_operator import builders

    job = parse_job(job_object)
    pods = [builders.build_worker_pod(job, i, settings) for i in range(job.spec.distributed.nodes)]
    return [builders.build_config_map(job), builders.build_worker_service(job), *pods]


def expected_children(doc: dict) -> dict[str, set[str]]:
    name, nodes = doc["metadata"]["name"], doc["spec"]["distributed"]["nodes"]
    return {"configmaps": {f"{name}-config"}, "services": {f"{name}-workers"}, "pods": {f"{name}-worker-{i}" for i in range(nodes)}}


class ChildWatch:
    """Watches on the namespace's ConfigMaps, Services and Pods (as the admin): when each
    name was first seen."""

    def __init__(self, client, namespace: str):
        self.client, self.namespace = client, namespace
        self.seen: dict[tuple[str, str], float] = {}
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        from lightkube.resources.core_v1 import ConfigMap, Pod, Service

        for plural, kind in zip(CHILD_KINDS, (ConfigMap, Service, Pod)):
            self.tasks.append(asyncio.ensure_future(self._watch(plural, kind)))
        await asyncio.sleep(1.0)  # the three watches established before anything is created

    async def _watch(self, plural: str, kind) -> None:
        async for _, obj in self.client.watch(kind, namespace=self.namespace):
            self.seen.setdefault((plural, obj.metadata.name), time.monotonic())

    def complete_at(self, doc: dict) -> Optional[float]:
        """When the last of a job's children was seen (None: not all yet)."""
        times = [self.seen.get((plural, name)) for plural, names in expected_children(doc).items() for name in names]
        return None if None in times else max(times)

    async def wait(self, docs: list[dict], timeout: float) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        done: dict[str, float] = {}
        while len(done) < len(docs) and time.monotonic() < deadline:
            for doc in docs:
                at = self.complete_at(doc)
                if at is not None:
                    done[doc["metadata"]["name"]] = at
            await asyncio.sleep(0.1)
        return done

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def create_jobs(kube, namespace: str, docs: list[dict], settings=None) -> dict[str, float]:
    """Create every job at once (and, with `settings`, each job's children after it, in order);
    returns each job's create time."""
    from kubetune_operator.kube import FineTuneJob

    created: dict[str, float] = {}

    async def one(doc: dict) -> None:
        created[doc["metadata"]["name"]] = time.monotonic()
        job = dict(await kube.client.create(FineTuneJob(doc), namespace=namespace))
        if settings is not None:
            for child in children(job, settings):
                if not await kube.create(child):
                    raise BenchError(f"{child['kind']} {child['metadata']['name']} already existed")

    await asyncio.gather(*(one(d) for d in docs))
    return created


async def measure(plane, namespace: str, docs: list[dict], timeout: float, settings=None) -> tuple[float, dict[str, float], dict[str, float]]:
    """Watches started, then every job created at once (with `settings`: and its children, the
    floor); returns the start, each job's create time and when its last child was seen."""
    kube = admin_kube(plane)
    watch = ChildWatch(kube.client, namespace)
    try:
        await watch.start()
        started = time.monotonic()
        created = await create_jobs(kube, namespace, docs, settings)
        done = await watch.wait(docs, timeout - (time.monotonic() - started))
    finally:
        await watch.stop()
        await kube.close()
    return started, created, done


def audit_counts(plane, since: int, wanted: Callable[[dict], bool]) -> dict[str, int]:
    """The requests the audit log recorded after byte offset `since` that `wanted(event)`
    selects, by "verb resource[/subresource]", most frequent first."""
    counts: dict[str, int] = {}
    with open(plane.audit_log, "rb") as log:
        log.seek(since)
        for line in log:
            event = json.loads(line)
            if event.get("stage") != "ResponseComplete" or not wanted(event):
                continue
            ref = event.get("objectRef") or {}
            key = f"{event['verb']} {ref['resource']}" + (f"/{ref['subresource']}" if ref.get("subresource") else "") if ref.get("resource") else "other"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def creates_in(namespace: str, resources: tuple[str, ...]) -> Callable[[dict], bool]:
    def wanted(event: dict) -> bool:
        ref = event.get("objectRef") or {}
        return event["verb"] == "create" and ref.get("namespace") == namespace and ref.get("resource") in resources and not ref.get("subresource")

    return wanted


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmHWM in /proc")


def admin_kube(plane):
    from lightkube import KubeConfig

    from kubetune_operator.kube import Kube

    return Kube(KubeConfig.from_file(plane.kubeconfig).get())


def secret(seaweed) -> dict:
    import base64

    data = {k: base64.b64encode(v.encode()).decode() for k, v in seaweed.env.items() if k.startswith("AWS_") and "KEY" in k}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET}, "data": data}


def run_operator_phase(plane, api, docs: list[dict], seaweed, workdir: Path, timeout: float) -> dict:
    import psutil
    from kube_harness import create_namespace
    from operator_harness import path, running_operator

    namespace = create_namespace(api, "scale-operator")
    api.create(path(namespace, "secrets"), secret(seaweed))
    # The chart's own reconcile interval (its default, 10 s), not the tests' fast one.
    with running_operator(plane, api, namespace, workdir, delete_jobs=False, interval="10") as operator:
        time.sleep(1.0)  # let kopf finish its initial listing
        process = psutil.Process(operator.proc.pid)
        cpu_before = sum(process.cpu_times()[:2])
        audit_from = plane.audit_log.stat().st_size

        started, created, done = asyncio.run(measure(plane, namespace, docs, timeout))
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        peak = peak_rss(operator.proc.pid)
        time.sleep(1.0)  # the audit log's last lines
        job_creates = creates_in(namespace, ("finetunejobs",))
        breakdown = audit_counts(plane, audit_from, lambda e: e["user"]["username"] == operator.user or job_creates(e))
        settings_env = operator.release.operator_env()
    finished = max(done.values()) if done else time.monotonic()
    return {
        "jobs_complete": len(done),
        "total_seconds": finished - started,
        "latencies": [done[n] - created[n] for n in done],
        "operator_cpu_seconds": cpu,
        "operator_peak_rss_bytes": peak,
        "api_requests": sum(breakdown.values()),
        "api_requests_by_verb": breakdown,
        "_settings_env": settings_env,
    }


def run_floor(plane, api, docs: list[dict], settings_env: dict[str, str], timeout: float) -> dict:
    from kube_harness import create_namespace
    from operator_harness import path

    from kubetune_operator.settings import Settings

    namespace = create_namespace(api, "scale-floor")
    # What the chart puts in a namespace before the operator's pods can run there.
    api.create(path(namespace, "serviceaccounts"), {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": WORKLOAD_SERVICE_ACCOUNT},
                                                     "automountServiceAccountToken": False})  # fmt: skip
    settings = Settings.from_env(settings_env)
    audit_from = plane.audit_log.stat().st_size

    started, created, done = asyncio.run(measure(plane, namespace, docs, timeout, settings))
    time.sleep(1.0)  # the audit log's last lines
    breakdown = audit_counts(plane, audit_from, creates_in(namespace, ("finetunejobs", *CHILD_KINDS)))
    finished = max(done.values()) if done else time.monotonic()
    return {
        "jobs_complete": len(done),
        "total_seconds": finished - started,
        "latencies": [done[n] - created[n] for n in done],
        "api_requests": sum(breakdown.values()),
        "api_requests_by_verb": breakdown,
    }


def summarize(phase: dict, n: int) -> dict:
    latencies = phase.pop("latencies")
    phase["p50_seconds"] = percentile(latencies, 50) if latencies else None
    phase["p99_seconds"] = percentile(latencies, 99) if latencies else None
    phase["requests_per_job"] = phase["api_requests"] / n
    phase["requests_per_job_by_verb"] = {k: v / n for k, v in phase["api_requests_by_verb"].items()}
    return phase


def run(workdir: Path, quick: bool = False, jobs: Optional[int] = None) -> dict:
    from kube_harness import KubeApi, apply_crd
    from localcluster import ControlPlane

    from kubetune.artifacts.embedded_s3 import SeaweedS3

    n = jobs or (5 if quick else JOBS)
    timeout = 60 if quick else max(180, 2 * n)
    workdir.mkdir(parents=True, exist_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    plane = ControlPlane(workdir / "cluster")
    with SeaweedS3(workdir / "seaweed", buckets=("checkpoints", "models")) as seaweed:
        plane.up()
        try:
            api = KubeApi.admin(plane)
            apply_crd(plane, CRD)
            docs = job_documents(n, seaweed.endpoint)
            operator = summarize(run_operator_phase(plane, api, docs, seaweed, workdir, timeout), n)
            floor = summarize(run_floor(plane, api, docs, operator.pop("_settings_env"), timeout), n)
        finally:
            plane.down()
    nodes = docs[0]["spec"]["distributed"]["nodes"]
    work = equal_work(
        jobs_with_children=same(operator["jobs_complete"], floor["jobs_complete"]),
        all_jobs=same(floor["jobs_complete"], n),
    )
    return {
        "jobs": n,
        "api_server": "kube-apiserver v1.37.2 + etcd, local control plane (tests/cluster), RBAC, Pod Security, audit log",
        "children_per_job": 2 + nodes,
        "operator": operator,
        "floor": floor,
        "equal_work": work,
        "load_average_before": load,
        # Floor time over operator time: 1 would be as fast as raw creates, the goal is >= 0.5.
        "ratio": ratio(operator["total_seconds"], floor["total_seconds"], work, higher_is_better=False),
    }


def main() -> None:
    """`python -m bench.operator_scale [--quick] [--jobs N] [--workdir DIR]`: print the figures as JSON
    (bench/run_cpu.py runs the same `run` for bench/results/cpu.json)."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 jobs")
    parser.add_argument("--jobs", type=int, default=None, help=f"number of FineTuneJobs (default {JOBS}, 5 with --quick)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the work files (operator log, the cluster's logs and audit log) here")
    args = parser.parse_args()
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        result = run(args.workdir or Path(tmp), quick=args.quick, jobs=args.jobs)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
