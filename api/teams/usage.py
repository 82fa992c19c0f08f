"""What a team holds in the shared pool: running and queued jobs, and bytes kept in the store (datasets, artifacts,
block checkpoints) or reserved by its queued and running jobs, against its storage quota; its submission limits.

Every check that admits bytes or a job runs in the transaction that records them, after `lock_team`: concurrent
uploads and submissions of a team are checked one after another (Postgres queues them on the team row; SQLite
serialises writers), so that together they never pass a limit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from wkvq_core.calib.estimate import format_bytes

from ..core.config import Settings
from ..core.db import utcnow
from ..core.errors import Conflict, PayloadTooLarge, TooManyRequests
from ..models import Artifact, BlockCheckpoint, Dataset, Job, JobStatus, Team

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
QUEUE_FULL_RETRY_SECONDS = 60  # Retry-After when the team's queue is full: no one knows when a job will start


@dataclass(frozen=True)
class TeamUsage:
    running: int
    queued: int
    stored_bytes: int
    quota_bytes: int | None  # None: no quota


def _used(stored_bytes: int, reserved_bytes: int, quota: int) -> str:
    return (f"{format_bytes(stored_bytes)} used and {format_bytes(reserved_bytes)} reserved by queued and running "
            f"jobs, of a {format_bytes(quota)} quota")


def lock_team(session: Session, team: Team) -> None:
    """Serialises the team's admissions until the transaction ends (see the module's docstring)."""
    session.execute(update(Team).where(Team.id == team.id).values(id=Team.id))


def queued_limit(settings: Settings, team: Team) -> int | None:
    return team.max_queued or settings.TEAM_MAX_QUEUED


def per_minute_limit(settings: Settings, team: Team) -> int | None:
    return team.max_submissions_per_minute or settings.TEAM_SUBMISSIONS_PER_MINUTE


def quota_bytes(settings: Settings, team: Team) -> int | None:
    if team.storage_quota_bytes is not None:
        return team.storage_quota_bytes
    return None if settings.TEAM_STORAGE_QUOTA_GB is None else round(settings.TEAM_STORAGE_QUOTA_GB * 1e9)


class UsageService:
    def stored_bytes(self, session: Session, team_id: str) -> int:
        of_team = select(Job.id).where(Job.team_id == team_id).scalar_subquery()
        return sum(int(session.scalar(statement) or 0) for statement in (
            select(func.sum(Dataset.size)).where(Dataset.team_id == team_id),
            select(func.sum(Artifact.size)).where(Artifact.job_id.in_(of_team)),
            select(func.sum(BlockCheckpoint.size)).where(BlockCheckpoint.job_id.in_(of_team))))

    def reserved_bytes(self, session: Session, team_id: str) -> int:
        """What the team's queued and running jobs reserved at submit, less what each already stores."""
        reserved = dict(session.execute(select(Job.id, Job.reserved_bytes).where(
            Job.team_id == team_id, Job.status.in_(ACTIVE), Job.reserved_bytes > 0)).all())
        return self._unstored(session, reserved)

    def _unstored(self, session: Session, reserved: dict[str, int]) -> int:
        """The part of each job's reservation ({job id: bytes}) that its stored objects do not yet take."""
        stored: dict[str, int] = {}
        for model in (Artifact, BlockCheckpoint):
            for job_id, size in session.execute(select(model.job_id, func.sum(model.size))
                                                .where(model.job_id.in_(reserved)).group_by(model.job_id)):
                stored[job_id] = stored.get(job_id, 0) + int(size or 0)
        return sum(max(size - stored.get(job_id, 0), 0) for job_id, size in reserved.items())

    def team_usage(self, session: Session, settings: Settings, *, team: Team) -> TeamUsage:
        counts = dict(session.execute(select(Job.status, func.count()).where(
            Job.team_id == team.id, Job.status.in_(ACTIVE)).group_by(Job.status)).all())
        return TeamUsage(counts.get(JobStatus.RUNNING.value, 0), counts.get(JobStatus.QUEUED.value, 0),
                         self.stored_bytes(session, team.id), quota_bytes(settings, team))

    def _over_quota(self, session: Session, settings: Settings, team: Team, size: int) -> str | None:
        """Why `size` more bytes do not fit the team's quota (None: they fit)."""
        quota = quota_bytes(settings, team)
        if quota is None:
            return None
        stored, reserved = self.stored_bytes(session, team.id), self.reserved_bytes(session, team.id)
        if stored + reserved + size <= quota:
            return None
        return f"team {team.name}'s storage quota is full: {_used(stored, reserved, quota)}"

    def check_upload(self, session: Session, settings: Settings, *, team: Team, size: int, lock: bool = True) -> None:
        """413 when `size` more bytes would not fit the team's quota. Locks the team (`lock_team`) unless told not
        to (a first check, before the upload is stored)."""
        if lock:
            lock_team(session, team)
        if (over := self._over_quota(session, settings, team, size)) is not None:
            raise PayloadTooLarge(f"{over}, the upload has {size} bytes; delete jobs or datasets you no longer need "
                                  "(DELETE /v1/jobs/ID, DELETE /v1/datasets/ID)")

    def check_submit(self, session: Session, settings: Settings, *, team: Team, reserve: int) -> None:
        """429 (with Retry-After) past the team's queued-job or per-minute submission limit; 409 when the job's
        checkpoints and artifact (`reserve` bytes, estimated) would not fit the quota. Locks the team."""
        lock_team(session, team)
        per_minute = per_minute_limit(settings, team)
        if per_minute is not None:
            since = utcnow() - timedelta(minutes=1)
            recent = session.execute(select(func.count(), func.min(Job.created_at)).where(
                Job.team_id == team.id, Job.created_at > since)).one()
            if recent[0] >= per_minute:
                wait = math.ceil((recent[1] - since).total_seconds())
                raise TooManyRequests(f"team {team.name} submitted {recent[0]} jobs in the last minute, its limit "
                                      f"is {per_minute}; try again in {wait} s", retry_after=max(wait, 1))
        self._admit(session, settings, team, reserve)

    def check_retry(self, session: Session, settings: Settings, *, team: Team, job: Job) -> None:
        """A failed or cancelled job about to be retried queues and reserves again: the checks of `check_submit` but
        the per-minute limit, for its reservation less what its kept checkpoints already take. Locks the team."""
        lock_team(session, team)
        self._admit(session, settings, team, self._unstored(session, {job.id: job.reserved_bytes}))

    def _admit(self, session: Session, settings: Settings, team: Team, reserve: int) -> None:
        """429 past the team's queued-job limit, 409 when `reserve` more bytes would not fit the quota."""
        queued_cap = queued_limit(settings, team)
        if queued_cap is not None:
            queued = session.scalar(select(func.count()).select_from(Job).where(
                Job.team_id == team.id, Job.status == JobStatus.QUEUED.value))
            if queued >= queued_cap:
                raise TooManyRequests(f"team {team.name} has {queued} jobs queued, its limit is {queued_cap}; queue "
                                      "more once some have started", retry_after=QUEUE_FULL_RETRY_SECONDS)
        if (over := self._over_quota(session, settings, team, reserve)) is not None:
            raise Conflict(f"{over}; this job reserves {format_bytes(reserve)} for its checkpoints and artifact. "
                           "Delete jobs or datasets you no longer need (DELETE /v1/jobs/ID, DELETE /v1/datasets/ID) "
                           "first")


usage_service = UsageService()
