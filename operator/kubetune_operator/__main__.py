"""`python -m kubetune_operator`: run the operator (what the operator image starts).

Watches FineTuneJobs in every namespace, or only in KUBETUNE_WATCH_NAMESPACES (comma-separated).
Liveness: http://0.0.0.0:8080/healthz (kopf); metrics: http://0.0.0.0:8081/metrics.
"""

from __future__ import annotations

import os

import kopf

from .handlers import build_registry
from .settings import Settings
from .state import OperatorState


def main() -> None:
    settings = Settings.from_env()
    namespaces = [n for n in os.environ.get("KUBETUNE_WATCH_NAMESPACES", "").split(",") if n]
    kopf.configure(verbose=os.environ.get("KUBETUNE_LOG_LEVEL", "").upper() == "DEBUG")
    kopf.run(
        registry=build_registry(settings),
        memo=OperatorState(settings),
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
    )


if __name__ == "__main__":
    main()
