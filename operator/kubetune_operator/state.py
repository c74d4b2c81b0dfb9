"""What the operator process keeps in memory, in one typed object with one owner.

`OperatorState` is kopf's memo (kopf passes it to every handler; `__copy__` returns the
same object, so every job's handlers share it): the settings, the API client once logged
in, the metrics, the caches shared by all jobs (Secrets, S3 clients, kopf's diff base) and
one `JobRecord` per job. Nothing here outlives the process: after a restart every job is
reconciled from its live state.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import kopf

from kubetune.api.crd import FineTuneJobStatus
from kubetune.artifacts.storage import S3Clients

from .kube import Kube
from .metrics import OperatorMetrics
from .settings import Settings

JobKey = tuple[str, str]  # (namespace, name)

# A Secret read serves every run (of any job naming it) for this long, at most one interval.
SECRET_TTL_SECONDS = 5.0


@dataclass(frozen=True)
class WrittenStatus:
    """A status this operator process wrote: for the job with `uid`, decided on the job's
    version `based_on`, producing version `written` (the object as the API answered)."""

    uid: str
    based_on: str
    written: str
    status: dict


@dataclass
class JobRecord:
    """What the operator remembers of one job between runs."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one run at a time, whichever trigger
    written: Optional[WrittenStatus] = None  # the last status write, until the watch delivers it
    refusal: Optional[str] = None  # the last 403 reported as an Event (reported once per message)
    storage_failed_at: Optional[float] = None  # monotonic time of the last failed progress.json read
    plan: Optional[tuple[Optional[int], Optional[tuple[bool, str]]]] = None  # (generation, memory verdict)
    status: Optional[FineTuneJobStatus] = None  # the last decided status: what the job metrics show


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


class OperatorState:
    """The operator's memory: kopf's memo for every handler (see the module docstring)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.kube: Optional[Kube] = None  # set by the first login
        self.jobs: dict[JobKey, JobRecord] = {}
        self.secrets = SecretCache(ttl=min(SECRET_TTL_SECONDS, settings.reconcile_interval))
        self.s3 = S3Clients()
        self.diffbase = MemoryDiffBaseStorage()
        self.metrics = OperatorMetrics(self.job_statuses)

    def __copy__(self) -> "OperatorState":
        return self  # kopf copies the memo per job: every job shares this one

    def api(self) -> Kube:
        if self.kube is None:
            raise kopf.TemporaryError("not logged in to the Kubernetes API yet", delay=1)
        return self.kube

    def job(self, key: JobKey) -> JobRecord:
        return self.jobs.setdefault(key, JobRecord())

    def forget(self, key: JobKey, uid: Optional[str]) -> None:
        """A deleted job: its record (and with it its metrics series) and kopf's diff base."""
        self.jobs.pop(key, None)
        self.diffbase.forget(uid)

    def job_statuses(self) -> Iterator[tuple[JobKey, FineTuneJobStatus]]:
        """The last decided status of every job (read by the metrics at scrape time, from the
        metrics server's thread: a snapshot of the dict, never the dict while it changes)."""
        for key, record in list(self.jobs.items()):
            if record.status is not None:
                yield key, record.status
