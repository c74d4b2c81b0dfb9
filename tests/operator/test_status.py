"""The job state machine: observed children + progress.json + previous status -> new status."""

from __future__ import annotations

from datetime import datetime, timedelta

import jsonschema
import pytest
from operator_helpers import example

from kubetune.api.crd import FineTuneJobStatus, open_api_schema, strict_schema
from kubetune.api.layout import job_layout
from kubetune.api.progress import Progress
from kubetune_operator.status import Action, Observed, PodState, decide

NOW = datetime(2026, 11, 22, 12, 0, 0)
STATUS_SCHEMA = strict_schema(open_api_schema()["properties"]["status"])
A = Action


def pods(*phases, attempt=0, codes=None):
    codes = codes or {}
    return {i: PodState(f"qa-bot-worker-{i}", p, exit_code=codes.get(i), attempt=attempt, log_tail="boom" if p == "Failed" else "") for i, p in enumerate(phases)}


def job(name="lora-multinode.yaml", **policy):
    j = example(name)
    for key, value in policy.items():
        setattr(j.spec.run_policy if key != "serving" else j.spec.serving, key if key != "serving" else "enabled", value)
    return j


def run(previous, observed=None, progress=None, j=None, now=NOW):
    """`previous` as the API holds it (a dict) or as an earlier decision left it."""
    j = j or job()
    previous = FineTuneJobStatus.model_validate(previous) if isinstance(previous, dict) else previous
    return decide(j, observed or Observed(), progress, previous, now, job_layout(j))


# (previous status, observed workers, expected phase, expected actions, expected event reasons)
TABLE = [
    pytest.param({}, {}, "Pending", [A.ENSURE_TRAINING_INFRA, A.CREATE_WORKERS], ["Created"], id="new job creates the gang"),
    pytest.param({"phase": "Pending"}, pods("Pending", "Running"), "Pending", [A.ENSURE_TRAINING_INFRA], [], id="waits for every worker"),
    pytest.param({"phase": "Pending"}, pods("Running"), "Pending", [A.ENSURE_TRAINING_INFRA, A.CREATE_WORKERS], [], id="creates only the missing worker"),
    pytest.param({"phase": "Pending"}, pods("Running", "Running"), "Running", [A.ENSURE_TRAINING_INFRA], ["Running"], id="all running"),
    pytest.param({"phase": "Running"}, pods("Running", "Running"), "Running", [A.ENSURE_TRAINING_INFRA], [], id="steady state: nothing to do"),
    pytest.param({"phase": "Running"}, pods("Running", "Failed", codes={1: 1}), "Restarting", [A.ENSURE_TRAINING_INFRA, A.DELETE_WORKERS], ["GangRestart"], id="failed worker restarts the gang"),
    pytest.param({"phase": "Running"}, pods("Running"), "Restarting", [A.ENSURE_TRAINING_INFRA, A.DELETE_WORKERS], ["GangRestart"], id="vanished worker restarts the gang"),
    pytest.param({"phase": "Restarting", "attempt": 1, "restarts": 1}, pods("Running", "Failed"), "Restarting", [A.ENSURE_TRAINING_INFRA, A.DELETE_WORKERS], [], id="old gang deleted before the new one"),
    pytest.param({"phase": "Restarting", "attempt": 1, "restarts": 1}, {}, "Restarting", [A.ENSURE_TRAINING_INFRA, A.CREATE_WORKERS], [], id="new gang created"),
    pytest.param({"phase": "Restarting", "attempt": 1, "restarts": 1}, pods("Running", "Running", attempt=1), "Running", [A.ENSURE_TRAINING_INFRA], ["Running"], id="new gang running"),
    pytest.param({"phase": "Running"}, pods("Failed", "Running", codes={0: 64}), "Failed", [A.ENSURE_TRAINING_INFRA, A.DELETE_WORKERS, A.DELETE_MERGE], ["InvalidInput"], id="exit 64 fails without retry"),
    pytest.param({"phase": "Running", "restarts": 3}, pods("Failed", "Running", codes={0: 1}), "Failed", [A.ENSURE_TRAINING_INFRA, A.DELETE_WORKERS, A.DELETE_MERGE], ["BackoffLimitExceeded"], id="backoff limit"),
    pytest.param({"phase": "Running"}, pods("Succeeded", "Succeeded"), "Merging", [A.ENSURE_TRAINING_INFRA, A.CREATE_MERGE], ["Merging"], id="training done -> merge"),
    pytest.param({"phase": "Failed", "failureReason": "BackoffLimitExceeded"}, pods("Failed"), "Failed", [A.DELETE_WORKERS, A.DELETE_MERGE], [], id="failed stays failed"),
]


