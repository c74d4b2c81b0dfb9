"""Act: run a decision's actions, creating and deleting the job's children.

Idempotent: children have deterministic names (`kubetune.api.naming`), creation is
create-if-absent (409 = already there) and deletion of what is gone is no error, so a run
repeated after a lost answer or an operator restart does no harm. What observe.py read is
reused (`Observation`); only what it did not read is read here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from kubetune.api.layout import LayoutError, job_layout
from kubetune.api.naming import config_map_name, selector, serve_name, workers_service_name
from kubetune.api.spec import FineTuneJob
from kubetune.artifacts.storage import S3Clients

from . import builders
from .kube import Kube
from .observe import Observation
from .settings import Settings
from .status import Action, Decision

SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"


class Actor:
    """Runs one decision's actions on one job's children."""

    def __init__(self, api: Kube, seen: Observation, settings: Settings, logger: logging.Logger | logging.LoggerAdapter):
        self.api = api
        self.seen = seen
        self.settings = settings
        self.logger = logger

    async def act(self, decision: Decision, job: FineTuneJob) -> None:
        api, ns, name, observed = self.api, job.metadata.namespace, job.metadata.name, self.seen.observed
        for action in decision.actions:
            if action is Action.ENSURE_TRAINING_INFRA:
                await self.ensure_config_map(job, started=bool(decision.status.start_time) and self.seen.started)
                if not self.seen.started or await api.get("Service", ns, workers_service_name(name)) is None:
                    await api.create(builders.build_worker_service(job))
            elif action is Action.CREATE_WORKERS:
                attempt = decision.status.attempt
                for index in range(job.spec.distributed.nodes):
                    if index not in observed.workers and await api.create(builders.build_worker_pod(job, index, self.settings, attempt)):
                        self.logger.info(f"created worker {index} (attempt {attempt})")
            elif action is Action.DELETE_WORKERS:
                for state in observed.workers.values():
                    if not state.deleting:
                        await api.delete("Pod", ns, state.name)
            elif action is Action.CREATE_MERGE:
                await api.create(builders.build_merge_pod(job, self.settings))
            elif action is Action.DELETE_MERGE:
                if observed.merge is not None and not observed.merge.deleting:
                    await api.delete("Pod", ns, observed.merge.name)
            elif action is Action.ENSURE_SERVING:
                await self.ensure_serving(job)
            elif action is Action.DELETE_SERVING:
                await api.delete("Deployment", ns, serve_name(name))
                await api.delete("Service", ns, serve_name(name))

    async def ensure_config_map(self, job: FineTuneJob, started: bool) -> None:
        seen = self.seen
        if started and seen.config_map is not None:
            return  # the workers' copy of the spec never changes once they started
        wanted = builders.build_config_map(job)
        if seen.config_map is None:
            # Not read (a job that never started) or read as absent: create; on 409 read what is there.
            if await self.api.create(wanted) or seen.config_map_read:
                return
            seen.config_map, seen.config_map_read = await self.api.get("ConfigMap", job.metadata.namespace, config_map_name(job.metadata.name)), True
            if seen.config_map is None:
                return
        if not started and seen.config_map.get("data") != wanted["data"]:
            # Spec edited before any worker started: the workers get the new spec.
            await self.api.merge_patch("ConfigMap", job.metadata.namespace, wanted["metadata"]["name"], {"data": wanted["data"]})

    async def ensure_serving(self, job: FineTuneJob) -> None:
        wanted = builders.build_serving_deployment(job, self.settings)
        digest = hashlib.sha256(json.dumps(wanted["spec"], sort_keys=True).encode()).hexdigest()[:16]
        wanted["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
        deployment, ns = self.seen.deployment, job.metadata.namespace
        if deployment is None:
            await self.api.create(wanted)
        elif (deployment["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != digest:
            await self.api.merge_patch("Deployment", ns, wanted["metadata"]["name"],
                                       {"metadata": {"annotations": wanted["metadata"]["annotations"]}, "spec": wanted["spec"]})  # fmt: skip
        if await self.api.get("Service", ns, serve_name(job.metadata.name)) is None:
            await self.api.create(builders.build_serving_service(job))


async def delete_children(api: Kube, namespace: str, name: str) -> None:
    """Every child of a job being deleted (owner references do it too; this makes it immediate)."""
    for pod in await api.list("Pod", namespace, selector(name)):
        await api.delete("Pod", namespace, pod["metadata"]["name"])
    await api.delete("Deployment", namespace, serve_name(name))
    for service in (serve_name(name), workers_service_name(name)):
        await api.delete("Service", namespace, service)
    await api.delete("ConfigMap", namespace, config_map_name(name))


async def delete_checkpoints(s3: S3Clients, job: FineTuneJob, keys: dict[str, str], logger: logging.Logger | logging.LoggerAdapter) -> None:
    """storage.deleteOnJobDeletion: the job's checkpoints go with it (s3:// only)."""
    try:
        layout = job_layout(job)
    except LayoutError:
        return
    if layout.checkpoints.scheme != "s3":
        logger.warning(f"storage.deleteOnJobDeletion: {layout.checkpoints} is not s3://; left in place")
        return
    store = s3.store(layout.checkpoints, job.spec.storage.endpoint, job.spec.storage.region, keys, attempts=3)
    await asyncio.to_thread(lambda: store.delete([o.key for o in store.list()]))
    logger.info(f"deleted checkpoints under {layout.checkpoints}")
