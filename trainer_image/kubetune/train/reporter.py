"""The Reporter: one object that owns every place a training run reports to.

    events      JSON lines on stdout (rank 0): replay, start, resume, step, eval, checkpoint,
                retention, preempted, done
    metrics     Prometheus gauges and counters (rank 0, KUBETUNE_METRICS_PORT)
    status      CHECKPOINTS/progress.json (what the operator and `kubetune status` read),
                OUTPUT/metrics.jsonl and OUTPUT/summary.json
    trackers    experiment trackers (tracking.py: TensorBoard, SwanLab, W&B, MLflow) given to
                the constructor; each has `step(record)`, `evaluation(record)`, `close(failed)`

The recipe calls one method per thing that happened; the Reporter feeds each sink. Every rank
holds one (the Progress it keeps is the same everywhere) but only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Optional, Sequence

from ..api.layout import JobLayout
from ..api.progress import Progress
from ..api.spec import FineTuneJob
from ..artifacts.checkpoint import RetryPolicy, with_retry
from ..artifacts.storage import open_store
from ..retention.measure import describe
from .events import EventStream
from .metrics import TrainMetrics

log = logging.getLogger("kubetune.train")


class StatusWriter:
    """progress.json, metrics.jsonl and summary.json from rank 0, through the job's stores."""

    def __init__(self, job: FineTuneJob, layout: JobLayout, world_size: int, enabled: bool):
        self.enabled = enabled
        self.endpoint = job.spec.storage.endpoint
        self.layout = layout
        self.retry = RetryPolicy.from_env()
        self.progress = Progress(world_size=world_size)
        self.metrics_lines: list[str] = []
        self._stores: dict[str, Any] = {}

    def _put(self, store_uri, key: str, data: bytes) -> None:
        if self.enabled:
            store = self._stores.get(str(store_uri))
            if store is None:
                store = self._stores[str(store_uri)] = open_store(store_uri, endpoint=self.endpoint)
            with_retry(self.retry, f"writing {store_uri}/{key}", store.put_bytes, key, data)

    def update(self, **fields) -> None:
        for key, value in fields.items():
            setattr(self.progress, key, value)
        self.progress.updated_at = ""
        self._put(self.layout.checkpoints, "progress.json", self.progress.to_json())

    def fail(self, error: str) -> None:
        """Best effort: the operator shows this; a storage outage must not hide the real error."""
        try:
            self.update(phase="failed", error=error[:2000])
        except Exception as err:  # noqa: BLE001
            log.warning("could not record the failure in progress.json: %s", err)

    def restore_metrics(self, step: int) -> None:
        """After a resume, keep the metrics.jsonl lines of steps up to the checkpoint's."""
        if not self.enabled:
            return
        try:
            raw = open_store(self.layout.output, endpoint=self.endpoint).get_bytes("metrics.jsonl").decode()
        except FileNotFoundError:
            return
        self.metrics_lines = [line + "\n" for line in raw.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]

    def add_metrics(self, event: str, record: dict) -> None:
        self.metrics_lines.append(json.dumps({"event": event, **record}) + "\n")

    def flush_metrics(self) -> None:
        if self.metrics_lines:
            self._put(self.layout.output, "metrics.jsonl", "".join(self.metrics_lines).encode())

    def summary(self, summary: dict) -> None:
        self._put(self.layout.output, "summary.json", json.dumps(summary, indent=2, sort_keys=True).encode())


