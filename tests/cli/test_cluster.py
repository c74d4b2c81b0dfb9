"""`kubetune list|status|logs` over a kubeconfig, against kmock's Kubernetes emulator."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest
import yaml

from kubetune.cli import main
from kubetune.cli.cluster import job_row

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
        "conditions": [{"type": "Training", "status": "True", "reason": "Running", "message": "step 40 of 160", "lastTransitionTime": "2026-01-01T10:01:00Z"}],
    },
}


def test_job_row_from_status():
    row = job_row(JOB, now=datetime(2026, 1, 1, 12, 30, tzinfo=timezone.utc))
    assert row == {
        "namespace": "team", "name": "qa-bot", "phase": "Running", "method": "lora", "progress": "40/160 (25%)",
        "loss": "1.2346", "restarts": "1", "endpoint": "-", "age": "2h",
    }  # fmt: skip
    fresh = job_row({"metadata": {"name": "new"}, "spec": {}})
    assert (fresh["phase"], fresh["progress"], fresh["loss"], fresh["age"]) == ("Pending", "-", "-", "-")


@pytest.fixture
def kubeconfig(kmock, tmp_path):
    kmock.resources["kubetune.io/v1alpha1/finetunejobs"] = kmock.ResourceInfo(kind="FineTuneJob", namespaced=True)
    kmock.resources["v1/pods"] = kmock.ResourceInfo(kind="Pod", namespaced=True)
    kmock.objects["kubetune.io/v1alpha1/finetunejobs", "team", "qa-bot"] = JOB
    kmock["get /api/v1/namespaces/team/pods/qa-bot-worker-0/log"] << b"step 39\nstep 40\n"
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "mock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "users": [{"name": "me", "user": {"token": "t"}}],
                "contexts": [{"name": "mock", "context": {"cluster": "mock", "user": "me", "namespace": "team"}}],
                "current-context": "mock",
            }
        )
    )
    return str(path)


async def cli(*args: str) -> int:
    # The kubernetes client is synchronous; the emulator answers on this test's event loop.
    return await asyncio.to_thread(main, list(args))


@pytest.mark.asyncio
async def test_list_status_logs(kubeconfig, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert await cli("list", "--kubeconfig", kubeconfig) == 0
    out = capsys.readouterr().out
    assert "qa-bot" in out and "Running" in out and "40/160 (25%)" in out and "1.2346" in out

    assert await cli("status", "qa-bot", "--kubeconfig", kubeconfig) == 0
    out = capsys.readouterr().out
    assert "FineTuneJob team/qa-bot" in out and "step-000000040" in out and "step 40 of 160" in out and "300 s" in out

    assert await cli("logs", "qa-bot", "--kubeconfig", kubeconfig) == 0
    assert capsys.readouterr().out == "step 39\nstep 40\n"

    assert await cli("status", "missing", "--kubeconfig", kubeconfig) == 1
    assert "kubetune status: not found" in capsys.readouterr().err
