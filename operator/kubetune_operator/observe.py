"""Observe: what one run sees of a job, for the pure state machine (`status.decide`).

`Observer(...).observe()` parses the job, runs the semantic checks, looks for the Secrets
it names, reads its children, and, when the decision needs them, the trainer's
progress.json and the model's config.json (for the memory planner). It returns an
`Observation`: the job the workers run, what `decide` reads (`Observed`, progress, layout)
and the children as read, which `act.py` repairs without reading them again.

API calls are kept to what the decision needs: a job that never started (no startTime) has
no children the operator knows of, so its first run reads none (act.py creates them, 409 =
already there); the serving Deployment is read only in the phases that have one; a Secret
read serves every job naming it for a few seconds (`state.SecretCache`).

Storage credentials: to read progress.json the operator fetches the job's
`spec.storage.credentialsSecret` through the API at read time and passes the keys to a
boto3 client in memory only (`kubetune.artifacts.storage.S3Clients`); they are never logged, stored
in status, or put in the environment. Without a credentialsSecret, boto3's default chain
(the operator pod's own identity, e.g. IRSA) is used. pvc:// checkpoint locations cannot
be read by the operator: progress then stays unknown while the pod phases still drive the job.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Optional

import kopf

from kubetune.api.crd import FineTuneJobStatus
from kubetune.api.layout import JobLayout, LayoutError, job_layout
from kubetune.api.naming import ATTEMPT_LABEL, INDEX_LABEL, MERGE_ROLE, ROLE_LABEL, WORKER_ROLE, config_map_name, selector, serve_name
from kubetune.api.progress import Progress, parse_progress
from kubetune.api.spec import FineTuneJob, Phase, SpecError, parse_job
from kubetune.api.uri import parse_uri
from kubetune.api.validation import check_job, job_warnings
from kubetune.planner.estimate import shipped_config

from . import builders
from .memory import check_memory
from .state import JobRecord, OperatorState
from .status import Observed, PodState

# Fields whose change after the workers started is refused (see status.SpecChangeRefused).
MUTABLE_FIELDS = ("serving", "runPolicy")
# Phases in which a serving Deployment can exist (or is about to be created).
SERVING_PHASES = (Phase.Merging, Phase.Serving, Phase.Succeeded)
STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

SecretReader = Callable[[str], Awaitable[Optional[dict]]]


# ---------------------------------------------------------------------------------------
# pure readers: API objects -> what the decision reads


def document_from_body(body: kopf.Body) -> dict:
    """The FineTuneJob document of kopf's body: what `parse_job` reads (no status)."""
    meta = body.metadata
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid, "generation": meta.get("generation")},
        "spec": copy.deepcopy(dict(body.spec)),
    }


def job_from_body(body: kopf.Body) -> tuple[Optional[FineTuneJob], list[str]]:
    """The parsed job, or None and the schema problems (`field: message`)."""
    try:
        return parse_job(document_from_body(body), f"FineTuneJob {body.metadata.namespace}/{body.metadata.name}"), []
    except SpecError as err:
        return None, [f"{path}: {message}" if path else message for path, _, message in err.problems]


def status_from_document(document: dict) -> FineTuneJobStatus:
    """The typed status of the job's status as the API holds it (kopf's own keys are not ours)."""
    return FineTuneJobStatus.model_validate({k: v for k, v in document.items() if k != "kopf"})


def pod_state(pod: dict) -> PodState:
    status = pod.get("status") or {}
    exit_code, reason, finished_at = None, status.get("reason") or "", ""
    for container in status.get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            exit_code = terminated.get("exitCode")
            reason = terminated.get("reason") or reason
            finished_at = terminated.get("finishedAt") or ""
    labels = pod["metadata"].get("labels") or {}
    return PodState(
        name=pod["metadata"]["name"],
        phase=status.get("phase") or "Pending",
        exit_code=exit_code,
        attempt=int(labels.get(ATTEMPT_LABEL, "0")),
        deleting=bool(pod["metadata"].get("deletionTimestamp")),
        reason=reason if reason not in ("Error", "Completed") else "",
        finished_at=finished_at,
    )


def changed_fields(started: FineTuneJob, current: FineTuneJob) -> list[str]:
    """Top-level spec fields changed since the workers started, besides the mutable ones."""
    a = started.spec.model_dump(by_alias=True, mode="json")
    b = current.spec.model_dump(by_alias=True, mode="json")
    return [key for key in b if key not in MUTABLE_FIELDS and a.get(key) != b.get(key)]