@pytest.mark.parametrize("previous, workers, phase, actions, events", TABLE)
def test_transitions(previous, workers, phase, actions, events):
    decision = run(previous, Observed(workers=workers))
    assert decision.status.phase == phase
    assert decision.actions == actions
    assert [e.reason for e in decision.events] == events
    # What the operator writes is what the CRD's status schema accepts (unknown fields refused).
    jsonschema.Draft4Validator(STATUS_SCHEMA).validate(decision.status.document())


def test_restart_counts_and_failure_names_pod_exit_code_and_log():
    d = run({"phase": "Running", "restarts": 1}, Observed(workers=pods("Running", "Failed", codes={1: 137})))
    assert (d.status.restarts, d.status.attempt, d.status.last_failed_pod) == (2, 1, "qa-bot-worker-1")
    assert "exit code 137" in d.events[0].message and "restart 2 of 3" in d.events[0].message
    d = run({"phase": "Running", "restarts": 3}, Observed(workers=pods("Running", "Failed", codes={1: 137})))
    assert d.status.failure_reason == "BackoffLimitExceeded"
    assert "qa-bot-worker-1" in d.status.failure and "137" in d.status.failure and "boom" in d.status.failure
    assert any(c["type"] == "Failed" and c["reason"] == "BackoffLimitExceeded" for c in d.status.document()["conditions"])


def test_the_pod_that_caused_a_gang_failure_is_blamed_not_its_peers():
    # Worker 1 was killed (137); worker 0 then exited 1 on the broken rendezvous.
    d = run({"phase": "Running"}, Observed(workers=pods("Failed", "Failed", codes={0: 1, 1: 137})))
    assert d.status.last_failed_pod == "qa-bot-worker-1" and "exit code 137" in d.events[0].message
    # Bad input on worker 1 fails the job even when worker 0 only saw its peer go away.
    d = run({"phase": "Running"}, Observed(workers=pods("Failed", "Failed", codes={0: 1, 1: 64})))
    assert d.status.failure_reason == "InvalidInput"


def test_preemption_restarts_without_counting():
    d = run({"phase": "Running", "restarts": 1}, Observed(workers=pods("Failed", "Failed", codes={0: 75, 1: 75})))
    assert d.status.phase == "Restarting" and d.status.restarts == 1 and d.status.attempt == 1


def test_suspend_deletes_workers_and_resume_starts_a_new_gang():
    d = run({"phase": "Running", "startTime": "2026-11-22T11:00:00Z"}, Observed(workers=pods("Running", "Running")), j=job(suspend=True))
    assert d.status.phase == "Suspended" and d.actions == [A.DELETE_WORKERS]
    assert [e.reason for e in d.events] == ["Suspended"]
    d = run(d.status, Observed(), j=job(suspend=True))
    assert d.status.phase == "Suspended" and d.actions == [] and d.events == []
    d = run(d.status, Observed())
    assert d.status.phase == "Pending" and A.CREATE_WORKERS in d.actions
    assert [e.reason for e in d.events] == ["Resumed"]
    assert not any(c["type"] == "Suspended" for c in d.status.document()["conditions"])


