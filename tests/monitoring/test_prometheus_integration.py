"""The real Prometheus scrapes a live trainer run (tiny model, one process) and the
operator's metrics endpoint; the recorded series are read back through Prometheus's HTTP
API and compared with what the trainer printed. The chart's alert rules and dashboard
queries then run against these real series."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kubetune.testing import free_port
from prometheus_server import PrometheusServer
from promql import dashboard_queries, grafana_to_promql, load_dashboards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "charts" / "kubetune" / "files"
JOB = "prom-e2e"
SELECTOR = f'{{job="kubetune-trainer", finetunejob="{JOB}"}}'

# Status documents as the operator writes them (API.md): one job running, one finished.
OPERATOR_SCRIPT = textwrap.dedent("""
    import sys
    from kubetune_operator import metrics
    metrics.record_job("ml", "qa-bot", {"phase": "Running", "restarts": 1, "loss": 1.25,
                       "progress": {"step": 30, "totalSteps": 120}}, 600.0)
    metrics.record_job("ml", "old-bot", {"phase": "Succeeded", "restarts": 0, "loss": 0.5,
                       "progress": {"step": 50, "totalSteps": 50}}, 3600.0)
    metrics.RECONCILE_TOTAL.labels("ok").inc(7)
    metrics.serve(int(sys.argv[1]), host="127.0.0.1")
    print("ready", flush=True)
    sys.stdin.read()  # serve until the test closes stdin
""")


def write_job(folder: Path, model_dir: Path) -> Path:
    records = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."}
               for a in range(8) for b in range(4)]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    job = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": "data.jsonl", "format": "prompt_response"},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 60, "learningRate": 1.0e-3, "maxLength": 64, "logEverySteps": 1, "precision": "fp32"},
            "distributed": {"nodes": 1, "gpusPerNode": 1, "zero": {"stage": 0}},
            "checkpoint": {"everySteps": 20, "keep": 1},
            "output": {"merge": False},
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model_dir):
    """Prometheus that scraped a whole trainer run and the operator; the trainer's events."""
    work = tmp_path_factory.mktemp("prometheus-e2e")
    trainer_port, operator_port = free_port(), free_port()
    server = PrometheusServer(work, scrape_configs=[
        {"job_name": "kubetune-trainer", "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}]},
        # honor_labels as the chart's ServiceMonitor: the series keep the job's own namespace.
        {"job_name": "kubetune-operator", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"], "labels": {"namespace": "kubetune-system"}}]},
    ], rule_files=(FILES / "prometheus-rules.yaml",))
    server.start()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": str(trainer_port)}
    operator = subprocess.Popen([sys.executable, "-c", OPERATOR_SCRIPT, str(operator_port)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert operator.stdout.readline().strip() == "ready"
        job = write_job(work, tiny_model_dir)
        run = subprocess.run([str(Path(sys.executable).parent / "kubetune-train"), "--job", str(job)],
                             capture_output=True, text=True, timeout=600, env=env, cwd=work)
        assert run.returncode == 0, run.stderr[-3000:]
        events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
        server.wait_for(f'kubetune_operator_job_phase{{name="qa-bot"}}')
        yield server, events
    finally:
        operator.stdin.close()
        operator.wait(timeout=10)
        server.stop()


def test_prometheus_recorded_the_losses_and_steps_the_trainer_printed(recorded):
    server, events = recorded
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    (start,) = [e for e in events if e["event"] == "start"]
    assert len(steps) == start["total_steps"] == 60

    step_samples = [v for _, v in server.samples(f"kubetune_train_step{SELECTOR}")]
    loss_samples = [v for _, v in server.samples(f"kubetune_train_loss{SELECTOR}")]
    # Several scrapes landed during training, and each saw a state the trainer really was in.
    assert len(set(step_samples)) >= 3, step_samples
    assert step_samples == sorted(step_samples) and set(step_samples) <= set(steps)
    assert set(loss_samples) <= {e["loss"] for e in steps.values()}
    lr_samples = {v for _, v in server.samples(f"kubetune_train_learning_rate{SELECTOR}")}
    assert lr_samples <= {e["learning_rate"] for e in steps.values()}
    total = server.samples(f"kubetune_train_total_steps{SELECTOR}")
    assert {v for _, v in total} == {start["total_steps"]}
    tokens = [v for _, v in server.samples(f"kubetune_train_tokens_total{SELECTOR}")]
    assert tokens[-1] > 0 and tokens == sorted(tokens)


def test_prometheus_recorded_the_operator_series_with_the_jobs_namespace(recorded):
    server, _ = recorded
    phases = {(r["metric"]["name"], r["metric"]["phase"]): float(r["value"][1])
              for r in server.query('kubetune_operator_job_phase{namespace="ml"} == 1')}
    assert phases == {("qa-bot", "Running"): 1.0, ("old-bot", "Succeeded"): 1.0}
    jobs = {r["metric"]["phase"]: float(r["value"][1]) for r in server.query("kubetune_operator_jobs > 0")}
    assert jobs == {"Running": 1.0, "Succeeded": 1.0}
    (progress,) = server.query('kubetune_operator_job_progress_ratio{name="qa-bot"}')
    assert float(progress["value"][1]) == 0.25 and progress["metric"]["namespace"] == "ml"


def test_alert_rules_evaluate_cleanly_on_real_series(recorded):
    server, _ = recorded
    # Let the rule manager evaluate every group at least once after the data arrived.
    deadline = time.monotonic() + 15
    while True:
        groups = server.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") and r["health"] != "unknown" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    expected = {r["alert"] for g in yaml.safe_load((FILES / "prometheus-rules.yaml").read_text())["groups"] for r in g["rules"]}
    assert {r["name"] for r in rules} == expected
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # Healthy series fire nothing (the failing cases are promtool's unit tests).
    assert [a for a in server.api("alerts")["alerts"] if a["state"] == "firing"] == []


@pytest.mark.parametrize("dashboard", ["training.json", "jobs-overview.json"])
def test_dashboard_queries_return_data_from_the_run(recorded, dashboard):
    """Every query of the dashboard runs in Prometheus; those that can have data here do."""
    server, _ = recorded
    last_scrape = server.samples(f"kubetune_train_step{SELECTOR}")[-1][0]
    # Panels that need what this run cannot produce: a GPU, or reconcile timings.
    may_be_empty = ("kubetune_train_gpu_memory_bytes", "kubetune_operator_reconcile_duration_seconds",
                    "kubetune_operator_reconcile_errors_total", "kubetune_train_validation_loss")
    empty = []
    for where, expr in dashboard_queries(load_dashboards(FILES / "dashboards")[dashboard]):
        promql = grafana_to_promql(expr)
        result = server.query(promql, at=last_scrape)
        if not result and not any(name in promql for name in may_be_empty):
            empty.append(where)
        for series in result:
            value = float(series["value"][1])
            assert not math.isnan(value) or "histogram_quantile" in promql, (where, series)
    assert empty == []
