"""Names and labels of a FineTuneJob's children on the cluster, in one place.

The operator's builders create the children with these names and labels, the operator
finds them again by them, `kubetune logs|status` reads them, and `kubetune validate`
checks a job name leaves room for them. Pure: strings only.

    NAME-config            ConfigMap with the job document (role config)
    NAME-workers           headless Service for the rendezvous (role workers)
    NAME-worker-<i>        worker Pod of node i (role worker, labels worker-index, attempt)
    NAME-merge             merge Pod (role merge)
    NAME-serve             serving Deployment and Service (role serve)
"""

from __future__ import annotations

from typing import Optional

JOB_LABEL = "kubetune.io/job"
ROLE_LABEL = "kubetune.io/role"
INDEX_LABEL = "kubetune.io/worker-index"
ATTEMPT_LABEL = "kubetune.io/attempt"

# Values of ROLE_LABEL.
CONFIG_ROLE = "config"
WORKERS_ROLE = "workers"
WORKER_ROLE = "worker"
MERGE_ROLE = "merge"
SERVE_ROLE = "serve"

# Kubernetes object names (DNS labels for Pods and Services) are at most this long.
NAME_LIMIT = 63


def config_map_name(job: str) -> str:
    return f"{job}-config"


def workers_service_name(job: str) -> str:
    return f"{job}-workers"


def worker_pod_name(job: str, index: int) -> str:
    return f"{job}-worker-{index}"


def merge_pod_name(job: str) -> str:
    return f"{job}-merge"


def serve_name(job: str) -> str:
    """The serving Deployment and its Service."""
    return f"{job}-serve"


def selector(job: str, role: Optional[str] = None) -> dict[str, str]:
    """Labels that select the job's children (of one role)."""
    return {JOB_LABEL: job, **({ROLE_LABEL: role} if role else {})}


def selector_text(job: str, role: Optional[str] = None) -> str:
    """`selector` as a label selector string (kubectl -l, the API's labelSelector)."""
    return ",".join(f"{key}={value}" for key, value in selector(job, role).items())
