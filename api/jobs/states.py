"""The job state machine. Every change of a job's status (and its deletion) is one conditional UPDATE here, whose
WHERE clause is the transition's precondition: racing requests (retry and delete, cancel and publish, a reaper and a
late worker) are serialised by the database on the job's row (a Postgres row lock, SQLite's single writer), and the
later one re-checks its condition on the row the earlier one left, so no stale read decides a transition.

    queued              -> running       claim (worker), not deleted
    queued              -> cancelled     cancel; delete
    running             -> running       cancel requested (not while publishing); stage publishing (no cancel
                                         requested, fenced by the lease token)
    running             -> succeeded, failed, cancelled   the worker's end, fenced by the lease token
    running             -> queued, failed, cancelled      expire: the lease ran out (requeued only while neither a
                                                          cancel is pending nor the job deleted, and attempts are left)
    failed, cancelled   -> queued        retry, not deleted
    not deleted         -> deleted       delete (a queued job is cancelled, a running one asked to stop), not while
                                         publishing

Each function returns whether the row changed (delete and expire: the status the row has now, None if unchanged),
in the caller's transaction: the caller adds its event and commits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, not_, or_, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from ..core.db import utcnow
from ..models import Job, JobStatus

QUEUED, RUNNING, FAILED, CANCELLED = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.FAILED.value,
                                    JobStatus.CANCELLED.value)
RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)
PUBLISHING = "publishing"  # the stage after the library returned: uploading the artifact; a cancel is refused
DONE = "done"  # the stage of a succeeded job

NOT_DELETED = Job.deleted_at.is_(None)
NO_CANCEL = Job.cancel_requested.is_(False)
IS_QUEUED = Job.status == QUEUED
PUBLISHING_NOW = and_(Job.status == RUNNING, func.coalesce(Job.stage, "") == PUBLISHING)


def _update(session: Session, job_id: str, *where: ColumnElement[bool], **values: Any) -> bool:
    return bool(session.execute(
        update(Job).where(Job.id == job_id, *where).values(updated_at=utcnow(), **values)).rowcount)


def _held(token: str) -> tuple[ColumnElement[bool], ...]:
    """The job is running under the lease `token`."""
    return Job.lease_token == token, Job.status == RUNNING


def fenced(session: Session, job_id: str, token: str, *where: ColumnElement[bool], **values: Any) -> bool:
    """Changes the job only while the lease `token` holds it and `where` holds too (`worker/lease.py::fence`)."""
    return _update(session, job_id, *_held(token), *where, **values)


def claim(session: Session, job_id: str, **values: Any) -> bool:
    """queued -> running, with the lease `values` (owner, token, expiry)."""
    return _update(session, job_id, IS_QUEUED, NOT_DELETED, status=RUNNING, **values)


def cancel(session: Session, job_id: str) -> bool:
    """A queued job is cancelled at once; a running one not yet publishing is asked to stop (the worker ends it
    `cancelled`). The converse of `enter_publishing`. False when already asked, publishing, ended or deleted."""
    return _update(session, job_id, NOT_DELETED, or_(IS_QUEUED, and_(Job.status == RUNNING, NO_CANCEL,
                                                                     not_(PUBLISHING_NOW))),
                   status=case((IS_QUEUED, CANCELLED), else_=Job.status),
                   finished_at=case((IS_QUEUED, utcnow()), else_=Job.finished_at), cancel_requested=True)


def retry(session: Session, job_id: str) -> bool:
    """failed or cancelled -> queued, with a fresh attempts count; never a deleted job."""
    return _update(session, job_id, Job.status.in_([s.value for s in RETRYABLE]), NOT_DELETED,
                   status=QUEUED, attempts=0, cancel_requested=False, error=None, lease_owner=None, lease_token=None,
                   lease_expires_at=None, finished_at=None, stage=None)


def delete(session: Session, job_id: str) -> str | None:
    """Marks the job deleted in the same UPDATE that stops it: a queued job ends `cancelled`, a running one is asked
    to stop. Returns the status it has now, None if it was already deleted or is publishing."""
    now = utcnow()
    return session.execute(
        update(Job).where(Job.id == job_id, NOT_DELETED, not_(PUBLISHING_NOW))
        .values(deleted_at=now, updated_at=now, status=case((IS_QUEUED, CANCELLED), else_=Job.status),
                finished_at=case((IS_QUEUED, now), else_=Job.finished_at),
                cancel_requested=or_(Job.cancel_requested, Job.status.in_([QUEUED, RUNNING])))
        .returning(Job.status)).scalar_one_or_none()


def enter_publishing(session: Session, job_id: str, token: str) -> bool:
    """Stage "publishing", only while this lease holds the job and no cancel was requested."""
    return fenced(session, job_id, token, NO_CANCEL, stage=PUBLISHING)


def finish(session: Session, job_id: str, token: str, status: JobStatus, **values: Any) -> bool:
    """running -> succeeded, failed or cancelled by the worker holding the lease `token`; releases the lease."""
    assert status.terminal, status
    return fenced(session, job_id, token, status=status.value, finished_at=utcnow(), lease_token=None,
                  lease_expires_at=None, **values)


def expire(session: Session, job_id: str, token: str, now: datetime, exhausted_error: str) -> str | None:
    """The lease `token` ran out: an accepted cancel (or a deletion) ends the job `cancelled`, a job without attempts
    left `failed` with `exhausted_error`, any other is requeued. Returns the new status, None if the lease had
    changed hands meanwhile."""
    stop = or_(Job.cancel_requested, Job.deleted_at.is_not(None))
    exhausted = Job.attempts >= Job.max_attempts
    ended = or_(stop, exhausted)
    return session.execute(
        update(Job).where(Job.id == job_id, *_held(token), Job.lease_expires_at < now)
        .values(updated_at=now, lease_owner=None, lease_token=None, lease_expires_at=None,
                status=case((stop, CANCELLED), (exhausted, FAILED), else_=QUEUED),
                error=case((and_(not_(stop), exhausted), exhausted_error), else_=Job.error),
                finished_at=case((ended, now), else_=Job.finished_at))
        .returning(Job.status)).scalar_one_or_none()
