"""Fixtures: the local control plane (tests/conftest.py), the chart's RBAC and the real
operator in its own process, logged in as the chart's ServiceAccount (operator_harness.py)."""

from __future__ import annotations

from operator_harness import audit, ns, operator, operator_options  # noqa: F401 (fixtures)
