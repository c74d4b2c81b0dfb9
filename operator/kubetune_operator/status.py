"""The job's state machine as one pure function.

    decide(job, observed, progress, previous status, now) -> Decision(status, actions, events)

`observed` is what `observe.py` saw this cycle (children, Secret, semantic problems);
`actions` say which children `act.py` creates or deletes; `events` are emitted for every
phase transition. Status is the typed `FineTuneJobStatus` that also generates the CRD's
status schema (`kubetune.api.crd`), so what the operator writes and what the API accepts have
one source. No I/O here, so every transition is unit-tested from a table.

Phases: Pending -> Running -> (Restarting -> Running)* -> Merging -> Serving | Succeeded,
with Suspended (runPolicy.suspend) and Failed (InvalidSpec, InvalidInput, BackoffLimitExceeded,
DeadlineExceeded, MergeFailed) on the side.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Optional

from kubetune.api import exitcodes
from kubetune.api.crd import LOST_SHOWN, Condition, FineTuneJobStatus, OutputsStatus, ProgressStatus, RetentionStatus
from kubetune.api.layout import JobLayout
from kubetune.api.naming import worker_pod_name
from kubetune.api.progress import Progress
from kubetune.api.spec import FineTuneJob, Phase

from . import builders


class Action(str, enum.Enum):
    ENSURE_TRAINING_INFRA = "ensure-training-infra"  # ConfigMap + headless Service
    CREATE_WORKERS = "create-workers"  # the missing worker pods of the gang
    DELETE_WORKERS = "delete-workers"
    CREATE_MERGE = "create-merge"
    DELETE_MERGE = "delete-merge"
    ENSURE_SERVING = "ensure-serving"  # Deployment + Service
    DELETE_SERVING = "delete-serving"


@dataclass(frozen=True)
class PodState:
    name: str
    phase: str  # Pending | Running | Succeeded | Failed | Unknown
    exit_code: Optional[int] = None
    attempt: int = 0  # gang generation (label kubetune.io/attempt)
    deleting: bool = False
    reason: str = ""  # e.g. OOMKilled, Evicted
    log_tail: str = ""  # last log lines, fetched by the handler for failed pods only
    finished_at: str = ""  # RFC 3339 time the container terminated

    @property
    def blame_order(self) -> tuple:
        """Which of several failed workers caused the gang to fail: when one node dies, its
        peers exit 1 on the broken rendezvous, so a specific code (a kill, OOM, 64/74/75)
        names the cause; then the earliest, then by name for a stable answer."""
        return (self.exit_code == 1, self.finished_at or "~", self.name)

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"


@dataclass
class Observed:
    workers: dict[int, PodState] = field(default_factory=dict)  # by node index
    merge: Optional[PodState] = None
    serving_ready_replicas: Optional[int] = None  # None: no Deployment
    problems: list[str] = field(default_factory=list)  # InvalidSpec messages (schema, semantics, Secret)
    spec_changes: list[str] = field(default_factory=list)  # training fields changed since the workers started
    memory: Optional[tuple[bool, str]] = None  # (fits, message) from the memory planner; None: unknown
    warnings: list[str] = field(default_factory=list)  # runs, but likely not meant (validation.job_warnings)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: FineTuneJobStatus
    actions: list[Action]
    events: list[Event]


ACTIVE = (Phase.Pending, Phase.Running, Phase.Restarting)
TERMINAL = (Phase.Succeeded, Phase.Failed)


def utc_now() -> datetime:
    """Now in UTC, naive (the status's times are UTC without a zone)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=None)


def set_condition(conditions: list[Condition], type_: str, status: str, reason: str, message: str, now: datetime,
                  generation: Optional[int]) -> list[Condition]:  # fmt: skip
    """Conditions by type; lastTransitionTime moves only when the status flips."""
    old = next((c for c in conditions if c.type == type_), None)
    changed = old is None or old.status != status
    new = Condition(type=type_, status=status, reason=reason, message=message, observed_generation=generation,
                    last_transition_time=iso(now) if changed else old.last_transition_time or iso(now))  # fmt: skip
    return sorted([c for c in conditions if c.type != type_] + [new], key=lambda c: c.type)


def drop_condition(conditions: list[Condition], type_: str) -> list[Condition]:
    return [c for c in conditions if c.type != type_]


def describe_failure(pod: PodState) -> str:
    text = f"pod {pod.name} failed with exit code {pod.exit_code}" if pod.exit_code is not None else f"pod {pod.name} failed"
    if pod.reason:
        text += f" ({pod.reason})"
    if pod.log_tail:
        text += ". Last log lines:\n" + pod.log_tail
    return text


def progress_status(progress: Progress) -> ProgressStatus:
    return ProgressStatus(
        step=progress.step,
        total_steps=progress.total_steps,
        percent=progress.percent,
        summary=f"{progress.step}/{progress.total_steps}" if progress.total_steps else "",
        eta_seconds=round(progress.eta_seconds, 1) if progress.eta_seconds is not None else None,
    )


def merged_outputs(current: Optional[OutputsStatus], adapter: Optional[str], merged: Optional[str]) -> OutputsStatus:
    """`current` with the locations that are set; unset ones keep what was there."""
    update = {k: v for k, v in (("adapter_uri", adapter), ("merged_uri", merged)) if v}
    return (current or OutputsStatus()).model_copy(update=update)


def retention_status(figures: dict) -> RetentionStatus:
    """status.retention from the probe figures the trainer wrote into progress.json."""
    return RetentionStatus(probes=figures["probes"], base_right=figures["base_right"], kept=figures["kept"], kept_ratio=figures["kept_ratio"],
                           warn_below=figures["warn_below"], lost=list(figures["lost"][:LOST_SHOWN]))  # fmt: skip


def retention_event(retention: RetentionStatus, lost: int) -> Event:
    """The one Event about the probe figures: KnowledgeLost (Warning) below
    spec.retention.probes.warnBelow, else KnowledgeKept. `lost`: how many were lost in all."""
    if not retention.base_right:
        return Event("Normal", "KnowledgeKept", f"the base model answered none of the {retention.probes} probes right: nothing to keep")
    kept = (f"{retention.kept} of {retention.base_right} probes the base model answered right are still right "
            f"({100 * retention.kept_ratio:.0f}%)")  # fmt: skip
    if retention.kept_ratio >= retention.warn_below:
        return Event("Normal", "KnowledgeKept", kept)
    named = "; ".join(retention.lost) + (f" (and {lost - len(retention.lost)} more)" if lost > len(retention.lost) else "")
    return Event("Warning", "KnowledgeLost", f"{kept}, below spec.retention.probes.warnBelow {100 * retention.warn_below:.0f}%; lost: {named}")


class _Machine:
    """One reconciliation step; collects status changes, actions and events."""

    def __init__(self, job: Optional[FineTuneJob], observed: Observed, progress: Optional[Progress], previous: FineTuneJobStatus,
                 now: datetime, layout: Optional[JobLayout], generation: Optional[int]):  # fmt: skip
        self.job = job
        self.observed = observed
        self.progress = progress
        self.previous = previous
        self.now = now
        self.layout = layout
        self.generation = generation
        self.status = previous.model_copy(deep=True)
        self.actions: list[Action] = []
        self.events: list[Event] = []

    # -- helpers
    @property
    def phase(self) -> Optional[Phase]:
        return self.status.phase

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        self.status.conditions = set_condition(self.status.conditions, type_, status, reason, message, self.now, self.generation)

    def drop_condition(self, type_: str) -> None:
        self.status.conditions = drop_condition(self.status.conditions, type_)

    def move(self, phase: Phase, reason: str, message: str, warning: bool = False) -> None:
        if phase == self.phase:
            return
        self.status.phase = phase
        self.events.append(Event("Warning" if warning else "Normal", reason, message))
        if phase in TERMINAL or phase == Phase.Serving:
            self.status.completion_time = self.status.completion_time or iso(self.now)

    def fail(self, reason: str, message: str) -> None:
        self.status.failure_reason = reason
        self.status.failure = message
        self.condition("Failed", "True", reason, message)
        self.condition("Ready", "False", reason, message)
        self.move(Phase.Failed, reason, message, warning=True)
        self.actions.append(Action.DELETE_WORKERS)
        self.actions.append(Action.DELETE_MERGE)

    # -- stages
    def run(self) -> None:
        self._apply_progress()
        if self.observed.problems or self.job is None:
            self._invalid()
            if self.job is None or not self.status.start_time:
                return
            # Started: the workers run the spec they started with (the handler passes that
            # job); the current spec's problems stay visible as a condition.
        else:
            self.drop_condition("InvalidSpec")
        if self.phase == Phase.Failed:
            if self.status.failure_reason == "InvalidSpec":  # fixed spec: start over
                self.status.failure_reason = self.status.failure = None
                self.drop_condition("Failed")
                self.status.phase = None
            else:
                self.actions.append(Action.DELETE_WORKERS)
                self.actions.append(Action.DELETE_MERGE)
                return
        self._spec_changes()
        self._memory()
        phase = self.phase or Phase.Pending
        if phase in ACTIVE or phase == Phase.Suspended:
            self._train()
        if self.phase == Phase.Merging:
            self._merge()
        if self.phase in (Phase.Serving, Phase.Succeeded):
            self._serve()
            self._ttl()

    def _apply_progress(self) -> None:
        p = self.progress
        if p is None:
            return
        self.status.progress = progress_status(p)
        if p.loss is not None:
            self.status.loss = round(p.loss, 6)
        if p.last_checkpoint_uri or p.last_checkpoint:
            self.status.last_checkpoint = p.last_checkpoint_uri or p.last_checkpoint
        if p.outputs.get("adapter") or p.outputs.get("model"):
            self.status.outputs = merged_outputs(self.status.outputs, p.outputs.get("adapter"), p.outputs.get("model"))
        if p.retention is not None:
            retention = retention_status(p.retention)
            if self.status.retention is None:  # measured once, at the end of training: said once
                self.events.append(retention_event(retention, len(p.retention["lost"])))
            self.status.retention = retention

    def _invalid(self) -> None:
        message = "; ".join(self.observed.problems)
        self.condition("InvalidSpec", "True", "InvalidSpec", message)
        if not self.status.start_time and self.phase in (None, Phase.Pending, Phase.Failed):
            self.status.failure_reason = "InvalidSpec"
            self.status.failure = message
            self.condition("Ready", "False", "InvalidSpec", message)
            self.status.phase = Phase.Failed
        previous = self.previous.condition("InvalidSpec")
        if previous is None or previous.message != message:
            self.events.append(Event("Warning", "InvalidSpec", message))

    def _spec_changes(self) -> None:
        if self.observed.spec_changes:
            fields = ", ".join(f"spec.{f}" for f in self.observed.spec_changes)
            message = (f"{fields} changed after training started; the workers keep the spec they started with. "
                       "Delete and re-create the job to train with the new spec (serving and runPolicy changes apply).")  # fmt: skip
            was = self.status.condition("SpecChangeRefused")
            self.condition("SpecChangeRefused", "True", "TrainingFieldsImmutable", message)
            if was is None:
                self.events.append(Event("Warning", "SpecChangeRefused", message))
        else:
            self.drop_condition("SpecChangeRefused")

    def _memory(self) -> None:
        if self.observed.memory is None:
            return
        fits, message = self.observed.memory
        was = self.status.condition("MemoryFits")
        self.condition("MemoryFits", "True" if fits else "False", "PlanFits" if fits else "PlanExceedsMemory", message)
        if not fits and (was is None or was.status != "False" or was.message != message):
            self.events.append(Event("Warning", "MemoryPlan", message))

    def _train(self) -> None:
        spec = self.job.spec
        workers = self.observed.workers
        nodes = spec.distributed.nodes
        if spec.run_policy.suspend:
            if workers:
                self.actions.append(Action.DELETE_WORKERS)
            self.condition("Suspended", "True", "Suspended", "runPolicy.suspend is true: workers stopped, checkpoints kept")
            self.move(Phase.Suspended, "Suspended", "workers deleted; checkpoints are kept; set runPolicy.suspend: false to continue")
            return
        if self.phase == Phase.Suspended:
            self.drop_condition("Suspended")
            self.move(Phase.Pending, "Resumed", "resuming from the newest checkpoint")
        if self.phase is None:
            self.move(Phase.Pending, "Created", f"starting {nodes} worker(s) x {spec.distributed.gpus_per_node} process(es)")
        self.actions.append(Action.ENSURE_TRAINING_INFRA)
        if self._deadline_passed():
            return
        if any(w.attempt != self.status.attempt for w in workers.values()):
            # The previous gang is still there (being deleted): never mix two gangs.
            self.actions.append(Action.DELETE_WORKERS)
            return
        if self._gang_failed():
            return
        if workers and len(workers) == nodes and all(w.phase == "Succeeded" for w in workers.values()):
            self._training_done()
            return
        if len(workers) < nodes:
            self.actions.append(Action.CREATE_WORKERS)
            if not self.status.start_time:  # said once, when the job starts
                self.events += [Event("Warning", "SpecWarning", message) for message in self.observed.warnings]
            self.status.start_time = self.status.start_time or iso(self.now)
            self.status.training_generation = self.status.training_generation or self.generation
        if workers and len(workers) == nodes and all(w.phase in ("Running", "Succeeded") for w in workers.values()):
            self.condition("Training", "True", "WorkersRunning", f"{nodes} worker(s) running")
            self.move(Phase.Running, "Running", f"all {nodes} worker(s) running")
        else:
            self.condition("Training", "False", "WorkersStarting", f"{len(workers)}/{nodes} worker(s) created")

    def _deadline_passed(self) -> bool:
        deadline = self.job.spec.run_policy.active_deadline_seconds
        start = self.status.start_time
        if deadline and start and self.now.replace(tzinfo=None) > parse_iso(start) + timedelta(seconds=deadline):
            self.fail("DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds ({deadline}s)")
            return True
        return False

    def _gang_failed(self) -> bool:
        """A failed or vanished worker: replace the whole gang (or fail the job)."""
        workers = self.observed.workers
        nodes = self.job.spec.distributed.nodes
        failed = sorted((w for w in workers.values() if w.failed and not w.deleting), key=lambda w: w.blame_order)
        vanished = []
        if self.phase == Phase.Running:  # all workers existed; a missing one was deleted or evicted
            vanished = [i for i in range(nodes) if i not in workers]
        if not failed and not vanished:
            return False
        pod = failed[0] if failed else None
        cause = describe_failure(pod) if pod else f"pod {worker_pod_name(self.job.metadata.name, vanished[0])} disappeared"
        if pod is not None and pod.exit_code == exitcodes.INVALID_INPUT:
            self.fail("InvalidInput", f"the trainer rejected the job or its data (no retry): {cause}")
            return True
        self.status.last_failed_pod = pod.name if pod else worker_pod_name(self.job.metadata.name, vanished[0])
        if pod is not None and pod.exit_code == exitcodes.PREEMPTED:
            message = f"{cause}: preempted after saving a checkpoint; restarting the gang (not counted)"
        else:
            restarts = self.status.restarts + 1
            limit = self.job.spec.run_policy.backoff_limit
            if restarts > limit:
                self.fail("BackoffLimitExceeded", f"{cause}; runPolicy.backoffLimit ({limit}) restarts used up")
                return True
            self.status.restarts = restarts
            message = f"{cause}; restarting the gang from the newest checkpoint (restart {restarts} of {limit})"
        self.condition("Training", "False", "GangRestart", message)
        self.status.attempt += 1
        self.status.phase = Phase.Restarting
        self.events.append(Event("Warning", "GangRestart", message))
        self.actions.append(Action.DELETE_WORKERS)
        return True

    def _training_done(self) -> None:
        self.condition("Training", "False", "Completed", "training finished")
        layout = self.layout
        if layout is not None:
            # The layout's adapter (none for full/freeze) replaces the one reported; a merged model is added.
            outputs = merged_outputs(self.status.outputs, None, str(layout.model) if layout.model else None)
            self.status.outputs = outputs.model_copy(update={"adapter_uri": str(layout.adapter) if layout.adapter else None})
        if layout is not None and layout.needs_merge:
            self.move(Phase.Merging, "Merging", "training finished; merging the adapter into the base model")
        else:
            self._finish_training()

    def _finish_training(self) -> None:
        if self.job.spec.serving.enabled:
            self.move(Phase.Serving, "Serving", f"deploying the inference server at {builders.endpoint_url(self.job)}")
        else:
            self.condition("Ready", "True", "Succeeded", "training finished; outputs written")
            self.move(Phase.Succeeded, "Succeeded", "training finished; outputs written")

    def _merge(self) -> None:
        merge = self.observed.merge
        if merge is None:
            self.actions.append(Action.CREATE_MERGE)
            return
        if merge.phase == "Succeeded":
            self.condition("Merged", "True", "Merged", "adapter merged into the base model")
            self._finish_training()
            return
        if merge.failed:
            cause = describe_failure(merge)
            restarts = self.status.restarts + 1
            limit = self.job.spec.run_policy.backoff_limit
            if merge.exit_code == exitcodes.INVALID_INPUT or restarts > limit:
                self.fail("MergeFailed", cause)
                return
            self.status.restarts = restarts
            self.condition("Merged", "False", "MergeRetry", cause)
            self.events.append(Event("Warning", "MergeRetry", f"{cause}; retrying (restart {restarts} of {limit})"))
            self.actions.append(Action.DELETE_MERGE)

    def _serve(self) -> None:
        if not self.job.spec.serving.enabled:
            if self.observed.serving_ready_replicas is not None:
                self.actions.append(Action.DELETE_SERVING)
            self.status.endpoint = None
            self.drop_condition("Serving")
            self.condition("Ready", "True", "Succeeded", "training finished; outputs written")
            self.move(Phase.Succeeded, "ServingDisabled" if self.phase == Phase.Serving else "Succeeded", "serving disabled; outputs kept")
            return
        endpoint = builders.endpoint_url(self.job)
        self.move(Phase.Serving, "Serving", f"deploying the inference server at {endpoint}")
        self.actions.append(Action.ENSURE_SERVING)
        self.status.endpoint = endpoint
        ready = self.observed.serving_ready_replicas or 0
        wanted = self.job.spec.serving.replicas
        if wanted == 0 or ready > 0:
            was = self.status.condition("Ready")
            if was is None or was.status != "True":
                self.events.append(Event("Normal", "ServingReady", f"{ready}/{wanted} serving replica(s) ready at {endpoint}"))
            self.condition("Ready", "True", "ServingReady", f"{ready}/{wanted} serving replica(s) ready")
        else:
            self.condition("Ready", "False", "ServingNotReady", f"0/{wanted} serving replica(s) ready")

    def _ttl(self) -> None:
        ttl = self.job.spec.run_policy.ttl_seconds_after_finished
        done = self.status.completion_time
        if ttl is not None and done and self.now.replace(tzinfo=None) >= parse_iso(done) + timedelta(seconds=ttl):
            if self.observed.workers:
                self.actions.append(Action.DELETE_WORKERS)
            if self.observed.merge is not None:
                self.actions.append(Action.DELETE_MERGE)


def decide(job: Optional[FineTuneJob], observed: Observed, progress: Optional[Progress], previous: FineTuneJobStatus, now: datetime,
           layout: Optional[JobLayout] = None, generation: Optional[int] = None) -> Decision:
    """One reconciliation step. `job` is None when the resource failed schema validation
    (then `observed.problems` says why). `generation` defaults to the job's metadata.generation."""
    if generation is None and job is not None:
        generation = getattr(job.metadata, "generation", None)
    machine = _Machine(job, observed, progress, previous, now, layout, generation)
    machine.run()
    machine.status.observed_generation = machine.generation
    actions = list(dict.fromkeys(machine.actions))  # keep order, drop repeats
    return Decision(status=machine.status, actions=actions, events=machine.events)
