"""Operator metrics (contract 8), served on port 8081 at /metrics.

`OperatorMetrics` owns its registry and its HTTP server. The per-job series are not set
by hand: `JobCollector` computes them from the operator's state (the last status decided
for each job) each time Prometheus scrapes, so a deleted job's series go with its record
and the duration counts up to the scrape. The reconcile counters and histogram count runs
as they happen. Job names appear as labels (namespace, name); never spec values or
credentials.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Callable, Iterable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kubetune.api.crd import FineTuneJobStatus
from kubetune.api.spec import Phase

from .status import parse_iso, utc_now

PHASES = [p.value for p in Phase]
JOB_LABELS = ["namespace", "name"]

# (namespace, name) and the job's last decided status, for every job the operator knows.
JobStatuses = Callable[[], Iterable[tuple[tuple[str, str], FineTuneJobStatus]]]
Clock = Callable[[], datetime]


def duration_seconds(status: FineTuneJobStatus, now: datetime) -> Optional[float]:
    """Seconds since the workers were first created, until completion (or `now`)."""
    if not status.start_time:
        return None
    end = parse_iso(status.completion_time) if status.completion_time else now
    return max(0.0, (end - parse_iso(status.start_time)).total_seconds())


class JobCollector(Collector):
    """The job series, computed from the jobs' statuses at scrape time."""

    def __init__(self, statuses: JobStatuses, clock: Clock = utc_now):
        self.statuses = statuses
        self.clock = clock

    def describe(self) -> list[Metric]:
        return list(self.families())

    def collect(self) -> Iterator[Metric]:
        families = self.families()
        jobs, phase, restarts, progress, loss, duration = families
        counts = dict.fromkeys(PHASES, 0)
        now = self.clock()
        for (namespace, name), status in self.statuses():
            current = (status.phase or Phase.Pending).value
            counts[current] += 1
            for p in PHASES:
                phase.add_metric([namespace, name, p], 1 if p == current else 0)
            restarts.add_metric([namespace, name], status.restarts)
            if status.progress is not None and status.progress.total_steps:
                progress.add_metric([namespace, name], status.progress.step / status.progress.total_steps)
            if status.loss is not None:
                loss.add_metric([namespace, name], status.loss)
            seconds = duration_seconds(status, now)
            if seconds is not None:
                duration.add_metric([namespace, name], seconds)
        for p, count in counts.items():
            jobs.add_metric([p], count)
        yield from families

    @staticmethod
    def families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("kubetune_operator_jobs", "FineTuneJobs by phase.", labels=["phase"]),
            GaugeMetricFamily("kubetune_operator_job_phase", "1 for the job's current phase, 0 for the others.", labels=JOB_LABELS + ["phase"]),
            GaugeMetricFamily("kubetune_operator_job_restarts", "Gang restarts of the job.", labels=JOB_LABELS),
            GaugeMetricFamily("kubetune_operator_job_progress_ratio", "Training steps done / planned (0-1).", labels=JOB_LABELS),
            GaugeMetricFamily("kubetune_operator_job_loss", "Last training loss reported in progress.json.", labels=JOB_LABELS),
            GaugeMetricFamily("kubetune_operator_job_duration_seconds", "Seconds since the workers were first created (until completion).",
                              labels=JOB_LABELS),  # fmt: skip
        )


class OperatorMetrics:
    """The operator's registry, the run counters and the /metrics server."""

    def __init__(self, statuses: JobStatuses, clock: Clock = utc_now):
        self.registry = CollectorRegistry()
        self.registry.register(JobCollector(statuses, clock))
        self.reconcile_total = Counter("kubetune_operator_reconcile_total", "Reconciliation cycles by result (ok, error).", ["result"],
                                       registry=self.registry)  # fmt: skip
        self.reconcile_errors = Counter("kubetune_operator_reconcile_errors_total", "Reconciliation cycles that raised an error.",
                                        registry=self.registry)  # fmt: skip
        self.status_conflicts = Counter("kubetune_operator_status_conflicts_total",
                                        "Status writes refused because the job changed since it was read (409); each is decided again on the newer version.",
                                        registry=self.registry)  # fmt: skip
        self.reconcile_duration = Histogram("kubetune_operator_reconcile_duration_seconds", "Time of one reconciliation cycle.", registry=self.registry,
                                            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))  # fmt: skip
        self._server = None
        self._lock = threading.Lock()

    def run_ok(self) -> None:
        self.reconcile_total.labels("ok").inc()

    def run_failed(self) -> None:
        self.reconcile_total.labels("error").inc()
        self.reconcile_errors.inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Start the /metrics server (once; port 0 disables it)."""
        with self._lock:
            if self._server is None and port:
                self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def stop(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.shutdown()
                self._server.server_close()
                self._server = None