def with_mutable_fields(started: FineTuneJob, current: FineTuneJob) -> FineTuneJob:
    """The job the workers run (ConfigMap copy) with the current serving and runPolicy."""
    return started.model_copy(update={"spec": started.spec.model_copy(update={"serving": current.spec.serving, "run_policy": current.spec.run_policy})})


def keys_from_secret(secret: Optional[dict]) -> dict[str, str]:
    """The S3 keys a credentials Secret holds (in memory only)."""
    data = (secret or {}).get("data") or {}
    return {k: base64.b64decode(data[k]).decode() for k in STORAGE_KEYS if k in data}


async def read_storage_keys(job: FineTuneJob, read_secret: SecretReader) -> dict[str, str]:
    """The job's S3 keys, read from its credentials Secret now; {} without one (boto3's chain)."""
    name = job.spec.storage.credentials_secret
    return keys_from_secret(await read_secret(name)) if name else {}


# ---------------------------------------------------------------------------------------
# one run's observation


@dataclass
class Observation:
    """What one run saw of a job."""

    job: Optional[FineTuneJob]  # what the workers run (started copy + live serving/runPolicy); None: no usable spec
    observed: Observed  # what `decide` reads of the children, Secrets and checks
    started: bool  # the status has a startTime: children were read, not assumed absent
    progress: Optional[Progress] = None
    layout: Optional[JobLayout] = None
    config_map: Optional[dict] = None  # the workers' copy of the spec, as read (None: absent or not read)
    config_map_read: bool = False
    deployment: Optional[dict] = None  # the serving Deployment, read in SERVING_PHASES only


