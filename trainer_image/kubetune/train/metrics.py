"""Prometheus metrics of the trainer (rank 0 only), served on KUBETUNE_METRICS_PORT (default 9400;
0 disables). Every series carries the label finetunejob=<job name>; nothing secret goes in labels.

The last figures of a run (the retention probes, the final loss) are set moments before the
process exits, often between two scrapes: with KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS > 0,
`close` keeps /metrics up until one scrape has read them, at most that long (default 0: a
run without Prometheus does not wait).
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

DEFAULT_PORT = 9400
PREFIX = "kubetune_train_"


class TrainMetrics:
    def __init__(self, job_name: str, registry: Optional[CollectorRegistry] = None):
        self.registry = registry or CollectorRegistry()
        self.job = job_name
        labels = ["finetunejob"]

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels + list(extra), registry=self.registry)

        self.loss = gauge("loss", "Training loss averaged over the last logging window")
        self.learning_rate = gauge("learning_rate", "Current learning rate")
        self.grad_norm = gauge("grad_norm", "Global gradient norm before clipping")
        self.tokens_per_second = gauge("tokens_per_second", "Non-padding tokens processed per second, all ranks")
        self.step = gauge("step", "Optimizer steps done")
        self.total_steps = gauge("total_steps", "Optimizer steps planned")
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds until training ends")
        self.epoch = gauge("epoch", "Fractional epoch")
        self.validation_loss = gauge("validation_loss", "Loss on the validation split")
        self.gpu_memory_bytes = gauge("gpu_memory_bytes", "GPU memory of rank 0", ("kind",))
        self.last_checkpoint = gauge("last_checkpoint_timestamp_seconds", "Unix time of the newest committed checkpoint")
        self.retention_kept_ratio = gauge("retention_kept_ratio", "Of the probes the base model answered right, the fraction the tuned model still answers right (spec.retention)")
        self.retention_probes = gauge("retention_probes", "Retention probes by outcome: base_right (the base model answered right), kept (still right after training), lost, gained", ("outcome",))
        self.replay_samples = gauge("replay_samples", "Base-model answers replayed in training (spec.retention)")
        self.reworded_samples = gauge("reworded_samples", "Your questions reworded by the base model, trained with your answers (spec.retention.paraphrases)")
        self.tokens_total = Counter(PREFIX + "tokens_total", "Non-padding tokens trained on, all ranks", labels, registry=self.registry)
        self.checkpoint_seconds = Histogram(
            PREFIX + "checkpoint_seconds",
            "Seconds to save and commit a checkpoint",
            labels,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self.server = None
        self.scrapes = _ScrapeCounter()
        self.registry.register(self.scrapes)

    def serve(self, port: Optional[int] = None, addr: str = "0.0.0.0") -> Optional[int]:
        """Start the /metrics endpoint; returns the port, or None when disabled (port 0)."""
        port = int(os.environ.get("KUBETUNE_METRICS_PORT", DEFAULT_PORT)) if port is None else port
        if port == 0:
            return None
        self.server, _ = start_http_server(port, addr=addr, registry=self.registry)
        return port

    def close(self) -> None:
        if self.server is not None:
            wait = float(os.environ.get("KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS", "0") or 0)
            if wait > 0:
                self.scrapes.wait_for_next(wait)
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def observe_step(self, record: dict, tokens: int) -> None:
        j = self.job
        for name in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "step", "total_steps", "eta_seconds", "epoch"):
            if record.get(name) is not None:
                getattr(self, name).labels(j).set(record[name])
        self.tokens_total.labels(j).inc(tokens)
        self._gpu_memory()

    def observe_checkpoint(self, seconds: float, timestamp: float) -> None:
        self.checkpoint_seconds.labels(self.job).observe(seconds)
        self.last_checkpoint.labels(self.job).set(timestamp)

    def observe_eval(self, validation_loss: float) -> None:
        self.validation_loss.labels(self.job).set(validation_loss)

    def observe_retention(self, report: dict) -> None:
        j = self.job
        if report["kept_ratio"] is not None:
            self.retention_kept_ratio.labels(j).set(report["kept_ratio"])
        for outcome, value in (("base_right", report["base_right"]), ("kept", report["kept"]), ("lost", len(report["lost"])), ("gained", len(report["gained"]))):
            self.retention_probes.labels(j, outcome).set(value)

    def _gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory_bytes.labels(self.job, "allocated").set(torch.cuda.memory_allocated())
            self.gpu_memory_bytes.labels(self.job, "peak").set(torch.cuda.max_memory_allocated())


class _ScrapeCounter:
    """A collector that adds no series and counts the scrapes that collect the registry."""

    def __init__(self):
        self.count = 0
        self.changed = threading.Condition()

    def collect(self):
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return []

    def wait_for_next(self, timeout: float) -> bool:
        """Block until a scrape starts collecting after this call (True), or `timeout` seconds pass."""
        with self.changed:
            seen = self.count
            return self.changed.wait_for(lambda: self.count > seen, timeout=timeout)
