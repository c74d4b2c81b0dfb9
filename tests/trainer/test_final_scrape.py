"""The trainer's last figures are set moments before it exits: with
KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS it keeps /metrics up until one scrape has read them."""

from __future__ import annotations

import threading
import time
import urllib.request

from kubetune.artifacts.net import free_port
from kubetune.train.metrics import TrainMetrics


def closing(metrics: TrainMetrics) -> threading.Thread:
    thread = threading.Thread(target=metrics.close)
    thread.start()
    return thread


def test_close_waits_for_a_scrape_of_the_final_values(monkeypatch):
    monkeypatch.setenv("KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS", "30")
    metrics = TrainMetrics("job")
    port = metrics.serve(free_port(), addr="127.0.0.1")
    metrics.retention_kept_ratio.labels("job").set(0.875)  # a final figure
    thread = closing(metrics)
    time.sleep(0.5)
    assert thread.is_alive()  # nobody scraped yet: still serving
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert 'kubetune_train_retention_kept_ratio{finetunejob="job"} 0.875' in body
    thread.join(timeout=5)
    assert not thread.is_alive() and metrics.server is None


def test_without_the_setting_close_does_not_wait(monkeypatch):
    monkeypatch.delenv("KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS", raising=False)
    metrics = TrainMetrics("job")
    metrics.serve(free_port(), addr="127.0.0.1")
    started = time.monotonic()
    metrics.close()
    assert time.monotonic() - started < 2 and metrics.server is None


def test_the_wait_is_bounded_when_nobody_scrapes(monkeypatch):
    monkeypatch.setenv("KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS", "0.5")
    metrics = TrainMetrics("job")
    metrics.serve(free_port(), addr="127.0.0.1")
    started = time.monotonic()
    metrics.close()
    assert 0.4 < time.monotonic() - started < 5 and metrics.server is None
