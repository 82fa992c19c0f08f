"""Requeues jobs whose worker stopped heartbeating (lease expired), up to the attempts cap; wakes a GPU class whose
broker queue is empty while jobs of it are queued (a lost broker message must not strand a job)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import func, select

from api.core.context import ServiceContext
from api.core.db import utcnow
from api.jobs import states
from api.jobs.service import add_event
from api.models import Job, JobStatus

from .retention import purge_deleted

log = logging.getLogger(__name__)


def reap_expired(ctx: ServiceContext) -> list[str]:
    """Returns the ids of the jobs put back in the queue."""
    requeued: list[tuple[str, str]] = []
    now = utcnow()
    with ctx.session() as session:
        expired = session.execute(
            select(Job.id, Job.lease_token, Job.attempts, Job.max_attempts, Job.lease_owner, Job.gpu_class)
            .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)).all()
        for job_id, token, attempts, max_attempts, owner, gpu_class in expired:
            reason = (f"worker lost: the lease of {owner} expired on attempt {attempts} of {max_attempts}; "
                      "retry the job to resume from its last checkpoint")
            status = states.expire(session, job_id, token, now, reason)
            if status == JobStatus.CANCELLED.value:  # an accepted cancel ends the job cancelled, whatever happened
                add_event(session, job_id, "cancelled", f"the lease of {owner} expired while a cancel was pending")
            elif status == JobStatus.FAILED.value:
                add_event(session, job_id, "failed", reason)
            elif status == JobStatus.QUEUED.value:
                add_event(session, job_id, "requeued", f"lease of {owner} expired; requeued (attempt {attempts} of "
                                                       f"{max_attempts} used)")
                requeued.append((job_id, gpu_class))
        session.commit()
    for job_id, gpu_class in requeued:
        ctx.dispatcher.enqueue(job_id, gpu_class)
        log.info("job %s: requeued on %s", job_id, gpu_class)
    return [job_id for job_id, _ in requeued]


def wake_stranded(ctx: ServiceContext, woken: dict[str, tuple]) -> list[str]:
    """One wake-up for each GPU class whose broker queue is empty while jobs of it are queued (Redis lost its
    messages, or they were spent while a team was at its cap), and none again until the class's queued jobs change
    (`woken`, kept by the caller between rounds: class -> the queued jobs' count and latest update when woken).
    A job queued less than a reaper period ago is left out: its submitter's wake-up may still be on its way.
    Workers polling the database need none. Returns the classes woken."""
    settled = utcnow() - timedelta(seconds=ctx.settings.REAPER_SECONDS)
    with ctx.session() as session:
        queued = session.execute(
            select(Job.gpu_class, func.count(), func.max(Job.updated_at), func.min(Job.id))
            .where(Job.status == JobStatus.QUEUED.value, Job.updated_at <= settled).group_by(Job.gpu_class)).all()
    sent = []
    for gpu_class, count, changed_at, job_id in queued:
        if woken.get(gpu_class) == (count, changed_at) or ctx.dispatcher.waiting(gpu_class) != 0:
            continue
        ctx.dispatcher.enqueue(job_id, gpu_class)
        woken[gpu_class] = (count, changed_at)
        sent.append(gpu_class)
        log.info("%s: %d job(s) queued and no wake-up in the broker's queue; sent one", gpu_class, count)
    return sent


class ReaperThread(threading.Thread):
    def __init__(self, ctx: ServiceContext, stop: threading.Event) -> None:
        super().__init__(name="reaper", daemon=True)
        self.ctx, self.stop = ctx, stop
        self.woken: dict[str, tuple] = {}

    def run(self) -> None:
        while not self.stop.wait(self.ctx.settings.REAPER_SECONDS):
            try:
                reap_expired(self.ctx)
                purge_deleted(self.ctx)
                wake_stranded(self.ctx, self.woken)  # last: an unreachable broker holds up nothing else
            except Exception as exc:  # keep reaping after a database outage
                log.warning("reaper: %s", exc)
