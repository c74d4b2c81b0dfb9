"""Grafana dashboards and alert rules only query metrics the code really exports, with
valid PromQL, and each dashboard shows what its view promises."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from promql import dashboard_queries, exposed_names, grafana_to_promql, load_dashboards, metric_names

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "charts" / "kubetune" / "files"
DASHBOARDS = load_dashboards(FILES / "dashboards")
RULES = yaml.safe_load((FILES / "prometheus-rules.yaml").read_text())


def all_queries() -> list[tuple[str, str]]:
    out = [(f"{name}: {where}", grafana_to_promql(expr)) for name, board in DASHBOARDS.items()
           for where, expr in dashboard_queries(board)]
    out += [(f"prometheus-rules.yaml: {rule['alert']}", rule["expr"]) for group in RULES["groups"] for rule in group["rules"]]
    return out


def registered_metric_names() -> dict[str, set[str]]:
    """Names each component exposes, read from the prometheus_client registries in its code."""
    from kubetune.serve.metrics import ServeMetrics
    from kubetune.train.metrics import TrainMetrics
    from kubetune_operator.metrics import OperatorMetrics

    return {
        "trainer": exposed_names(TrainMetrics("job").registry),
        "serving": exposed_names(ServeMetrics().registry),
        "operator": exposed_names(OperatorMetrics(lambda: []).registry),
    }


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{x="y", z=~"$v"}[5m])))') == {"a_bucket"}
    assert metric_names("time() - b_seconds{j=\"k\"} offset 1h") == {"b_seconds"}
    assert metric_names("(x != x) or (abs(x) == +Inf) and on (ns, name) y unless ignoring(p) z > bool 1e3") == {"x", "y", "z"}
    assert metric_names('max_over_time(r[1h]) - min_over_time(r[1h]) >= 2') == {"r"}


def test_every_query_names_a_metric_the_code_exports():
    registered = registered_metric_names()
    known = set().union(*registered.values())
    # Sanity: the contract's names are in there, with their exposition suffixes.
    assert {"kubetune_train_loss", "kubetune_train_checkpoint_seconds_bucket", "kubetune_serve_requests_total",
            "kubetune_operator_reconcile_errors_total", "kubetune_operator_job_phase"} <= known
    unknown = {}
    for where, expr in all_queries():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        if names - known:
            unknown[where] = sorted(names - known)
    assert unknown == {}, f"queries name metrics no component registers: {unknown}"


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each query (as a recording rule) the way Prometheus would."""
    rules = [{"record": f"kubetune:dashboard_query:{i}", "expr": expr} for i, (_, expr) in enumerate(all_queries())
             if "label_values" not in expr]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    binary = shutil.which("promtool")
    assert binary, "promtool not found: install Debian's prometheus package (make system-deps)"
    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# What each view must show (issue: monitoring), as metric names its queries use.
VIEWS = {
    "jobs-overview.json": {"kubetune_operator_jobs", "kubetune_operator_job_phase", "kubetune_operator_job_restarts",
                           "kubetune_operator_job_duration_seconds"},
    "training.json": {"kubetune_train_loss", "kubetune_train_learning_rate", "kubetune_train_grad_norm",
                      "kubetune_train_tokens_per_second", "kubetune_train_eta_seconds", "kubetune_train_gpu_memory_bytes",
                      "kubetune_train_last_checkpoint_timestamp_seconds", "kubetune_train_retention_kept_ratio",
                      "kubetune_train_retention_probes", "kubetune_train_replay_samples", "kubetune_train_reworded_samples"},
    "serving.json": {"kubetune_serve_requests_total", "kubetune_serve_request_latency_seconds_bucket",
                     "kubetune_serve_tokens_per_second", "kubetune_serve_generated_tokens_total"},
}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_each_dashboard_shows_its_view(name):
    board = DASHBOARDS[name]
    used = set().union(*(metric_names(grafana_to_promql(expr)) for _, expr in dashboard_queries(board)))
    assert VIEWS[name] <= used, sorted(VIEWS[name] - used)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_well_formed_for_grafana(name):
    board = DASHBOARDS[name]
    assert board["uid"].startswith("kubetune-") and board["title"].startswith("KubeTune / ")
    assert "kubetune" in board["tags"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert "datasource" in variables
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Only variables the dashboard defines (or Grafana's own) appear in queries.
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= variables | {"__rate_interval", "__interval", "__range"}, (panel["title"], used - variables)
