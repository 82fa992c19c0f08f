"""What a team holds in the shared pool: running and queued jobs, and bytes kept in the store (datasets, artifacts,
block checkpoints) against its storage quota."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..core.config import Settings
from ..core.errors import Conflict, PayloadTooLarge
from ..models import Artifact, BlockCheckpoint, Dataset, Job, JobStatus, Team


@dataclass(frozen=True)
class TeamUsage:
    running: int
    queued: int
    stored_bytes: int
    quota_bytes: int | None  # None: no quota


def _used(stored_bytes: int, quota: int) -> str:
    return f"{stored_bytes / 1e9:.3f} GB of {quota / 1e9:g} GB used"


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

    def team_usage(self, session: Session, settings: Settings, *, team: Team) -> TeamUsage:
        counts = dict(session.execute(select(Job.status, func.count()).where(
            Job.team_id == team.id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
            .group_by(Job.status)).all())
        return TeamUsage(counts.get(JobStatus.RUNNING.value, 0), counts.get(JobStatus.QUEUED.value, 0),
                         self.stored_bytes(session, team.id), quota_bytes(settings, team))

    def check_upload(self, session: Session, settings: Settings, *, team: Team, size: int) -> None:
        """413 when `size` more bytes would not fit the team's quota."""
        quota = quota_bytes(settings, team)
        if quota is None:
            return
        stored = self.stored_bytes(session, team.id)
        if stored + size > quota:
            raise PayloadTooLarge(f"team {team.name}'s storage quota is full: {_used(stored, quota)}, the upload has "
                                  f"{size} bytes; delete jobs or datasets you no longer need (DELETE /v1/jobs/ID, "
                                  "DELETE /v1/datasets/ID)")

    def check_submit(self, session: Session, settings: Settings, *, team: Team) -> None:
        """409 when the team's quota is used up: the job's checkpoints and artifact would not fit."""
        quota = quota_bytes(settings, team)
        if quota is None:
            return
        stored = self.stored_bytes(session, team.id)
        if stored >= quota:
            raise Conflict(f"team {team.name}'s storage quota is full ({_used(stored, quota)}); delete jobs or "
                           "datasets you no longer need (DELETE /v1/jobs/ID, DELETE /v1/datasets/ID) before submitting")


usage_service = UsageService()
