"""Fixtures: kmock as the API server (gaps closed in kube_emulator.py), the real kubectl,
and the real operator (kopf, in-process in its own thread, restartable)."""

from __future__ import annotations

import pytest

from kube_emulator import Cluster
from kubetune.testing import free_port
from kubetune_operator.settings import Settings
from operator_harness import Api, Kubectl, Operator


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path).start()
    yield c
    c.stop()


@pytest.fixture
def api(cluster) -> Api:
    return Api(cluster.url)


@pytest.fixture
def kubectl(cluster, tmp_path) -> Kubectl:
    return Kubectl(cluster, tmp_path)


@pytest.fixture
def operator_settings() -> Settings:
    return Settings(reconcile_interval=0.3, metrics_port=free_port(), liveness_port=free_port(), trainer_image="kubetune/trainer:test")


@pytest.fixture
def operator(cluster, operator_settings, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    op = Operator(cluster, operator_settings).start()
    yield op
    op.stop()
