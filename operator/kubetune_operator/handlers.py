"""kopf handlers: one level-based reconciliation of a FineTuneJob, plus cleanup on delete.

`reconcile` runs from a kopf timer (first at once when the operator sees the job: on
creation and on operator start; then every `reconcile_interval`) and from a spec change
(`kopf.on.update` on `spec`), one run at a time per job (a lock in the memo). Each run
observes the job's children, the Secrets it names and the trainer's progress.json, asks
the pure state machine (`status.decide`) what to do, creates or deletes children
(idempotently: deterministic names, create-if-absent, 409 = exists), patches the status
(one merge patch, none when nothing changed) and emits an Event per transition. A lost watch
event, a deleted child or an operator restart is therefore repaired by the next run.

API calls per run are kept to what the decision needs: the status the operator last wrote
is kept in memory (it is the only writer of status, so that copy is never older than the
watched body), a job that never started creates its children without listing or reading
first (409 = already there), the serving Deployment is read only in the phases that have
one, and a Secret read serves every job naming it for a few seconds (`SecretCache`). kopf's
diff base is kept in memory (`MemoryDiffBaseStorage`): no annotation patch per job and per
spec change; after a restart every job is reconciled from its live state anyway. A new job thus costs, besides its own
creation and its children's: kopf's finalizer patch, one status patch and one Event (and a
Secret read, shared by the jobs that name that Secret).

Storage credentials: to read progress.json the operator fetches the job's
`spec.storage.credentialsSecret` through the API at read time and passes the keys to a
boto3 client in memory only; they are never logged, stored in status, or put in the
environment. Without a credentialsSecret, boto3's default chain (the operator pod's own
identity, e.g. IRSA) is used. pvc:// checkpoint locations cannot be read by the operator:
progress then stays unknown while the pod phases still drive the job.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Optional

import kopf

from kubetune import spec as specmod
from kubetune.layout import JobLayout, LayoutError, job_layout
from kubetune.planner import shipped_config
from kubetune.progress import Progress, parse_progress
from kubetune.spec import FineTuneJob, SpecError, parse_job
from kubetune.storage import S3Store
from kubetune.uri import Uri, parse_uri
from kubetune.validation import check_job, job_warnings

from . import builders, metrics
from .kube import Kube
from .memory import check_memory
from .settings import Settings
from .status import Action, Decision, Observed, PodState, decide, parse_iso

GROUP, VERSION, PLURAL = specmod.API_GROUP, specmod.API_VERSION, specmod.PLURAL
# Fields whose change after the workers started is refused (see status.SpecChangeRefused).
MUTABLE_FIELDS = ("serving", "runPolicy")
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"
EVENT_MESSAGE_LIMIT = 1000
STATUS_KEYS_OWNED_BY_KOPF = ("kopf",)
# Phases in which a serving Deployment can exist (or is about to be created).
SERVING_PHASES = ("Merging", "Serving", "Succeeded")
S3_CLIENT_CACHE_LIMIT = 256
# A Secret read serves every run (of any job naming it) for this long, at most one interval.
SECRET_TTL_SECONDS = 5.0


class SecretCache:
    """Secrets read through the API, each kept for `ttl` seconds (in memory only, like the keys
    handed to boto3): many jobs naming one credentials Secret cost one read per `ttl`, not one
    per job and run (runs that ask while a read is under way share it). A Secret created or
    deleted is seen at most `ttl` later; a failed read is not kept."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self.entries: dict[tuple[str, str], tuple[float, asyncio.Future]] = {}

    async def get(self, api: Kube, namespace: str, name: str) -> Optional[dict]:
        key, now = (namespace, name), time.monotonic()
        entry = self.entries.get(key)
        if entry is None or now - entry[0] >= self.ttl:
            for old in [k for k, (at, _) in self.entries.items() if now - at >= self.ttl]:
                del self.entries[old]
            entry = self.entries[key] = (now, asyncio.ensure_future(api.get("Secret", namespace, name)))
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self.entries.get(key) is entry:
                del self.entries[key]
            raise


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """kopf's "last handled" essence of each job, in memory (by uid) instead of an annotation
    that costs a PATCH of the job on creation and on every spec change. After an operator
    restart kopf sees every job as resumed, and the timer's first run reconciles it."""

    def __init__(self) -> None:
        super().__init__()
        self.essences: dict[str, kopf.BodyEssence] = {}

    def fetch(self, *, body: kopf.Body) -> Optional[kopf.BodyEssence]:
        return self.essences.get(body.metadata.uid)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self.essences[body.metadata.uid] = essence

    def forget(self, uid: Optional[str]) -> None:
        self.essences.pop(uid, None)



