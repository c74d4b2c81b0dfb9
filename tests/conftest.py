"""Shared fixtures: a tiny model built offline, a real SeaweedFS S3 server, and the local
Kubernetes control plane with its node agent (tests/cluster/kube_harness.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The environment's own programs (weed, kubectl, torchrun, kubetune-*) even when pytest
# was started as .venv/bin/pytest without activating the environment (what `make test` does).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# DeepSpeed JIT-compiles CPU ops on first use; a fixed cache keeps later runs fast.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The control-plane harness lives beside the Go module it runs (tests/cluster).
sys.path.insert(0, str(REPO / "tests" / "cluster"))
from kube_harness import control_plane, kube_api, kube_namespace, kubectl, node_agent  # noqa: E402,F401 (fixtures)


@pytest.fixture(scope="session")
def finetunejob_crd(control_plane) -> str:
    """The checked-in FineTuneJob CRD (the file users apply), applied server-side to the
    session's control plane and Established; returns its name."""
    from kube_harness import apply_crd

    from kubetune.api.crd import CRD_FILENAME

    return apply_crd(control_plane, REPO / "crds" / CRD_FILENAME)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama model + ChatML tokenizer, loadable with from_pretrained. Do not modify it."""
    from kubetune.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 (buckets: models, data, checkpoints, outputs)."""
    from kubetune.artifacts.embedded_s3 import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=("models", "data", "checkpoints", "outputs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch):
    """Point boto3 in this process at the test server with real credentials."""
    for key, value in seaweed.env.items():
        monkeypatch.setenv(key, value)
    return seaweed.env
