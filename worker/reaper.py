"""Requeues jobs whose worker stopped heartbeating (lease expired), up to the attempts cap; re-sends the wake-up
of jobs that have waited in `queued` longer than a lease (a lost broker message must not strand a job)."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import select, update

from api.core.context import ServiceContext
from api.core.db import utcnow
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
            select(Job.id, Job.lease_token, Job.attempts, Job.max_attempts, Job.lease_owner, Job.gpu_class,
                   Job.cancel_requested)
            .where(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)).all()
        for job_id, token, attempts, max_attempts, owner, gpu_class, cancel in expired:
            exhausted = attempts >= max_attempts
            values = dict(lease_owner=None, lease_token=None, lease_expires_at=None, updated_at=now)
            if cancel:  # an accepted cancel ends the job cancelled, whatever happened to its worker
                values |= dict(status=JobStatus.CANCELLED.value, finished_at=now)
            elif exhausted:
                reason = (f"worker lost: the lease of {owner} expired on attempt {attempts} of {max_attempts}; "
                          "retry the job to resume from its last checkpoint")
                values |= dict(status=JobStatus.FAILED.value, error=reason, finished_at=now)
            else:
                values |= dict(status=JobStatus.QUEUED.value)
            changed = session.execute(
                update(Job).where(Job.id == job_id, Job.lease_token == token, Job.status == JobStatus.RUNNING.value)
                .values(**values)).rowcount
            if not changed:
                continue
            if cancel:
                add_event(session, job_id, "cancelled", f"the lease of {owner} expired while a cancel was pending")
            elif exhausted:
                add_event(session, job_id, "failed", values["error"])
            else:
                add_event(session, job_id, "requeued", f"lease of {owner} expired; requeued (attempt {attempts} of "
                                                       f"{max_attempts} used)")
                requeued.append((job_id, gpu_class))
        stale = session.execute(
            select(Job.id, Job.gpu_class).where(
                Job.status == JobStatus.QUEUED.value,
                Job.updated_at < now - timedelta(seconds=ctx.settings.LEASE_SECONDS))).all()
        for job_id, gpu_class in stale:
            session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                            .values(updated_at=now))
            requeued.append((job_id, gpu_class))
        session.commit()
    for job_id, gpu_class in requeued:
        ctx.dispatcher.enqueue(job_id, gpu_class)
        log.info("job %s: requeued on %s", job_id, gpu_class)
    return [job_id for job_id, _ in requeued]


class ReaperThread(threading.Thread):
    def __init__(self, ctx: ServiceContext, stop: threading.Event) -> None:
        super().__init__(name="reaper", daemon=True)
        self.ctx, self.stop = ctx, stop

    def run(self) -> None:
        while not self.stop.wait(self.ctx.settings.REAPER_SECONDS):
            try:
                reap_expired(self.ctx)
                purge_deleted(self.ctx)
            except Exception as exc:  # keep reaping after a database outage
                log.warning("reaper: %s", exc)