class Observer:
    """Observes one job for one run. `previous` is the status the run starts from."""

    def __init__(self, state: OperatorState, record: JobRecord, body: kopf.Body, previous: FineTuneJobStatus,
                 logger: logging.Logger | logging.LoggerAdapter):  # fmt: skip
        self.api = state.api()
        self.state = state
        self.record = record
        self.settings = state.settings
        self.body = body
        self.previous = previous
        self.logger = logger
        self.name, self.namespace = body.metadata.name, body.metadata.namespace
        self.secrets_read: dict[str, Optional[dict]] = {}  # one answer per Secret within a run

    async def observe(self) -> Observation:
        job, problems = job_from_body(self.body)
        started = bool(self.previous.start_time)
        if job is None and started:
            job = await self.started_job()  # the live spec no longer parses; the workers keep theirs
        seen = Observation(job=job, observed=Observed(problems=problems), started=started)
        if job is None:
            return seen
        seen.observed.problems += [str(p) for p in check_job(job, on_cluster=True)]
        seen.observed.warnings = [str(w) for w in job_warnings(job)]
        seen.observed.problems += await self.missing_secrets(job)
        if started:
            seen.job = job = await self.children(job, seen)
        try:
            seen.layout = job_layout(job)
        except LayoutError:
            pass  # reported by check_job
        if seen.layout is not None and not seen.observed.problems and self.wants_progress(started):
            seen.progress = await self.read_progress(job, seen.layout)
        if not seen.observed.problems:
            seen.observed.memory = await self.memory_plan(job)
        return seen

    async def started_job(self) -> Optional[FineTuneJob]:
        config_map = await self.api.get("ConfigMap", self.namespace, config_map_name(self.name))
        if config_map is None:
            return None
        return builders.job_from_config_map(config_map, document_from_body(self.body)["metadata"])

    async def secret(self, name: str) -> Optional[dict]:
        if name not in self.secrets_read:
            self.secrets_read[name] = await self.state.secrets.get(self.api, self.namespace, name)
        return self.secrets_read[name]

    async def missing_secrets(self, job: FineTuneJob) -> list[str]:
        wanted = []
        if job.spec.storage.credentials_secret:
            wanted.append(("spec.storage.credentialsSecret", job.spec.storage.credentials_secret))
        if job.spec.serving.enabled and job.spec.serving.auth_secret:
            wanted.append(("spec.serving.authSecret", job.spec.serving.auth_secret))
        return [f"{field}: Secret {name!r} not found in namespace {self.namespace}" for field, name in wanted if await self.secret(name) is None]

    async def children(self, job: FineTuneJob, seen: Observation) -> FineTuneJob:
        """The pods, the serving Deployment and the ConfigMap of a started job; returns the
        job the workers run (their copy of the spec with the live serving and runPolicy)."""
        observed = seen.observed
        for pod in await self.api.list("Pod", self.namespace, selector(self.name)):
            labels = pod["metadata"].get("labels") or {}
            role = labels.get(ROLE_LABEL)
            state = pod_state(pod)
            if state.failed:
                container = "trainer" if role == WORKER_ROLE else "merge"
                tail = await self.api.log_tail(self.namespace, state.name, self.settings.failure_log_lines, container)
                state = PodState(**{**state.__dict__, "log_tail": tail.strip()})
            if role == WORKER_ROLE and INDEX_LABEL in labels:
                observed.workers[int(labels[INDEX_LABEL])] = state
            elif role == MERGE_ROLE:
                observed.merge = state
        if self.previous.phase in SERVING_PHASES:
            seen.deployment = await self.api.get("Deployment", self.namespace, serve_name(self.name))
            if seen.deployment is not None:
                observed.serving_ready_replicas = (seen.deployment.get("status") or {}).get("readyReplicas") or 0
        seen.config_map, seen.config_map_read = await self.api.get("ConfigMap", self.namespace, config_map_name(self.name)), True
        if seen.config_map is not None:
            started = builders.job_from_config_map(seen.config_map, job.metadata.model_dump(exclude_none=True))
            if started is not None:
                observed.spec_changes = changed_fields(started, job)
                return with_mutable_fields(started, job)
        return job

    def wants_progress(self, started: bool) -> bool:
        if not started:
            # No worker of this job ran yet: its first run creates them without waiting for
            # storage (a progress.json left by an earlier job of the same name shows one run later).
            return False
        phase = self.previous.phase
        if phase in (None, Phase.Pending, Phase.Running, Phase.Restarting, Phase.Merging):
            return True
        progress = self.previous.progress
        step, total = (progress.step, progress.total_steps) if progress is not None else (None, None)
        return phase in (Phase.Serving, Phase.Succeeded) and step != total

    async def read_progress(self, job: FineTuneJob, layout: JobLayout) -> Optional[Progress]:
        if layout.checkpoints.scheme != "s3":
            return None
        failed_at = self.record.storage_failed_at
        if failed_at is not None and time.monotonic() - failed_at < self.settings.progress_retry_seconds:
            return None
        keys = await read_storage_keys(job, self.secret)
        storage = job.spec.storage
        try:
            store = self.state.s3.store(layout.checkpoints, storage.endpoint, storage.region, keys, attempts=1)  # the next cycle retries
            raw = await asyncio.to_thread(store.get_bytes, "progress.json")
        except FileNotFoundError:
            return None  # the trainer has not written it yet
        except Exception as err:  # noqa: BLE001 - storage trouble must not stop reconciliation
            self.record.storage_failed_at = time.monotonic()
            self.logger.warning(f"cannot read {layout.progress} (next try in {self.settings.progress_retry_seconds:.0f}s): {type(err).__name__}: {err}")
            return None
        self.record.storage_failed_at = None
        try:
            return parse_progress(raw)
        except (ValueError, TypeError) as err:
            self.logger.warning(f"ignoring malformed {layout.progress}: {err}")
            return None

    async def memory_plan(self, job: FineTuneJob) -> Optional[tuple[bool, str]]:
        """The planner's verdict, computed once per spec generation (config.json read at most once)."""
        generation = self.body.metadata.get("generation")
        if self.record.plan is None or self.record.plan[0] != generation:
            config = await self.model_config(job)
            check = check_memory(job, config) if config is not None else None
            self.record.plan = (generation, (check.fits, check.message) if check is not None else None)
        return self.record.plan[1]

    async def model_config(self, job: FineTuneJob) -> Optional[dict]:
        shipped = shipped_config(job.spec.model.uri)
        if shipped is not None:
            return shipped
        uri = parse_uri(job.spec.model.uri, "/")
        if uri.scheme != "s3" or job.spec.model.gguf_file:
            return None  # pvc/hf/GGUF configs are not read by the operator
        storage = job.spec.storage
        try:
            store = self.state.s3.store(uri, storage.endpoint, storage.region, await read_storage_keys(job, self.secret), attempts=2)
            return json.loads(await asyncio.to_thread(store.get_bytes, "config.json"))
        except Exception as err:  # noqa: BLE001 - advisory only
            self.logger.info(f"no memory estimate: cannot read {uri}/config.json: {type(err).__name__}")
            return None
