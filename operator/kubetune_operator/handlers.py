"""kopf wiring: which kopf handler runs what, with the operator's state as kopf's memo.

- startup (`configure`): kopf's settings, the /metrics server, boto3 imported up front;
- login: kopf's credentials and the operator's own client from one configuration (kube.py);
- a timer per job (at once when the job is seen: on creation and on operator start; then
  every `reconcile_interval`) and a spec change both run `reconcile.reconcile`;
- delete: `reconcile.cleanup`; cleanup at exit: the client and the metrics server go.

kopf's diff base is kept in memory (`state.MemoryDiffBaseStorage`): no annotation patch
per job and per spec change; after a restart every job is reconciled from its live state
anyway. A new job thus costs, besides its own creation and its children's: kopf's
finalizer patch, one status patch and one Event (and a Secret read, shared by the jobs
that name that Secret).
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from lightkube import ConfigError

from kubetune.api import spec as specmod

from .kube import Kube, connection_info, load_config
from .reconcile import cleanup, reconcile
from .report import FINALIZER
from .settings import Settings
from .state import OperatorState


async def configure(settings: kopf.OperatorSettings, memo: OperatorState, **_: Any) -> None:
    # kopf's handler progress (retries) in annotations: the CRD's structural schema prunes
    # status.kopf. Its diff base in memory (see MemoryDiffBaseStorage).
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = memo.diffbase
    settings.posting.level = logging.WARNING  # our own Events describe transitions
    settings.peering.standalone = True  # one replica (the chart's Deployment has replicas: 1)
    settings.watching.server_timeout = 300
    memo.metrics.serve(memo.settings.metrics_port)
    memo.s3.session()  # import boto3 now, not in the first job's first run


async def login(memo: OperatorState, **_: Any) -> kopf.ConnectionInfo:
    """kopf's credentials and the operator's own client from one configuration (kube.py): the
    pod's service account, else the kubeconfig. kopf calls this again after a 401 or when the
    token expires; a token kept in a file is then read again (it may have been rotated)."""
    try:
        config = load_config()
    except (ConfigError, OSError, KeyError) as err:
        raise kopf.LoginError(f"no Kubernetes credentials (in-cluster service account or KUBECONFIG): {err}") from err
    if memo.kube is None:
        memo.kube = Kube(config)
    return connection_info(config)


async def close(memo: OperatorState, **_: Any) -> None:
    if memo.kube is not None:
        await memo.kube.close()
    memo.metrics.stop()


async def reconcile_timer(body: kopf.Body, logger: logging.Logger, memo: OperatorState, **_: Any) -> None:
    """The timer's run: at once when the job is seen, then every interval."""
    await reconcile(memo, body, logger, wait_for_newer=True)


async def reconcile_spec_change(body: kopf.Body, logger: logging.Logger, memo: OperatorState, **_: Any) -> None:
    """A spec change (suspend, serving, edits before the start) runs the reconciliation at once."""
    await reconcile(memo, body, logger, wait_for_newer=False)


async def delete(body: kopf.Body, logger: logging.Logger, memo: OperatorState, **_: Any) -> None:
    await cleanup(memo, body, logger)


def quiet_client_logs() -> None:
    # botocore's DEBUG wire log prints SigV4 Authorization headers (with the access key ID of
    # a user's Secret): the operator never logs below INFO there, even with --verbose.
    for noisy in ("botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger(noisy).level))
    # httpx2 (lightkube's HTTP client) logs every request at INFO: one line per API call.
    for noisy in ("httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger(noisy).level))


def build_registry(settings: Settings) -> kopf.OperatorRegistry:
    """All handlers, with the reconcile interval from the settings. Run with memo=OperatorState(settings)."""
    quiet_client_logs()
    group, version, plural = specmod.API_GROUP, specmod.API_VERSION, specmod.PLURAL
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(close)
    kopf.timer(group, version, plural, interval=settings.reconcile_interval, initial_delay=0, id="reconcile", registry=registry)(reconcile_timer)
    kopf.on.update(group, version, plural, field="spec", id="spec-changed", registry=registry)(reconcile_spec_change)
    kopf.on.delete(group, version, plural, id="cleanup", registry=registry)(delete)
    return registry
