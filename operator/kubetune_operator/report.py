"""Report a decision: its status patch, its Events, and calls the API server refused.

Status is one merge patch through the status subresource, none when nothing changed,
applied only to the version of the job it was decided on, or to a newer one that changed
only its metadata (kopf's finalizer, labels); a version that moved on in spec or status
answers 409 and is decided on again. The status the operator last wrote is kept in memory
until the watch delivers it (`status_base`). A call the API server refuses (403: RBAC, Pod
Security admission) is named in the log and once as a Warning Event on the job.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from typing import Callable, Optional

import kopf

from .kube import ApiError, Conflict, Kube
from .metrics import OperatorMetrics
from .state import JobRecord, WrittenStatus
from .status import Event

# kopf's finalizer on every job it handles (the delete handler's cleanup runs before the job goes).
FINALIZER = "kubetune.io/cleanup"
# Status keys kopf keeps for itself (the CRD's schema prunes them; never ours to patch).
STATUS_KEYS_OWNED_BY_KOPF = ("kopf",)
EVENT_MESSAGE_LIMIT = 1000
# A status write that meets a newer version of the job (409) is decided again on that version,
# once the watch delivers it (waited for this long), at most this many times per run.
STATUS_WRITE_ATTEMPTS = 5
NEWER_VERSION_WAIT_SECONDS = 2.0

# Lines that must not become Events (kopf posts its per-job logger's warnings as Events).
log = logging.getLogger(__name__)


def short(message: str) -> str:
    if len(message) <= EVENT_MESSAGE_LIMIT:
        return message
    half = EVENT_MESSAGE_LIMIT // 2
    return message[:half] + " ... " + message[-half:]


def own_status(status: Optional[dict]) -> dict:
    return {k: v for k, v in (status or {}).items() if k not in STATUS_KEYS_OWNED_BY_KOPF}


def status_base(record: JobRecord, body: kopf.Body) -> tuple[dict, Optional[str]]:
    """The status a run starts from and the resourceVersion its write applies to.

    Until the watch delivers the operator's own last status write, kopf still holds the version
    that write was decided on: the run starts from the written status and version. Any other
    version kopf holds is that write or newer (watch events arrive in order), so its own status
    and version are the truth, whoever wrote them."""
    known, version = record.written, body.metadata.get("resourceVersion")
    if known is not None and known.uid == body.metadata.uid and known.based_on == version:
        return copy.deepcopy(own_status(known.status)), known.written
    return copy.deepcopy(own_status(body.get("status"))), version


def status_patch(previous: dict, new: dict) -> dict:
    """Merge patch turning `previous` into `new` (removed keys become null)."""
    patch = {k: v for k, v in new.items() if previous.get(k) != v}
    patch.update({k: None for k in previous if k not in new})
    return patch


def same_basis(decided_on: kopf.Body, previous: dict, newer: kopf.Body) -> bool:
    """Whether a newer version of the job changed nothing a decision rests on: the same job
    (uid), the same spec (generation) and the status the decision started from. Such versions
    differ only in metadata: kopf's finalizer, labels, annotations."""
    return (newer.metadata.uid == decided_on.metadata.uid and newer.metadata.get("generation") == decided_on.metadata.get("generation")
            and own_status(newer.get("status")) == previous)  # fmt: skip


async def live_change(live_body: kopf.Body, done: Callable[[kopf.Body], bool], timeout: float) -> bool:
    """Wait until kopf's live body of the job (updated in place by its watch) satisfies `done`."""
    deadline = time.monotonic() + timeout
    while not done(live_body):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


class StatusWriter:
    """Writes one run's status patch to the right version of the job (see the module docstring)."""

    def __init__(self, api: Kube, metrics: OperatorMetrics, live_body: kopf.Body, wait_for_newer: bool):
        self.api = api
        self.metrics = metrics
        self.live_body = live_body  # kopf's body, updated in place as watch events arrive
        self.wait_for_newer = wait_for_newer

    async def write(self, body: kopf.Body, previous: dict, patch: dict, version: Optional[str]) -> Optional[tuple[str, dict]]:
        """Write a patch decided on `body` (whose status was `previous`) to `version` of the job,
        or to a newer version on the same basis (`same_basis`); returns (the version written
        to, the object as written). None when the job moved on in spec or status (or, without
        `wait_for_newer`, when the version written to met 409): that needs a new decision."""
        if self.wait_for_newer and FINALIZER not in (body.metadata.get("finalizers") or []):
            # A job just seen gets kopf's finalizer (a patch: a new version) while its first run
            # creates the children; its first status goes to that version rather than meet 409.
            await live_change(self.live_body, lambda b: FINALIZER in (b.metadata.get("finalizers") or []), NEWER_VERSION_WAIT_SECONDS)
        for attempt in range(1, STATUS_WRITE_ATTEMPTS + 1):
            newer = kopf.Body(copy.deepcopy(dict(self.live_body)))
            if newer.metadata.get("resourceVersion") != body.metadata.get("resourceVersion"):
                if not same_basis(body, previous, newer):
                    return None
                version = newer.metadata.get("resourceVersion")
            try:
                return version, await self.api.patch_status(body.metadata.namespace, body.metadata.name, patch, resource_version=version)
            except Conflict:
                if not await self.conflicted(body, version, last=attempt == STATUS_WRITE_ATTEMPTS):
                    return None
        return None

    async def conflicted(self, body: kopf.Body, version: Optional[str], last: bool) -> bool:
        """After a 409: whether to try again (a newer version arrived in time)."""
        self.metrics.status_conflicts.inc()
        again = self.wait_for_newer and not last and await live_change(
            self.live_body, lambda b: b.metadata.get("resourceVersion") not in (version, body.metadata.get("resourceVersion")),
            NEWER_VERSION_WAIT_SECONDS)  # fmt: skip
        log.info(f"{body.metadata.namespace}/{body.metadata.name}: status not written, the job changed after resourceVersion {version}"
                 + ("" if again else "; the next run decides on the newer version"))  # fmt: skip
        return again


def written_status(body: kopf.Body, version: str, written: dict) -> Optional[WrittenStatus]:
    """What to remember of a status write; None when the answer holds no status (then the
    watched body is the truth)."""
    status = written.get("status")
    return WrittenStatus(body.metadata.uid, version, written["metadata"]["resourceVersion"], status) if isinstance(status, dict) else None


def post_events(body: kopf.Body, events: list[Event], logger: logging.Logger | logging.LoggerAdapter) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=short(event.message))
        log_event = logger.warning if event.type == "Warning" else logger.info
        log_event(f"{event.reason}: {short(event.message)}")


def report_refusal(record: JobRecord, body: kopf.Body, err: ApiError) -> None:
    """A call the API server refused with 403 (RBAC, Pod Security admission, a quota): the
    operator's log says which call on every run, a Warning Event on the job says it once per
    message. The next run tries again: a granted permission or fixed policy needs no restart."""
    message = f"the API server refused to {err.verb} {err.resource} in namespace {err.namespace}: {err.message}"
    log.error(f"{body.metadata.namespace}/{body.metadata.name}: {message}")
    if record.refusal != message:
        record.refusal = message
        kopf.event(body, type="Warning", reason="Forbidden", message=short(message))
