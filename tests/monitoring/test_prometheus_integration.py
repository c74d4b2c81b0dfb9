"""The real Prometheus scrapes a live training job end to end: the real operator
(`python -m kubetune_operator`, as its image runs it, logged in as the chart's ServiceAccount)
reconciles a FineTuneJob on the local control plane (tests/cluster), the trainer runs the job
document from the operator's ConfigMap (as the worker pod would) with SeaweedFS as its S3,
the operator follows it through progress.json, and kubetune-serve then serves the trained adapter and answers a few requests. The recorded
series are read back through Prometheus's HTTP API and compared with what the trainer
printed and the requests sent; the chart's alert rules and every dashboard query then run
on these series."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from prometheus_server import PrometheusServer, free_ports
from promql import dashboard_queries, grafana_to_promql, load_dashboards

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "operator"))
from kube_harness import create_namespace, namespace_name  # noqa: E402  (the control plane's harness)
from operator_harness import Namespace, running_operator  # noqa: E402  (the operator tests' harness)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FILES = REPO / "charts" / "kubetune" / "files"
JOB = "prom-e2e"
SELECTOR = f'{{job="kubetune-trainer", finetunejob="{JOB}"}}'
BIN = Path(sys.executable).parent


def wait_until(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(what)


def upload_inputs(seaweed, model_dir: Path) -> None:
    s3 = seaweed.client()
    for path in model_dir.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "models", f"tiny/{path.relative_to(model_dir)}")
    records = [{"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."} for a in range(8) for b in range(4)]
    s3.put_object(Bucket="data", Key=f"{JOB}.jsonl", Body="".join(json.dumps(r) + "\n" for r in records).encode())


def job_document(seaweed) -> dict:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": JOB},
        "spec": {
            "model": {"uri": "s3://models/tiny"},
            "dataset": {"uri": f"s3://data/{JOB}.jsonl", "format": "prompt_response"},
            "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}},
            "training": {"maxSteps": 40, "learningRate": 1.0e-3, "maxLength": 64, "logEverySteps": 1, "precision": "fp32"},
            "distributed": {"nodes": 1, "gpusPerNode": 1, "zero": {"stage": 2}},
            "checkpoint": {"uri": f"s3://checkpoints/{JOB}", "everySteps": 15, "keep": 1},
            "storage": {"endpoint": seaweed.endpoint, "credentialsSecret": "s3-credentials"},
            "output": {"uri": f"s3://outputs/{JOB}", "merge": False},
            # The Training dashboard's retention row: replay samples and probe outcomes (short answers, kept fast).
            "retention": {"replay": {"ratio": 0.25, "maxNewTokens": 8}, "probes": {"maxNewTokens": 4}},
        },
    }


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def chat(port: int, question) -> "dict | int":
    """POST /v1/chat/completions; the answer, or the HTTP status of a refused request."""
    body = {"model": JOB, "max_tokens": 8, "temperature": 0}
    if question is not None:
        body["messages"] = [{"role": "user", "content": question}]
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        return err.code


def generated_tokens(port: int) -> float:
    """kubetune_serve_generated_tokens_total read from the server's /metrics directly."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    return sum(s.value for s in families["kubetune_serve_generated_tokens"].samples if s.name.endswith("_total"))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model_dir, seaweed, control_plane, kube_api, finetunejob_crd, request):
    """Prometheus that scraped the operator and a whole trainer run of one FineTuneJob."""
    work = tmp_path_factory.mktemp("prometheus-e2e")
    trainer_port, serve_port, prometheus_port = free_ports(3)
    upload_inputs(seaweed, tiny_model_dir)
    ns = Namespace(kube_api, create_namespace(kube_api, namespace_name(request.node.name)))
    with running_operator(control_plane, kube_api, ns.name, work, interval="0.5") as operator:
        server = PrometheusServer(work, prometheus_port, scrape_configs=[
            {"job_name": "kubetune-trainer", "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]}]},
            # The chart's serving PodMonitor adds finetunejob from the pod label kubetune.io/job.
            {"job_name": "kubetune-serving", "static_configs": [{"targets": [f"127.0.0.1:{serve_port}"], "labels": {"finetunejob": JOB}}]},
            # honor_labels as the chart's ServiceMonitor: the series keep the job's own namespace.
            {"job_name": "kubetune-operator", "honor_labels": True,
             "static_configs": [{"targets": [f"127.0.0.1:{operator.metrics_port}"], "labels": {"namespace": "kubetune-system"}}]},
        ], rule_files=(FILES / "prometheus-rules.yaml",))
        serving = None
        try:
            server.start()
            ns.create_secret("s3-credentials", {k: seaweed.env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
            kube_api.create(f"/apis/kubetune.io/v1alpha1/namespaces/{ns.name}/finetunejobs", job_document(seaweed))
            config = wait_until(lambda: ns.get("configmaps", f"{JOB}-config"), "the job's ConfigMap")
            wait_until(lambda: ns.get("pods", f"{JOB}-worker-0"), "worker pod 0")
            ns.set_pod_status(f"{JOB}-worker-0", "Running")

            # What worker 0 runs (contract 9), in this process tree: the operator's job document.
            (work / "job.yaml").write_text(config["data"]["job.yaml"])
            # The trainer waits for one scrape of its final figures (the probes are set moments before it exits).
            env = {**os.environ, **seaweed.env, "OMP_NUM_THREADS": "1", "KUBETUNE_METRICS_PORT": str(trainer_port), "KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS": "30"}
            run = subprocess.run([str(BIN / "kubetune-train"), "--job", str(work / "job.yaml")],
                                 capture_output=True, text=True, timeout=600, env=env, cwd=work)
            assert run.returncode == 0, run.stderr[-3000:]
            events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            ns.set_pod_status(f"{JOB}-worker-0", "Succeeded", exit_code=0)
            server.wait_for(f'kubetune_operator_job_phase{{name="{JOB}", phase="Succeeded"}} == 1', timeout=60)

            # What the serving Deployment runs: the trained adapter on its base, both from S3.
            (done,) = [e for e in events if e["event"] == "done"]
            serving = subprocess.Popen([str(BIN / "kubetune-serve"), "--model", done["outputs"]["adapter"], "--base-model", "s3://models/tiny",
                                        "--job", str(work / "job.yaml"), "--host", "127.0.0.1", "--port", str(serve_port),
                                        "--cache-dir", str(work / "serve-cache")],
                                       env=env, cwd=work, stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)
            wait_until(lambda: http_status(f"http://127.0.0.1:{serve_port}/readyz") == 200, "kubetune-serve ready", timeout=180)
            warmup_tokens = generated_tokens(serve_port)  # the server's own warm-up generation
            answered = [chat(serve_port, f"What is {i} plus 1?") for i in range(4)]
            assert chat(serve_port, None) == 400  # a request without messages: a client error, not a 5xx
            server.wait_for(f'sum(kubetune_serve_requests_total{{endpoint="/v1/chat/completions"}}) >= {len(answered) + 1}')
            # rate() needs two samples: wait until even the newest series (the error) has a few.
            server.wait_for("count_over_time(kubetune_serve_errors_total[5m]) >= 3")
            yield SimpleNamespace(server=server, events=events, liveness_port=operator.liveness_port, answered=answered,
                                  warmup_tokens=warmup_tokens, namespace=ns.name)
        finally:
            if serving is not None:
                serving.terminate()
                serving.wait(timeout=20)
            server.stop()
    kube_api.delete(f"/api/v1/namespaces/{ns.name}")


def test_prometheus_recorded_the_losses_and_steps_the_trainer_printed(recorded):
    server, events = recorded.server, recorded.events
    steps = {e["step"]: e for e in events if e["event"] == "step"}
    (start,) = [e for e in events if e["event"] == "start"]
    assert len(steps) == start["total_steps"] == 40

    step_samples = [v for _, v in server.samples(f"kubetune_train_step{SELECTOR}")]
    loss_samples = [v for _, v in server.samples(f"kubetune_train_loss{SELECTOR}")]
    # Several scrapes landed during training, and each saw a state the trainer really was in.
    assert len(set(step_samples)) >= 2, step_samples
    assert step_samples == sorted(step_samples) and set(step_samples) <= set(steps)
    assert set(loss_samples) <= {e["loss"] for e in steps.values()}
    lr_samples = {v for _, v in server.samples(f"kubetune_train_learning_rate{SELECTOR}")}
    assert lr_samples <= {e["learning_rate"] for e in steps.values()}
    total = server.samples(f"kubetune_train_total_steps{SELECTOR}")
    assert {v for _, v in total} == {start["total_steps"]}
    tokens = [v for _, v in server.samples(f"kubetune_train_tokens_total{SELECTOR}")]
    assert tokens[-1] > 0 and tokens == sorted(tokens)


def test_prometheus_recorded_the_operator_following_the_job(recorded):
    server, events, liveness_port = recorded.server, recorded.events, recorded.liveness_port
    losses = {e["loss"] for e in events if e["event"] == "step"}
    phases = [r["metric"]["phase"] for r in server.query(f'max_over_time(kubetune_operator_job_phase{{name="{JOB}"}}[10m]) == 1')]
    assert {"Running", "Succeeded"} <= set(phases)
    (current,) = server.query(f'kubetune_operator_job_phase{{name="{JOB}"}} == 1')
    assert current["metric"]["phase"] == "Succeeded" and current["metric"]["namespace"] == recorded.namespace
    # The operator read the trainer's progress.json from S3 while it ran.
    progress = [v for _, v in server.samples(f'kubetune_operator_job_progress_ratio{{name="{JOB}"}}')]
    assert progress[-1] == 1.0 and progress == sorted(progress)
    # progress.json carries the loss rounded to 6 decimals.
    operator_losses = {v for _, v in server.samples(f'kubetune_operator_job_loss{{name="{JOB}"}}')}
    assert operator_losses and operator_losses <= {round(loss, 6) for loss in losses}
    (jobs,) = server.query('kubetune_operator_jobs{phase="Succeeded"}')
    assert float(jobs["value"][1]) == 1.0
    ok = server.query('kubetune_operator_reconcile_total{result="ok"}')
    assert float(ok[0]["value"][1]) > 0
    # kopf's liveness endpoint, which the chart's livenessProbe calls.
    with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5) as response:
        assert response.status == 200


def test_alert_rules_evaluate_cleanly_on_real_series(recorded):
    server = recorded.server
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


def test_prometheus_recorded_the_requests_served(recorded):
    server = recorded.server
    statuses = {r["metric"]["status"]: float(r["value"][1])
                for r in server.query('kubetune_serve_requests_total{endpoint="/v1/chat/completions"}')}
    assert statuses == {"200": len(recorded.answered), "400": 1.0}
    generated = sum(answer["usage"]["completion_tokens"] for answer in recorded.answered)
    (tokens,) = server.query("kubetune_serve_generated_tokens_total")
    assert float(tokens["value"][1]) == recorded.warmup_tokens + generated and tokens["metric"]["finetunejob"] == JOB
    (latency,) = server.query('kubetune_serve_request_latency_seconds_count')
    assert float(latency["value"][1]) >= len(recorded.answered)


# Panels that need what this run cannot produce: a GPU, validation, failing reconciles or
# server errors.
# kept_ratio: a tiny model of random weights answers no probe right, so there is no ratio to keep.
MAY_BE_EMPTY = ("kubetune_train_gpu_memory_bytes", "kubetune_train_validation_loss", "kubetune_train_retention_kept_ratio",
                "kubetune_operator_reconcile_errors_total", "kubetune_operator_reconcile_duration_seconds")


@pytest.mark.parametrize("dashboard", ["training.json", "jobs-overview.json", "serving.json"])
def test_dashboard_queries_return_data_from_the_run(recorded, dashboard):
    """Every query of the dashboard runs in Prometheus; those that can have data here do."""
    server = recorded.server
    source = {"training.json": f"kubetune_train_step{SELECTOR}", "jobs-overview.json": f'kubetune_operator_job_phase{{name="{JOB}", phase="Running"}}',
              "serving.json": "kubetune_serve_generated_tokens_total"}[dashboard]
    at = server.samples(source)[-1][0]  # the last scrape of the component the dashboard shows
    empty = []
    for where, expr in dashboard_queries(load_dashboards(FILES / "dashboards")[dashboard]):
        promql = grafana_to_promql(expr)
        result = server.query(promql, at=at)
        if not result and not any(name in promql for name in MAY_BE_EMPTY):
            empty.append(where)
        for series in result:
            value = float(series["value"][1])
            assert not math.isnan(value) or "histogram_quantile" in promql or "batch_size" in promql, (where, series)
    assert empty == []
