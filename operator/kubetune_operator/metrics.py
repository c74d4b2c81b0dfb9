"""Operator metrics (contract 8), served on port 8081 at /metrics.

Job names appear as labels (namespace, name); never spec values or credentials.
"""

from __future__ import annotations

import threading
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.spec import Phase

PHASES = [p.value for p in Phase]

REGISTRY = CollectorRegistry()
JOBS = Gauge("kubetune_operator_jobs", "FineTuneJobs by phase.", ["phase"], registry=REGISTRY)
JOB_PHASE = Gauge("kubetune_operator_job_phase", "1 for the job's current phase, 0 for the others.", ["namespace", "name", "phase"], registry=REGISTRY)
JOB_RESTARTS = Gauge("kubetune_operator_job_restarts", "Gang restarts of the job.", ["namespace", "name"], registry=REGISTRY)
JOB_PROGRESS = Gauge("kubetune_operator_job_progress_ratio", "Training steps done / planned (0-1).", ["namespace", "name"], registry=REGISTRY)
JOB_LOSS = Gauge("kubetune_operator_job_loss", "Last training loss reported in progress.json.", ["namespace", "name"], registry=REGISTRY)
JOB_DURATION = Gauge("kubetune_operator_job_duration_seconds", "Seconds since the workers were first created (until completion).", ["namespace", "name"], registry=REGISTRY)
RECONCILE_TOTAL = Counter("kubetune_operator_reconcile_total", "Reconciliation cycles by result (ok, error).", ["result"], registry=REGISTRY)
RECONCILE_ERRORS = Counter("kubetune_operator_reconcile_errors_total", "Reconciliation cycles that raised an error.", registry=REGISTRY)
STATUS_CONFLICTS = Counter("kubetune_operator_status_conflicts_total",
                           "Status writes refused because the job changed since it was read (409); each is decided again on the newer version.",
                           registry=REGISTRY)  # fmt: skip
RECONCILE_DURATION = Histogram("kubetune_operator_reconcile_duration_seconds", "Time of one reconciliation cycle.", registry=REGISTRY,
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))  # fmt: skip

_lock = threading.Lock()
_phases: dict[tuple[str, str], str] = {}
_server = None


def record_job(namespace: str, name: str, status: dict, duration: Optional[float]) -> None:
    phase = status.get("phase") or "Pending"
    with _lock:
        _phases[(namespace, name)] = phase
        _refresh_counts()
    for p in PHASES:
        JOB_PHASE.labels(namespace, name, p).set(1 if p == phase else 0)
    JOB_RESTARTS.labels(namespace, name).set(status.get("restarts", 0))
    progress = status.get("progress") or {}
    if progress.get("totalSteps"):
        JOB_PROGRESS.labels(namespace, name).set(progress["step"] / progress["totalSteps"])
    if status.get("loss") is not None:
        JOB_LOSS.labels(namespace, name).set(status["loss"])
    if duration is not None:
        JOB_DURATION.labels(namespace, name).set(duration)


def forget_job(namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((namespace, name), None)
        _refresh_counts()
    for p in PHASES:
        _remove(JOB_PHASE, namespace, name, p)
    for gauge in (JOB_RESTARTS, JOB_PROGRESS, JOB_LOSS, JOB_DURATION):
        _remove(gauge, namespace, name)


def forget_all_jobs() -> None:
    """Drop every job's series (the operator stops; a new one in this process starts clean)."""
    with _lock:
        jobs = list(_phases)
    for namespace, name in jobs:
        forget_job(namespace, name)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def _refresh_counts() -> None:
    for p in PHASES:
        JOBS.labels(p).set(sum(1 for v in _phases.values() if v == p))


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Start the /metrics server once per process (port 0 disables it)."""
    global _server
    with _lock:
        if _server is not None or not port:
            return
        _server, _thread = start_http_server(port, addr=host, registry=REGISTRY)


def stop() -> None:
    global _server
    with _lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            _server = None
