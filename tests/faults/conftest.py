"""Fixtures for the fault-injection suite.

The DeepSpeed fixtures (`one_rank_world`, `make_engine`, `train`, `snapshot`) are the
checkpoint tests' own, imported from tests/checkpoint/conftest.py rather than copied.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from kubetune.artifacts.embedded_s3 import SeaweedS3

_path = Path(__file__).resolve().parents[1] / "checkpoint" / "conftest.py"
_spec = importlib.util.spec_from_file_location("kubetune_checkpoint_fixtures", _path)
_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checkpoint)

one_rank_world = _checkpoint.one_rank_world
make_engine = _checkpoint.make_engine
train = _checkpoint.train
snapshot = _checkpoint.snapshot


@pytest.fixture(scope="module")
def _outage_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("outage-s3"), buckets=("checkpoints", "outputs"))
    server.start()
    # Restarts keep the data; creating the buckets again can fail with BucketAlreadyExists.
    server.buckets = ()
    yield server
    server.stop()


@pytest.fixture
def outage_s3(_outage_server, monkeypatch):
    """A SeaweedFS server of this module alone (tests stop and start it), with this process's
    S3 settings pointing at it and boto3's own retries off: only KubeTune's retry policy
    stands between an outage and an error. Running again after each test."""
    for key, value in _outage_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("KUBETUNE_S3_MAX_ATTEMPTS", "1")
    yield _outage_server
    if _outage_server.proc is None:
        _outage_server.start()

# The operator tests' harness (operator_harness) is imported by module name, with its fixtures.
_operator_tests = str(Path(__file__).resolve().parents[1] / "operator")
if _operator_tests not in sys.path:
    sys.path.insert(0, _operator_tests)
from operator_harness import audit, ns, operator, operator_options  # noqa: E402,F401 (fixtures)
