"""Prometheus metrics of the serving process (contract 8: kubetune_serve_*).

Each server owns its registry, so several servers in one process (tests, benchmarks) never
share counters. The tokens/s gauge is the generation rate over the last `window` seconds.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self, window: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kubetune_serve_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.errors = Counter("kubetune_serve_errors", "Failed requests by endpoint and error type.", ["endpoint", "type"], registry=r)
        self.request_latency = Histogram(
            "kubetune_serve_request_latency_seconds", "Time from request to last byte of the answer.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "kubetune_serve_time_to_first_token_seconds", "Time from request to its first generated token.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.generated_tokens = Counter("kubetune_serve_generated_tokens", "Generated tokens (all sequences).", registry=r)
        self.tokens_per_second = Gauge("kubetune_serve_tokens_per_second", f"Generated tokens per second over the last {window:g} s.", registry=r)
        self.queue_depth = Gauge("kubetune_serve_queue_depth", "Requests waiting for a place in the batch.", registry=r)
        self.running_sequences = Gauge("kubetune_serve_running_sequences", "Sequences being generated now.", registry=r)
        self.batch_size = Histogram("kubetune_serve_batch_size", "Sequences per model forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.ready = Gauge("kubetune_serve_ready", "1 once the model has answered its warm-up generation.", registry=r)
        self._window = window
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self.tokens_per_second.set_function(self._rate)

    def record_tokens(self, count: int) -> None:
        if count <= 0:
            return
        self.generated_tokens.inc(count)
        with self._lock:
            self._recent.append((time.monotonic(), count))

    def _rate(self) -> float:
        cutoff = time.monotonic() - self._window
        with self._lock:
            while self._recent and self._recent[0][0] < cutoff:
                self._recent.popleft()
            return sum(count for _, count in self._recent) / self._window

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
