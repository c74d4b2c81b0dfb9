"""The alert rules of the chart: valid for Prometheus, unit-tested with promtool, and every
alert covered by a test where it fires and one where it stays silent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "charts" / "kubetune" / "files" / "prometheus-rules.yaml"
RULE_TESTS = Path(__file__).with_name("rules_test.yaml")
# What the alerts must cover (issue: monitoring).
REQUIRED_ALERTS = {
    "KubetuneJobFailed", "KubetuneJobRestartingRepeatedly", "KubetuneJobNoProgress",
    "KubetuneTrainingLossNaN", "KubetuneTrainingLossNotDecreasing",
    "KubetuneServingErrorRate", "KubetuneOperatorReconcileErrors",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool not found: install Debian's prometheus package (make system-deps)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=REPO)


def alerts() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_accepts_the_rules_file():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_wrong_threshold(tmp_path):
    """The unit tests fail when a rule changes: raise the serving error threshold to 50%."""
    changed = RULES.read_text().replace("> 0.05", "> 0.5")
    assert changed != RULES.read_text()
    (tmp_path / "rules.yaml").write_text(changed)
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", str(tmp_path / "tests.yaml"))
    assert result.returncode != 0
    assert "KubetuneServingErrorRate" in result.stdout + result.stderr


def test_every_required_alert_exists_with_severity_and_help():
    rules = {rule["alert"]: rule for rule in alerts()}
    assert REQUIRED_ALERTS <= rules.keys()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


@pytest.mark.parametrize("alert", sorted(REQUIRED_ALERTS))
def test_every_alert_is_tested_firing_and_silent(alert):
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", []) if case["alertname"] == alert]
    assert any(case["exp_alerts"] for case in cases), f"{alert}: no test where it fires"
    assert any(not case["exp_alerts"] for case in cases), f"{alert}: no test where it stays silent"
