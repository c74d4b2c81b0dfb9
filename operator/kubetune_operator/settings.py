"""Operator settings from its own environment (set by the Helm chart)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    vllm_image: str = "vllm/vllm-openai:v0.11.0"
    image_pull_policy: str = "IfNotPresent"
    # Seconds between reconciliation cycles of one job (kopf timer interval).
    reconcile_interval: float = 10.0
    metrics_port: int = 8081
    liveness_port: int = 8080
    # Log lines of a failed worker kept in status.failure and the Failed event.
    failure_log_lines: int = 20
    # After a failed progress.json read, skip reads of that job for this many seconds.
    progress_retry_seconds: float = 30.0
    # ServiceAccount and image pull secrets of the training, merge and serving pods (chart values).
    workload_service_account: str = ""
    image_pull_secrets: tuple[str, ...] = ()
    # With PodMonitors on (chart): how long a finished trainer keeps /metrics up until one
    # scrape has read its final figures (KUBETUNE_METRICS_FINAL_SCRAPE_SECONDS; 0: it exits at once).
    trainer_final_scrape_seconds: float = 0.0

    @classmethod
    def from_env(cls, env: "dict[str, str] | None" = None) -> "Settings":
        env = os.environ if env is None else env
        defaults = cls()
        return cls(
            trainer_image=env.get("KUBETUNE_TRAINER_IMAGE", defaults.trainer_image),
            vllm_image=env.get("KUBETUNE_VLLM_IMAGE", defaults.vllm_image),
            image_pull_policy=env.get("KUBETUNE_IMAGE_PULL_POLICY", defaults.image_pull_policy),
            reconcile_interval=float(env.get("KUBETUNE_RECONCILE_INTERVAL", defaults.reconcile_interval)),
            metrics_port=int(env.get("KUBETUNE_OPERATOR_METRICS_PORT", defaults.metrics_port)),
            liveness_port=int(env.get("KUBETUNE_OPERATOR_LIVENESS_PORT", defaults.liveness_port)),
            failure_log_lines=int(env.get("KUBETUNE_FAILURE_LOG_LINES", defaults.failure_log_lines)),
            progress_retry_seconds=float(env.get("KUBETUNE_PROGRESS_RETRY_SECONDS", defaults.progress_retry_seconds)),
            workload_service_account=env.get("KUBETUNE_WORKLOAD_SERVICE_ACCOUNT", ""),
            image_pull_secrets=tuple(n.strip() for n in env.get("KUBETUNE_IMAGE_PULL_SECRETS", "").split(",") if n.strip()),
            trainer_final_scrape_seconds=float(env.get("KUBETUNE_TRAINER_FINAL_SCRAPE_SECONDS") or defaults.trainer_final_scrape_seconds),
        )
