"""The operator's job series are computed from its state when Prometheus scrapes."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.crd import FineTuneJobStatus
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import Settings
from kubetune_operator.state import OperatorState

RUNNING = {"phase": "Running", "restarts": 2, "startTime": "2026-11-22T11:00:00Z", "loss": 1.5,
           "progress": {"step": 50, "totalSteps": 200, "percent": 25.0, "summary": "50/200"}}  # fmt: skip
SERVING = {"phase": "Serving", "startTime": "2026-11-22T10:00:00Z", "completionTime": "2026-11-22T10:30:00Z"}


def samples(metrics: OperatorMetrics) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def job_labels(name: str, **extra: str) -> tuple:
    return tuple(sorted({"namespace": "ml", "name": name, **extra}.items()))


def test_job_series_follow_the_state_at_every_scrape():
    state = OperatorState(Settings())
    now = [datetime(2026, 11, 22, 12, 0, 0)]
    metrics = OperatorMetrics(state.job_statuses, clock=lambda: now[0])  # the state's own, with a clock to set
    state.job(("ml", "a")).status = FineTuneJobStatus.model_validate(RUNNING)
    state.job(("ml", "b")).status = FineTuneJobStatus.model_validate(SERVING)
    state.job(("ml", "c"))  # seen, nothing decided yet: no series

    first = samples(metrics)
    assert first[("kubetune_operator_job_phase", job_labels("a", phase="Running"))] == 1
    assert first[("kubetune_operator_job_phase", job_labels("a", phase="Pending"))] == 0
    assert first[("kubetune_operator_job_restarts", job_labels("a"))] == 2
    assert first[("kubetune_operator_job_progress_ratio", job_labels("a"))] == 0.25
    assert first[("kubetune_operator_job_loss", job_labels("a"))] == 1.5
    assert first[("kubetune_operator_job_duration_seconds", job_labels("a"))] == 3600
    assert first[("kubetune_operator_job_duration_seconds", job_labels("b"))] == 1800  # until completion
    assert ("kubetune_operator_job_progress_ratio", job_labels("b")) not in first
    assert not any(labels and dict(labels).get("name") == "c" for _, labels in first)
    assert first[("kubetune_operator_jobs", (("phase", "Running"),))] == 1
    assert first[("kubetune_operator_jobs", (("phase", "Serving"),))] == 1

    # A later scrape sees the running job's duration grow and a deleted job gone.
    now[0] = datetime(2026, 11, 22, 12, 10, 0)
    state.forget(("ml", "b"), uid=None)
    second = samples(metrics)
    assert second[("kubetune_operator_job_duration_seconds", job_labels("a"))] == 4200
    assert not any(labels and dict(labels).get("name") == "b" for _, labels in second)
    assert second[("kubetune_operator_jobs", (("phase", "Serving"),))] == 0
