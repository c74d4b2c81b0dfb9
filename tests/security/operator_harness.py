"""The operator tests' harness (kmock cluster, real kubectl, in-process operator), imported
from tests/operator/conftest.py rather than copied."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_dir = Path(__file__).resolve().parents[1] / "operator"
if str(_dir) not in sys.path:
    sys.path.insert(0, str(_dir))  # its conftest imports kube_emulator by name
_spec = importlib.util.spec_from_file_location("kubetune_operator_harness", _dir / "conftest.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)
