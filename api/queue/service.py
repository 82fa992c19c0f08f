"""What the queue looks like now: queued/running jobs per GPU class and the workers that are online."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..core.config import Settings
from ..core.db import utcnow
from ..models import Job, JobStatus, Team, Worker

ONLINE_HEARTBEATS = 3  # a worker is online while it announced itself within this many heartbeat intervals
ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


@dataclass(frozen=True)
class ClassLoad:
    gpu_class: str
    queued: int
    running: int
    workers: int  # online workers taking this class


@dataclass(frozen=True)
class OnlineWorker:
    id: str
    gpu_classes: list[str]
    device: str
    last_seen_at: datetime
    busy: bool
    job_id: str | None  # the current job, only when it belongs to the asking team


@dataclass(frozen=True)
class TeamShare:
    team: str
    weight: float
    max_running: int | None
    running: int
    queued: int
    share: float  # of all running jobs
    fair_share: float  # of the pool its weight gives it among the teams with jobs


@dataclass(frozen=True)
class QueueSummary:
    classes: list[ClassLoad]
    workers: list[OnlineWorker]
    teams: list[TeamShare]


class QueueService:
    def online_workers(self, session: Session, settings: Settings, now: datetime | None = None) -> list[Worker]:
        since = (now or utcnow()) - timedelta(seconds=ONLINE_HEARTBEATS * settings.HEARTBEAT_SECONDS)
        return list(session.scalars(select(Worker).where(Worker.last_seen_at >= since).order_by(Worker.id)))

    def worker(self, session: Session, worker_id: str) -> Worker | None:
        return session.get(Worker, worker_id)

    def summary(self, session: Session, settings: Settings, *, team: Team) -> QueueSummary:
        """Counts cover every team (the queue is shared); job ids are shown only for the team's own jobs."""
        counts = {(c, s): n for c, s, n in session.execute(
            select(Job.gpu_class, Job.status, func.count()).where(Job.status.in_(ACTIVE))
            .group_by(Job.gpu_class, Job.status))}
        workers = self.online_workers(session, settings)
        busy_ids = {w.current_job_id for w in workers if w.current_job_id}
        own = set(session.scalars(select(Job.id).where(Job.id.in_(busy_ids), Job.team_id == team.id))) if busy_ids else set()
        names = list(settings.GPU_CLASSES) + sorted({c for c, _ in counts} - set(settings.GPU_CLASSES))
        classes = [ClassLoad(name, counts.get((name, ACTIVE[0]), 0), counts.get((name, ACTIVE[1]), 0),
                             sum(name in (w.gpu_classes or []) for w in workers)) for name in names]
        return QueueSummary(classes, [
            OnlineWorker(w.id, list(w.gpu_classes or []), w.device, w.last_seen_at, w.current_job_id is not None,
                         w.current_job_id if w.current_job_id in own else None) for w in workers],
            self.team_shares(session))

    def team_shares(self, session: Session) -> list[TeamShare]:
        """Every team with queued or running jobs: what it runs against what its weight entitles it to."""
        counts = {(t, s): n for t, s, n in session.execute(
            select(Job.team_id, Job.status, func.count()).where(Job.status.in_(ACTIVE)).group_by(Job.team_id, Job.status))}
        teams = list(session.scalars(select(Team).where(Team.id.in_({t for t, _ in counts})).order_by(Team.name)))
        total_running = sum(n for (_, s), n in counts.items() if s == ACTIVE[1])
        total_weight = sum(t.weight for t in teams)
        return [TeamShare(t.name, t.weight, t.max_running, counts.get((t.id, ACTIVE[1]), 0),
                          counts.get((t.id, ACTIVE[0]), 0),
                          counts.get((t.id, ACTIVE[1]), 0) / total_running if total_running else 0.0,
                          t.weight / total_weight) for t in teams]


queue_service = QueueService()