def kube(memo: kopf.Memo) -> Kube:
    if memo.get("kube") is None:
        raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
    return memo["kube"]


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's handler progress (retries) in annotations: the CRD's structural schema prunes
    # status.kopf. Its diff base in memory (see MemoryDiffBaseStorage).
    settings.persistence.finalizer = "kubetune.io/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = memo["diffbase"]
    settings.posting.level = logging.WARNING  # our own Events describe transitions
    settings.peering.standalone = True  # one replica (the chart's Deployment has replicas: 1)
    settings.watching.server_timeout = 300
    metrics.serve(memo["settings"].metrics_port)
    boto3_session()  # import boto3 now, not in the first job's first run


def login(memo: kopf.Memo, **kwargs: Any) -> Optional[kopf.ConnectionInfo]:
    """In-cluster service account or kubeconfig; KUBETUNE_API_SERVER names a server explicitly."""
    server = os.environ.get("KUBETUNE_API_SERVER")
    if server:
        info = kopf.ConnectionInfo(server=server, default_namespace="default")
    else:
        info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    if info is not None:
        memo["kube"] = Kube(info)
    return info


async def close_client(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("kube") is not None:
        await memo["kube"].close()
    metrics.forget_all_jobs()
    metrics.stop()


# ---------------------------------------------------------------------------------------
# observing


def utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def job_document(body: kopf.Body) -> dict:
    meta = body.metadata
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid, "generation": meta.get("generation")},
        "spec": copy.deepcopy(dict(body.spec)),
    }


def parse_body(body: kopf.Body) -> tuple[Optional[FineTuneJob], list[str]]:
    try:
        return parse_job(job_document(body), f"FineTuneJob {body.metadata.namespace}/{body.metadata.name}"), []
    except SpecError as err:
        return None, [f"{path}: {message}" if path else message for path, _, message in err.problems]


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
        attempt=int(labels.get(builders.ATTEMPT_LABEL, "0")),
        deleting=bool(pod["metadata"].get("deletionTimestamp")),
        reason=reason if reason not in ("Error", "Completed") else "",
        finished_at=finished_at,
    )


def changed_fields(started: FineTuneJob, current: FineTuneJob) -> list[str]:
    a = started.spec.model_dump(by_alias=True, mode="json")
    b = current.spec.model_dump(by_alias=True, mode="json")
    return [key for key in b if key not in MUTABLE_FIELDS and a.get(key) != b.get(key)]


def with_mutable_fields(started: FineTuneJob, current: FineTuneJob) -> FineTuneJob:
    """The job the workers run (ConfigMap copy) with the current serving and runPolicy."""
    return started.model_copy(update={"spec": started.spec.model_copy(update={"serving": current.spec.serving, "run_policy": current.spec.run_policy})})


def short(message: str) -> str:
    if len(message) <= EVENT_MESSAGE_LIMIT:
        return message
    half = EVENT_MESSAGE_LIMIT // 2
    return message[:half] + " ... " + message[-half:]


