"""`kubetune list|status|logs` over a kubeconfig, against the local control plane: a
FineTuneJob whose status the API server stores (written through the status subresource),
and a worker pod that the node agent runs, whose log the API server serves (pods/log)."""

from __future__ import annotations

import copy
from datetime import datetime, timezone

import pytest
import yaml

from kube_harness import wait_for
from kubetune.cli import main
from kubetune.cli.cluster import job_row

pytestmark = pytest.mark.timeout(180)

JOB = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "qa-bot", "namespace": "team", "creationTimestamp": "2026-01-01T10:00:00Z"},
    "spec": {"model": {"uri": "s3://models/base"}, "dataset": {"uri": "s3://data/qa.jsonl"}, "method": {"type": "lora"}},
    "status": {
        "phase": "Running",
        "progress": {"step": 40, "totalSteps": 160, "percent": 25.0, "etaSeconds": 300},
        "loss": 1.23456,
        "restarts": 1,
        "lastCheckpoint": "step-000000040",
        "retention": {"probes": 94, "baseRight": 36, "kept": 35, "keptRatio": 0.9722, "warnBelow": 0.9, "lost": ["What is 7 times 8?"]},
        "conditions": [{"type": "Training", "status": "True", "reason": "Running", "message": "step 40 of 160", "lastTransitionTime": "2026-01-01T10:01:00Z"}],
    },
}
# What the `restricted` Pod Security Standard asks of a container.
RESTRICTED = {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}  # fmt: skip


def test_job_row_from_status():
    row = job_row(JOB, now=datetime(2026, 1, 1, 12, 30, tzinfo=timezone.utc))
    assert row == {
        "namespace": "team", "name": "qa-bot", "phase": "Running", "method": "lora", "progress": "40/160 (25%)",
        "loss": "1.2346", "restarts": "1", "endpoint": "-", "age": "2h",
    }  # fmt: skip
    fresh = job_row({"metadata": {"name": "new"}, "spec": {}})
    assert (fresh["phase"], fresh["progress"], fresh["loss"], fresh["age"]) == ("Pending", "-", "-", "-")


@pytest.fixture
def kubeconfig(control_plane, kube_api, kube_namespace, finetunejob_crd, node_agent, tmp_path) -> str:
    """The admin's kubeconfig with the test's namespace as its context's, one FineTuneJob with a
    status, and its worker 0 run by the node agent (its log: two lines)."""
    base = f"/apis/kubetune.io/v1alpha1/namespaces/{kube_namespace}/finetunejobs"
    job = copy.deepcopy(JOB)
    job["metadata"] = {"name": "qa-bot"}
    status = job.pop("status")
    kube_api.create(base, job)
    kube_api.patch(f"{base}/qa-bot/status", {"status": status})
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "qa-bot-worker-0", "labels": {"kubetune.io/job": "qa-bot"}},
           "spec": {"restartPolicy": "Never", "containers": [{"name": "trainer", "image": "kubetune/test", "securityContext": RESTRICTED,
                                                             "command": ["python", "-c", "print('step 39'); print('step 40')"]}]}}  # fmt: skip
    kube_api.create(f"/api/v1/namespaces/{kube_namespace}/pods", pod)
    wait_for(lambda: kube_api.get(f"/api/v1/namespaces/{kube_namespace}/pods/qa-bot-worker-0")["status"].get("phase") == "Succeeded",
             60, "the worker pod run by the node agent")  # fmt: skip
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = kube_namespace
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_list_status_logs(kubeconfig, kube_namespace, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["list", "--kubeconfig", kubeconfig]) == 0
    out = capsys.readouterr().out
    assert "qa-bot" in out and "Running" in out and "40/160 (25%)" in out and "1.2346" in out

    assert main(["status", "qa-bot", "--kubeconfig", kubeconfig]) == 0
    out = capsys.readouterr().out
    # (the table's title wraps at the table's width: the namespace is long)
    assert "FineTuneJob" in out and f"{kube_namespace}/qa-bot" in out
    assert "35 of 36 probes the base model answered right are still right (97%); lost: What is 7 times 8?" in out
    assert "step-000000040" in out and "step 40 of 160" in out and "300 s" in out

    assert main(["logs", "qa-bot", "--kubeconfig", kubeconfig]) == 0
    assert capsys.readouterr().out == "step 39\nstep 40\n"

    assert main(["status", "missing", "--kubeconfig", kubeconfig]) == 1
    assert "kubetune status: not found" in capsys.readouterr().err
    assert main(["list", "-A", "--kubeconfig", kubeconfig]) == 0
    assert kube_namespace in capsys.readouterr().out
