"""The operator tests' harness (operator_harness: the chart's RBAC, the operator process) is
imported from tests/operator by module name, not copied."""

from __future__ import annotations

import sys
from pathlib import Path

_operator_tests = str(Path(__file__).resolve().parents[1] / "operator")
if _operator_tests not in sys.path:
    sys.path.insert(0, _operator_tests)
