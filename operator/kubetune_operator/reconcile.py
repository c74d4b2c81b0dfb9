"""One reconciliation of one job, and its cleanup on deletion.

    observe (observe.py) -> decide (status.py, pure) -> act (act.py) -> report (report.py)

Every trigger (the timer, a spec change) runs `reconcile`, one run at a time per job. The
run decides on a snapshot of the job (kopf updates its body in place as watch events arrive)
and writes the status to that version of the job, or to a newer one that changed only its
metadata; a job that moved on in spec or status is observed and decided on again. A lost
watch event, a deleted child or an operator restart is therefore repaired by the next run.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import kopf

from .act import Actor, delete_checkpoints, delete_children
from .kube import ApiError
from .observe import Observer, job_from_body, read_storage_keys, status_from_document
from .report import STATUS_WRITE_ATTEMPTS, StatusWriter, post_events, report_refusal, status_base, status_patch, written_status
from .state import JobKey, JobRecord, OperatorState
from .status import Decision, decide, utc_now

Logger = logging.Logger | logging.LoggerAdapter
# Lines that must not become Events (kopf posts its per-job logger's warnings as Events).
log = logging.getLogger(__name__)


def job_key(body: kopf.Body) -> JobKey:
    return body.metadata.namespace, body.metadata.name


async def reconcile(state: OperatorState, live_body: kopf.Body, logger: Logger, wait_for_newer: bool) -> None:
    """The one reconciliation, run by every trigger; one run at a time per job. With
    `wait_for_newer`, a status write that meets a newer version waits for the watch to
    deliver it and decides again (a spec-change handler cannot: kopf delivers the job's next
    versions only after it returns, so its conflicts are left to the timer)."""
    record = state.job(job_key(live_body))
    async with record.lock:
        if live_body.metadata.get("deletionTimestamp"):
            return  # being deleted: `cleanup` removes the children; never recreate them
        writer = StatusWriter(state.api(), state.metrics, live_body, wait_for_newer)
        with state.metrics.reconcile_duration.time():
            try:
                done = await decide_and_write(state, record, writer, logger)
            except ApiError as err:
                state.metrics.run_failed()
                if err.status != 403:
                    raise
                report_refusal(record, live_body, err)
                return
            except Exception:
                state.metrics.run_failed()
                raise
        if done is None:
            return  # status not written: the next run decides on the newer version
        decision, body = done
        state.metrics.run_ok()
        record.refusal = None
        post_events(body, decision.events, logger)
        record.status = decision.status


async def decide_and_write(state: OperatorState, record: JobRecord, writer: StatusWriter, logger: Logger) -> Optional[tuple[Decision, kopf.Body]]:
    """Observe, decide, act and write the status; returns the decision and the version of the
    job it was decided on, or None when its status could not be written to that job."""
    key = job_key(writer.live_body)
    for attempt in range(1, STATUS_WRITE_ATTEMPTS + 1):
        body = kopf.Body(copy.deepcopy(dict(writer.live_body)))
        previous_document, version = status_base(record, body)
        previous = status_from_document(previous_document)
        seen = await Observer(state, record, body, previous, logger).observe()
        decision = decide(seen.job, seen.observed, seen.progress, previous, utc_now(), seen.layout, body.metadata.get("generation"))
        if seen.job is not None:
            await Actor(writer.api, seen, state.settings, logger).act(decision, seen.job)
        patch = status_patch(previous.document(), decision.status.document())
        if not patch:
            return decision, body
        result = await writer.write(body, previous_document, patch, version)
        if result is not None:
            record.written = written_status(body, *result)
            return decision, body
        record.written = None
        if not (writer.wait_for_newer and attempt < STATUS_WRITE_ATTEMPTS):
            return None
        log.info(f"{key[0]}/{key[1]}: the job changed in spec or status since resourceVersion {version}; deciding again")
    return None


async def cleanup(state: OperatorState, body: kopf.Body, logger: Logger) -> None:
    """A job being deleted: its children go at once (owner references would take them too),
    its checkpoints with storage.deleteOnJobDeletion; outputs stay. A run in progress finishes
    first; later runs see the deletion."""
    key, api = job_key(body), state.api()
    async with state.job(key).lock:
        await delete_children(api, *key)
        job, _problems = job_from_body(body)
        if job is not None and job.spec.storage.delete_on_job_deletion:
            keys = await read_storage_keys(job, lambda name: api.get("Secret", key[0], name))
            await delete_checkpoints(state.s3, job, keys, logger)
        state.forget(key, body.metadata.uid)
    logger.info("children deleted; outputs kept")