class Reconciler:
    """One reconciliation cycle of one job."""

    def __init__(self, api: Kube, body: kopf.Body, settings: Settings, logger: logging.Logger | logging.LoggerAdapter,
                 storage_failures: Optional[dict] = None, plans: Optional[dict] = None,
                 previous: Optional[dict] = None, s3_clients: Optional[dict] = None, secrets: Optional[SecretCache] = None):  # fmt: skip
        self.api = api
        self.plans = plans if plans is not None else {}
        # (namespace, name) -> monotonic time of the last failed progress read (shared across cycles).
        self.storage_failures = storage_failures if storage_failures is not None else {}
        self.s3_clients = s3_clients if s3_clients is not None else {}
        self.body = body
        self.settings = settings
        self.logger = logger
        self.name = body.metadata.name
        self.namespace = body.metadata.namespace
        # The status this run starts from: the one the operator last wrote, else the body's.
        status = previous if previous is not None else dict(body.get("status") or {})
        self.previous = copy.deepcopy({k: v for k, v in status.items() if k not in STATUS_KEYS_OWNED_BY_KOPF})
        # A job that never started (no startTime) has no children the operator knows of: its
        # run creates them without listing or reading first (deterministic names, 409 = already
        # there, e.g. after a crash before the status patch). A started job is observed, to repair.
        self.started = bool(self.previous.get("startTime"))
        self.pods: list[dict] = []
        self.config_map: Optional[dict] = None
        self.config_map_read = False
        self.deployment: Optional[dict] = None
        self.secrets = secrets if secrets is not None else SecretCache(ttl=0.0)
        self.secrets_read: dict[str, Optional[dict]] = {}  # one answer per Secret within a run

    async def run(self) -> Decision:
        job, problems = parse_body(self.body)
        if job is None and self.previous.get("startTime"):
            # The live spec no longer parses; the workers keep the spec they started with.
            job = await self.started_job()
        observed = Observed(problems=problems)
        progress = None
        layout: Optional[JobLayout] = None
        if job is not None:
            observed.problems += [str(p) for p in check_job(job, on_cluster=True)]
            observed.warnings = [str(w) for w in job_warnings(job)]
            observed.problems += await self.missing_secrets(job)
            job = await self.observe(job, observed)
            try:
                layout = job_layout(job)
            except LayoutError:
                layout = None  # reported by check_job
            if layout is not None and not observed.problems and self.wants_progress():
                progress = await self.read_progress(job, layout)
            if not observed.problems:
                observed.memory = await self.memory_plan(job)
        decision = decide(job, observed, progress, self.previous, utc_now(), layout, self.body.metadata.get("generation"))
        if job is not None:
            await self.execute(decision, job, observed)
        return decision

    async def started_job(self) -> Optional[FineTuneJob]:
        config_map = await self.api.get("ConfigMap", self.namespace, builders.config_map_name(self.name))
        if config_map is None:
            return None
        return builders.job_from_config_map(config_map, job_document(self.body)["metadata"])

    async def missing_secrets(self, job: FineTuneJob) -> list[str]:
        wanted = []
        if job.spec.storage.credentials_secret:
            wanted.append(("spec.storage.credentialsSecret", job.spec.storage.credentials_secret))
        if job.spec.serving.enabled and job.spec.serving.auth_secret:
            wanted.append(("spec.serving.authSecret", job.spec.serving.auth_secret))
        problems = []
        for field, name in wanted:
            if await self.secret(name) is None:
                problems.append(f"{field}: Secret {name!r} not found in namespace {self.namespace}")
        return problems

    async def secret(self, name: str) -> Optional[dict]:
        if name not in self.secrets_read:
            self.secrets_read[name] = await self.secrets.get(self.api, self.namespace, name)
        return self.secrets_read[name]

    async def storage_keys(self, job: FineTuneJob) -> dict[str, str]:
        return await storage_keys(self.api, job, self.secret)

    async def observe(self, job: FineTuneJob, observed: Observed) -> FineTuneJob:
        if not self.started:
            return job  # nothing of it to observe yet (see __init__)
        self.pods = await self.api.list("Pod", self.namespace, {builders.JOB_LABEL: self.name})
        for pod in self.pods:
            labels = pod["metadata"].get("labels") or {}
            role = labels.get(builders.ROLE_LABEL)
            state = pod_state(pod)
            if state.failed:
                container = "trainer" if role == "worker" else "merge"
                tail = await self.api.log_tail(self.namespace, state.name, self.settings.failure_log_lines, container)
                state = PodState(**{**state.__dict__, "log_tail": tail.strip()})
            if role == "worker" and builders.INDEX_LABEL in labels:
                observed.workers[int(labels[builders.INDEX_LABEL])] = state
            elif role == "merge":
                observed.merge = state
        if self.previous.get("phase") in SERVING_PHASES:
            self.deployment = await self.api.get("Deployment", self.namespace, builders.serve_name(self.name))
            if self.deployment is not None:
                observed.serving_ready_replicas = (self.deployment.get("status") or {}).get("readyReplicas") or 0
        if await self.read_config_map() is not None:
            started = builders.job_from_config_map(self.config_map, job.metadata.model_dump(exclude_none=True))
            if started is not None:
                observed.spec_changes = changed_fields(started, job)
                return with_mutable_fields(started, job)
        return job

    async def read_config_map(self) -> Optional[dict]:
        self.config_map = await self.api.get("ConfigMap", self.namespace, builders.config_map_name(self.name))
        self.config_map_read = True
        return self.config_map

    async def memory_plan(self, job: FineTuneJob) -> Optional[tuple[bool, str]]:
        """The planner's verdict, computed once per spec generation (config.json read at most once)."""
        key = (self.namespace, self.name, self.body.metadata.get("generation"))
        if key not in self.plans:
            config = await self.model_config(job)
            check = check_memory(job, config) if config is not None else None
            self.plans[key] = (check.fits, check.message) if check is not None else None
        return self.plans[key]

    async def model_config(self, job: FineTuneJob) -> Optional[dict]:
        shipped = shipped_config(job.spec.model.uri)
        if shipped is not None:
            return shipped
        uri = parse_uri(job.spec.model.uri, "/")
        if uri.scheme != "s3" or job.spec.model.gguf_file:
            return None  # pvc/hf/GGUF configs are not read by the operator
        try:
            store = s3_store(uri, job.spec.storage, await self.storage_keys(job), attempts=2, clients=self.s3_clients)
            return json.loads(await asyncio.to_thread(store.get_bytes, "config.json"))
        except Exception as err:  # noqa: BLE001 - advisory only
            self.logger.info(f"no memory estimate: cannot read {uri}/config.json: {type(err).__name__}")
            return None

    def wants_progress(self) -> bool:
        if not self.started:
            # No worker of this job ran yet: its first run creates them without waiting for
            # storage (a progress.json left by an earlier job of the same name shows one run later).
            return False
        phase = self.previous.get("phase")
        if phase in (None, "Pending", "Running", "Restarting", "Merging"):
            return True
        progress = self.previous.get("progress") or {}
        return phase in ("Serving", "Succeeded") and progress.get("step") != progress.get("totalSteps")

    async def read_progress(self, job: FineTuneJob, layout: JobLayout) -> Optional[Progress]:
        if layout.checkpoints.scheme != "s3":
            return None
        key = (self.namespace, self.name)
        failed_at = self.storage_failures.get(key)
        if failed_at is not None and time.monotonic() - failed_at < self.settings.progress_retry_seconds:
            return None
        keys = await self.storage_keys(job)
        try:
            store = s3_store(layout.checkpoints, job.spec.storage, keys, attempts=1, clients=self.s3_clients)  # the next cycle retries
            raw = await asyncio.to_thread(store.get_bytes, "progress.json")
        except FileNotFoundError:
            return None  # the trainer has not written it yet
        except Exception as err:  # noqa: BLE001 - storage trouble must not stop reconciliation
            self.storage_failures[key] = time.monotonic()
            self.logger.warning(f"cannot read {layout.progress} (next try in {self.settings.progress_retry_seconds:.0f}s): {type(err).__name__}: {err}")
            return None
        self.storage_failures.pop(key, None)
        try:
            return parse_progress(raw)
        except (ValueError, TypeError) as err:
            self.logger.warning(f"ignoring malformed {layout.progress}: {err}")
            return None

    # -- acting
    async def execute(self, decision: Decision, job: FineTuneJob, observed: Observed) -> None:
        api, ns = self.api, self.namespace
        for action in decision.actions:
            if action is Action.ENSURE_TRAINING_INFRA:
                await self.ensure_config_map(job, started=bool(decision.status.get("startTime")) and self.started)
                if not self.started or await api.get("Service", ns, builders.workers_service_name(self.name)) is None:
                    await api.create(builders.build_worker_service(job))
            elif action is Action.CREATE_WORKERS:
                attempt = decision.status.get("attempt", 0)
                for index in range(job.spec.distributed.nodes):
                    if index not in observed.workers:
                        if await api.create(builders.build_worker_pod(job, index, self.settings, attempt)):
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
                await api.delete("Deployment", ns, builders.serve_name(self.name))
                await api.delete("Service", ns, builders.serve_name(self.name))

    async def ensure_config_map(self, job: FineTuneJob, started: bool) -> None:
        if started and self.config_map is not None:
            return  # the workers' copy of the spec never changes once they started
        wanted = builders.build_config_map(job)
        if self.config_map is None:
            # Not read (a job that never started) or read as absent: create; on 409 read what is there.
            if await self.api.create(wanted) or self.config_map_read or await self.read_config_map() is None:
                return
        if not started and self.config_map.get("data") != wanted["data"]:
            # Spec edited before any worker started: the workers get the new spec.
            await self.api.merge_patch("ConfigMap", self.namespace, wanted["metadata"]["name"], {"data": wanted["data"]})

    async def ensure_serving(self, job: FineTuneJob) -> None:
        wanted = builders.build_serving_deployment(job, self.settings)
        digest = hashlib.sha256(json.dumps(wanted["spec"], sort_keys=True).encode()).hexdigest()[:16]
        wanted["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
        if self.deployment is None:
            await self.api.create(wanted)
        elif (self.deployment["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != digest:
            await self.api.merge_patch("Deployment", self.namespace, wanted["metadata"]["name"],
                                       {"metadata": {"annotations": wanted["metadata"]["annotations"]}, "spec": wanted["spec"]})  # fmt: skip
        if await self.api.get("Service", self.namespace, builders.serve_name(self.name)) is None:
            await self.api.create(builders.build_serving_service(job))


async def storage_keys(api: Kube, job: FineTuneJob, secret: Optional[Callable[[str], Awaitable[Optional[dict]]]] = None) -> dict[str, str]:
    """The job's S3 keys, read from its Secret now (through `secret(name)` if given) and kept in memory only."""
    name = job.spec.storage.credentials_secret
    if not name:
        return {}
    found = await secret(name) if secret is not None else await api.get("Secret", job.metadata.namespace, name)
    data = (found or {}).get("data") or {}
    return {k: base64.b64decode(data[k]).decode() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if k in data}


_BOTO3_SESSION: Any = None


def boto3_session() -> Any:
    """One boto3 session for the operator's S3 clients (built on the event loop thread only)."""
    global _BOTO3_SESSION
    if _BOTO3_SESSION is None:
        import boto3

        _BOTO3_SESSION = boto3.session.Session()
    return _BOTO3_SESSION


def s3_store(root: Uri, storage: specmod.StorageSpec, keys: dict[str, str], attempts: int, clients: Optional[dict] = None) -> S3Store:
    """A store on one of the job's S3 locations with explicit keys (never via os.environ).

    Building a boto3 client costs CPU on the event loop (a new session parses the S3 service
    model again): clients come from one session, and with `clients` (the memo's cache) one
    client per endpoint, region, keys and retry count is reused across runs and jobs. The
    cache key holds a digest of the secret key, not the key; the client itself holds the keys
    in memory, as one built per run did. Keys are always passed explicitly, so the shared
    session's own credential chain is never used for a job that names a Secret."""
    from botocore.config import Config

    key_id, secret_key = keys.get("AWS_ACCESS_KEY_ID"), keys.get("AWS_SECRET_ACCESS_KEY")
    cache_key = (storage.endpoint or "", storage.region or "", key_id or "",
                 hashlib.sha256((secret_key or "").encode()).hexdigest(), attempts)  # fmt: skip
    client = clients.get(cache_key) if clients is not None else None
    if client is None:
        client = boto3_session().client(
            "s3",
            endpoint_url=storage.endpoint or None,
            region_name=storage.region or "us-east-1",
            aws_access_key_id=key_id,
            aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=3, read_timeout=10, s3={"addressing_style": "path"}),
        )
        if clients is not None:
            if len(clients) >= S3_CLIENT_CACHE_LIMIT:
                clients.clear()  # rotated keys leave stale entries behind; start over
            clients[cache_key] = client
    return S3Store(root, client=client)


def status_patch(previous: dict, new: dict) -> dict:
    """Merge patch turning `previous` into `new` (removed keys become null)."""
    patch = {k: v for k, v in new.items() if previous.get(k) != v}
    patch.update({k: None for k in previous if k not in new and k not in STATUS_KEYS_OWNED_BY_KOPF})
    return patch


def duration(status: dict, now: datetime) -> Optional[float]:
    start = status.get("startTime")
    if not start:
        return None
    end = parse_iso(status["completionTime"]) if status.get("completionTime") else now
    return max(0.0, (end - parse_iso(start)).total_seconds())


def job_lock(memo: kopf.Memo, namespace: str, name: str) -> asyncio.Lock:
    """One run at a time per job, whichever trigger started it."""
    return memo["locks"].setdefault((namespace, name), asyncio.Lock())


def last_written_status(memo: kopf.Memo, body: kopf.Body) -> Optional[dict]:
    """The status this operator process last wrote for this very job (same uid), if any.
    The operator is the only writer of a FineTuneJob's status, so this copy is never older
    than the body kopf last watched (which may not show the last write yet)."""
    known = memo["statuses"].get((body.metadata.namespace, body.metadata.name))
    if known is not None and known[0] == body.metadata.uid:
        return known[1]
    return None


async def reconcile(body: kopf.Body, logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    """The one reconciliation, run by every trigger (timer, spec change); one run at a time per job."""
    namespace, name = body.metadata.namespace, body.metadata.name
    async with job_lock(memo, namespace, name):
        if body.metadata.get("deletionTimestamp"):
            return  # being deleted: `cleanup` removes the children; never recreate them
        await reconcile_locked(body, logger, memo)


async def reconcile_locked(body: kopf.Body, logger: logging.Logger, memo: kopf.Memo) -> None:
    api = kube(memo)
    started = time.monotonic()
    try:
        reconciler = Reconciler(api, body, memo["settings"], logger, memo["storage_failures"], memo["plans"],
                                previous=last_written_status(memo, body), s3_clients=memo["s3_clients"], secrets=memo["secrets"])  # fmt: skip
        decision = await reconciler.run()
        patch = status_patch(reconciler.previous, decision.status)
        if patch:
            written = await api.patch_status(reconciler.namespace, reconciler.name, patch)
            key = (reconciler.namespace, reconciler.name)
            if isinstance((written or {}).get("status"), dict):
                memo["statuses"][key] = (body.metadata.uid, written["status"])
            else:
                memo["statuses"].pop(key, None)  # no object in the answer: trust the watched body
    except Exception:
        metrics.RECONCILE_TOTAL.labels("error").inc()
        metrics.RECONCILE_ERRORS.inc()
        raise
    finally:
        metrics.RECONCILE_DURATION.observe(time.monotonic() - started)
    metrics.RECONCILE_TOTAL.labels("ok").inc()
    for event in decision.events:
        kopf.event(body, type=event.type, reason=event.reason, message=short(event.message))
        log = logger.warning if event.type == "Warning" else logger.info
        log(f"{event.reason}: {short(event.message)}")
    metrics.record_job(reconciler.namespace, reconciler.name, decision.status, duration(decision.status, utc_now()))


async def cleanup(body: kopf.Body, logger: logging.Logger, memo: kopf.Memo, **_: Any) -> None:
    """Children go (owner references do it too; explicit deletes make it immediate)."""
    ns, name = body.metadata.namespace, body.metadata.name
    async with job_lock(memo, ns, name):  # a run in progress finishes first; later runs see the deletion
        await cleanup_locked(body, logger, memo)
    memo["locks"].pop((ns, name), None)


async def cleanup_locked(body: kopf.Body, logger: logging.Logger, memo: kopf.Memo) -> None:
    api, ns, name = kube(memo), body.metadata.namespace, body.metadata.name
    for pod in await api.list("Pod", ns, {builders.JOB_LABEL: name}):
        await api.delete("Pod", ns, pod["metadata"]["name"])
    await api.delete("Deployment", ns, builders.serve_name(name))
    for service in (builders.serve_name(name), builders.workers_service_name(name)):
        await api.delete("Service", ns, service)
    await api.delete("ConfigMap", ns, builders.config_map_name(name))
    job, _problems = parse_body(body)
    if job is not None and job.spec.storage.delete_on_job_deletion:
        await delete_checkpoints(api, job, logger)
    metrics.forget_job(ns, name)
    memo["storage_failures"].pop((ns, name), None)
    memo["statuses"].pop((ns, name), None)
    memo["diffbase"].forget(body.metadata.uid)
    for key in [k for k in memo["plans"] if k[:2] == (ns, name)]:
        del memo["plans"][key]
    logger.info("children deleted; outputs kept")


async def delete_checkpoints(api: Kube, job: FineTuneJob, logger: logging.Logger) -> None:
    try:
        layout = job_layout(job)
    except LayoutError:
        return
    if layout.checkpoints.scheme != "s3":
        logger.warning(f"storage.deleteOnJobDeletion: {layout.checkpoints} is not s3://; left in place")
        return
    store = s3_store(layout.checkpoints, job.spec.storage, await storage_keys(api, job), attempts=3)
    await asyncio.to_thread(lambda: store.delete([o.key for o in store.list()]))
    logger.info(f"deleted checkpoints under {layout.checkpoints}")


def build_registry(settings: Settings) -> kopf.OperatorRegistry:
    """All handlers, with the reconcile interval from the settings. Run with memo=new_memo(settings)."""
    # botocore's DEBUG wire log prints SigV4 Authorization headers (with the access key ID of
    # a user's Secret): the operator never logs below INFO there, even with --verbose.
    for noisy in ("botocore", "boto3", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLogger(noisy).level))
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.login(registry=registry)(login)
    kopf.on.cleanup(registry=registry)(close_client)
    # The first run at once when the job is seen (created, or found at operator start), then
    # every interval; a spec change runs it at once too (suspend, serving, edits before start).
    kopf.timer(GROUP, VERSION, PLURAL, interval=settings.reconcile_interval, initial_delay=0, id="reconcile", registry=registry)(reconcile)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="spec-changed", registry=registry)(reconcile)
    kopf.on.delete(GROUP, VERSION, PLURAL, id="cleanup", registry=registry)(cleanup)
    return registry


def new_memo(settings: Settings) -> kopf.Memo:
    return kopf.Memo(settings=settings, kube=None, storage_failures={}, plans={}, locks={}, statuses={}, s3_clients={},
                     secrets=SecretCache(ttl=min(SECRET_TTL_SECONDS, settings.reconcile_interval)),
                     diffbase=MemoryDiffBaseStorage())  # fmt: skip