def test_merge_then_serving_then_ready():
    d = run({"phase": "Merging"}, Observed(workers=pods("Succeeded", "Succeeded")))
    assert d.actions == [A.CREATE_MERGE]
    d = run(d.status, Observed(merge=PodState("qa-bot-merge", "Succeeded")))
    assert d.status.phase == "Serving" and d.actions == [A.ENSURE_SERVING]
    assert d.status.endpoint == "http://qa-bot-serve.default.svc:8000/v1"
    assert d.status.completion_time == "2026-11-22T12:00:00Z"
    ready = next(c for c in d.status.document()["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServingNotReady")
    d = run(d.status, Observed(serving_ready_replicas=1))
    ready = next(c for c in d.status.document()["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ServingReady")
    assert [e.reason for e in d.events] == ["ServingReady"]
    # Turning serving off keeps the outputs and removes the server.
    d = run(d.status, Observed(serving_ready_replicas=1), j=job(serving=False))
    assert d.status.phase == "Succeeded" and d.actions == [A.DELETE_SERVING] and "endpoint" not in d.status.document()


def test_merge_failure_retries_then_fails():
    d = run({"phase": "Merging", "restarts": 0}, Observed(merge=PodState("qa-bot-merge", "Failed", exit_code=1)))
    assert d.status.phase == "Merging" and d.actions == [A.DELETE_MERGE] and d.status.restarts == 1
    d = run({"phase": "Merging"}, Observed(merge=PodState("qa-bot-merge", "Failed", exit_code=64)))
    assert d.status.phase == "Failed" and d.status.failure_reason == "MergeFailed"


def test_adapter_only_methods_skip_the_merge():
    d = run({"phase": "Running"}, Observed(workers={0: PodState("faq-ptuning-worker-0", "Succeeded")}), j=job("ptuning-cpu.yaml"))
    assert d.status.phase == "Serving"
    assert d.status.document()["outputs"] == {"adapterUri": "s3://models/faq-ptuning/adapter"}


def test_progress_json_fills_progress_loss_checkpoint_and_outputs():
    progress = Progress(phase="training", step=50, total_steps=200, loss=1.234567891, eta_seconds=90.04,
                        last_checkpoint="step-000000050", last_checkpoint_uri="s3://checkpoints/qa-bot/step-000000050",
                        outputs={"adapter": "s3://models/qa-bot/adapter", "model": None})  # fmt: skip
    d = run({"phase": "Running"}, Observed(workers=pods("Running", "Running")), progress)
    assert d.status.document()["progress"] == {"step": 50, "totalSteps": 200, "percent": 25.0, "summary": "50/200", "etaSeconds": 90.0}
    assert d.status.loss == pytest.approx(1.234568)
    assert d.status.last_checkpoint == "s3://checkpoints/qa-bot/step-000000050"
    assert d.status.document()["outputs"] == {"adapterUri": "s3://models/qa-bot/adapter"}


def test_invalid_spec_fails_once_and_recovers_when_fixed():
    d = run({}, Observed(problems=["Secret 's3-credentials' not found in namespace default"]))
    assert d.status.phase == "Failed" and d.status.failure_reason == "InvalidSpec" and d.actions == []
    assert [e.reason for e in d.events] == ["InvalidSpec"]
    again = run(d.status, Observed(problems=["Secret 's3-credentials' not found in namespace default"]))
    assert again.events == [] and again.status.phase == "Failed"
    fixed = run(again.status, Observed())
    assert fixed.status.phase == "Pending" and A.CREATE_WORKERS in fixed.actions
    assert not any(c["type"] in ("InvalidSpec", "Failed") for c in fixed.status.document()["conditions"])


def test_running_job_with_changed_training_fields_keeps_running_and_says_so():
    d = run({"phase": "Running"}, Observed(workers=pods("Running", "Running"), spec_changes=["training"]))
    assert d.status.phase == "Running" and d.actions == [A.ENSURE_TRAINING_INFRA]
    refused = next(c for c in d.status.document()["conditions"] if c["type"] == "SpecChangeRefused")
    assert "spec.training" in refused["message"] and [e.reason for e in d.events] == ["SpecChangeRefused"]
    assert run(d.status, Observed(workers=pods("Running", "Running"), spec_changes=["training"])).events == []


def test_deadline_and_ttl():
    j = job()
    j.spec.run_policy.active_deadline_seconds = 60
    d = run({"phase": "Running", "startTime": "2026-11-22T11:58:00Z"}, Observed(workers=pods("Running", "Running")), j=j)
    assert d.status.phase == "Failed" and d.status.failure_reason == "DeadlineExceeded"
    j = job(serving=False)
    j.spec.run_policy.ttl_seconds_after_finished = 60
    status = {"phase": "Succeeded", "completionTime": "2026-11-22T11:58:00Z"}
    done = pods("Succeeded", "Succeeded")
    assert run(status, Observed(workers=done), j=j, now=NOW - timedelta(minutes=1, seconds=30)).actions == []
    assert run(status, Observed(workers=done), j=j).actions == [A.DELETE_WORKERS]


def test_condition_transition_time_moves_only_on_flips():
    d1 = run({"phase": "Pending"}, Observed(workers=pods("Running", "Running")))
    d2 = run(d1.status, Observed(workers=pods("Running", "Running")), now=NOW + timedelta(minutes=5))
    t1 = next(c for c in d1.status.document()["conditions"] if c["type"] == "Training")["lastTransitionTime"]
    t2 = next(c for c in d2.status.document()["conditions"] if c["type"] == "Training")["lastTransitionTime"]
    assert t1 == t2 == "2026-11-22T12:00:00Z"


def test_problems_on_a_started_job_are_reported_but_training_goes_on():
    previous = {"phase": "Running", "startTime": "2026-11-22T11:00:00Z"}
    d = run(previous, Observed(workers=pods("Running", "Failed", codes={1: 1}), problems=["spec.storage.credentialsSecret: Secret 's3' not found"]))
    assert d.status.phase == "Restarting" and A.DELETE_WORKERS in d.actions
    assert any(c["type"] == "InvalidSpec" for c in d.status.document()["conditions"]) and "failureReason" not in d.status.document()
    assert [e.reason for e in d.events] == ["InvalidSpec", "GangRestart"]
    # Without a usable job (the live spec does not parse and no started copy) nothing is touched.
    d = decide(None, Observed(problems=["spec.distributed.nodes: must be >= 1"]), None, FineTuneJobStatus.model_validate(previous), NOW, generation=3)
    assert d.actions == [] and d.status.phase == "Running" and d.status.observed_generation == 3


def figures(kept: int, base_right: int = 30, warn_below: float = 0.9, lost: int | None = None) -> dict:
    """spec.retention's probe figures as the trainer writes them into progress.json."""
    lost = base_right - kept if lost is None else lost
    ratio = round(kept / base_right, 4) if base_right else None
    return {"probes": 94, "base_right": base_right, "kept": kept, "kept_ratio": ratio, "warn_below": warn_below,
            "below_threshold": ratio is not None and ratio < warn_below, "lost": [f"Q{i}?" for i in range(lost)]}  # fmt: skip


# (probe figures in progress.json, expected status.retention, expected (type, reason, message) of the one Event)
RETENTION_TABLE = [
    pytest.param(figures(26, lost=4), {"probes": 94, "baseRight": 30, "kept": 26, "keptRatio": 0.8667, "warnBelow": 0.9, "lost": ["Q0?", "Q1?", "Q2?", "Q3?"]},
                 ("Warning", "KnowledgeLost", "26 of 30 probes the base model answered right are still right (87%), below spec.retention.probes.warnBelow 90%; lost: Q0?; Q1?; Q2?; Q3?"),
                 id="below the threshold: one Warning naming what was lost"),
    pytest.param(figures(27), {"probes": 94, "baseRight": 30, "kept": 27, "keptRatio": 0.9, "warnBelow": 0.9, "lost": ["Q0?", "Q1?", "Q2?"]},
                 ("Normal", "KnowledgeKept", "27 of 30 probes the base model answered right are still right (90%)"), id="at the threshold: Normal"),
    pytest.param(figures(10), {"probes": 94, "baseRight": 30, "kept": 10, "keptRatio": 0.3333, "warnBelow": 0.9, "lost": [f"Q{i}?" for i in range(10)]},
                 ("Warning", "KnowledgeLost", "10 of 30 probes the base model answered right are still right (33%), below spec.retention.probes.warnBelow 90%; lost: "
                  + "; ".join(f"Q{i}?" for i in range(10)) + " (and 10 more)"), id="many lost: the first ten named"),
    pytest.param(figures(0, base_right=0), {"probes": 94, "baseRight": 0, "kept": 0, "warnBelow": 0.9, "lost": []},
                 ("Normal", "KnowledgeKept", "the base model answered none of the 94 probes right: nothing to keep"), id="nothing to keep"),
    pytest.param(figures(20, warn_below=0.5), {"probes": 94, "baseRight": 30, "kept": 20, "keptRatio": 0.6667, "warnBelow": 0.5, "lost": [f"Q{i}?" for i in range(10)]},
                 ("Normal", "KnowledgeKept", "20 of 30 probes the base model answered right are still right (67%)"), id="the user's own threshold"),
]  # fmt: skip


@pytest.mark.parametrize("retention, expected, event", RETENTION_TABLE)
def test_probe_figures_go_to_status_with_one_event(retention, expected, event):
    progress = Progress(phase="exporting", step=200, total_steps=200, retention=retention)
    d = run({"phase": "Running"}, Observed(workers=pods("Running", "Running")), progress)
    assert d.status.document()["retention"] == expected
    jsonschema.Draft4Validator(STATUS_SCHEMA).validate(d.status.document())  # what the API server accepts
    assert [(e.type, e.reason, e.message) for e in d.events if e.reason.startswith("Knowledge")] == [event]
    # Said once: later runs (progress.json still holds the figures) keep the status and stay quiet.
    done = Progress(phase="done", step=200, total_steps=200, retention=retention)
    again = run(d.status, Observed(workers=pods("Succeeded", "Succeeded")), done)
    assert again.status.document()["retention"] == expected and again.status.phase == "Merging"
    assert not [e for e in again.events if e.reason.startswith("Knowledge")]


def test_no_probe_figures_no_retention_status():
    d = run({"phase": "Running"}, Observed(workers=pods("Running", "Running")), Progress(phase="training", step=5, total_steps=200))
    assert "retention" not in d.status.document() and not [e for e in d.events if e.reason.startswith("Knowledge")]