class Reporter:
    def __init__(self, job: FineTuneJob, layout: JobLayout, world_size: int, main: bool, events: EventStream, trackers: Sequence[Any] = ()):
        self.main = main
        self.events = events
        self.layout = layout
        self.status = StatusWriter(job, layout, world_size, enabled=main)
        self.metrics = TrainMetrics(job.metadata.name)
        self.trackers = list(trackers) if main else []

    def phase(self, phase: str, **fields) -> None:
        self.status.update(phase=phase, **fields)

    def fail(self, error: str) -> None:
        self.status.fail(error)

    def start(self, resumed_from: Optional[str], step: int, total_steps: int, **fields) -> None:
        """Training is about to start (or resume at `step` from checkpoint `resumed_from`)."""
        if resumed_from is not None:
            self.status.restore_metrics(step)
        if self.main:
            try:
                self.metrics.serve()
            except OSError as err:  # a busy port must not stop training
                log.warning("Prometheus metrics not served: %s", err)
            self.events.emit("start", total_steps=total_steps, **fields)
            if resumed_from is not None:
                self.events.emit("resume", **{"from": resumed_from, "step": step})
        self.phase("training", step=step, total_steps=total_steps)

    def step(self, record: dict, tokens: int) -> None:
        """A log step: record holds step, total_steps, epoch, loss, learning_rate, grad_norm,
        tokens_per_second and eta_seconds; tokens = non-padding tokens since the last one."""
        if self.main:  # metrics first: whoever sees the event can scrape its values
            self.metrics.observe_step(record, tokens)
            self.events.emit("step", **record)
            self.status.add_metrics("step", record)
            for tracker in self.trackers:
                tracker.step(record)
        self.status.update(step=record["step"], epoch=record["epoch"], loss=record["loss"], learning_rate=record["learning_rate"],
                           tokens_per_second=record["tokens_per_second"], eta_seconds=record["eta_seconds"])  # fmt: skip

    def evaluation(self, record: dict) -> None:
        """Validation results: step, validation_loss, and generation metrics when asked for."""
        if self.main:
            self.metrics.observe_eval(record["validation_loss"])
            self.events.emit("eval", **record)
            self.status.add_metrics("eval", record)
            for tracker in self.trackers:
                tracker.evaluation(record)

    def checkpoint(self, step: int, name: str, seconds: float, committed: Optional[str], committed_time: Optional[str], final: bool) -> None:
        """A checkpoint was saved (committed: the newest checkpoint a resume would use)."""
        if self.main:
            self.metrics.observe_checkpoint(seconds, time.time())
            self.events.emit("checkpoint", step=step, name=name, seconds=round(seconds, 3), committed=committed)
            self.status.flush_metrics()
        self.phase("saving" if final else "training", last_checkpoint=committed, last_checkpoint_time=committed_time,
                   last_checkpoint_uri=committed and str(self.layout.checkpoints.join(committed)))  # fmt: skip

    def replay(self, info: dict) -> None:
        """spec.retention's base-model answers are ready (generated now, or read from the cache)."""
        if self.main:
            self.metrics.replay_samples.labels(self.metrics.job).set(info["samples"])
            self.metrics.reworded_samples.labels(self.metrics.job).set(info.get("reworded_samples", 0))
            self.events.emit("replay", **info)

    def retention(self, report: dict) -> None:
        """spec.retention's probe figures after training (retention.measure's report)."""
        if self.main:
            (log.warning if report["below_threshold"] else log.info)("retention: %s", describe(report))
            self.metrics.observe_retention(report)
            self.events.emit("retention", **report)
        figures = {k: report[k] for k in ("probes", "base_right", "kept", "kept_ratio", "warn_below", "below_threshold")}
        self.status.update(retention=figures | {"lost": [entry["question"] for entry in report["lost"]]})

    def preempted(self, step: int) -> None:
        if self.main:
            self.events.emit("preempted", step=step)

    def done(self, step: int, summary: dict, outputs: dict) -> None:
        if self.main:
            self.status.flush_metrics()
            self.status.summary(summary)
        self.phase("done", outputs=outputs)
        if self.main:
            self.events.emit("done", step=step, outputs=outputs, summary={k: v for k, v in summary.items() if k not in ("losses", "validation_losses", "retention")})

    def close(self, failed: bool = False) -> None:
        """The run ends (failed: it raised; a preemption is not a failure)."""
        self.metrics.close()
        for tracker in self.trackers:
            tracker.close(failed=failed)
