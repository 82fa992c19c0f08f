"""Fair sharing of the pool between teams: which queued job a free worker takes next.

A team's share is its running jobs divided by its weight. The team with the smallest share goes first; teams with
equal shares take turns (the one whose last claim is oldest first); a team at its running cap waits. Within a team,
higher priority first, then older. So priority orders a team's own jobs and never jumps another team's turn.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ..models import Job, JobStatus, Team

NEVER = datetime.min.replace(tzinfo=timezone.utc)
QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value


def running_by_team(session: Session) -> dict[str, int]:
    return dict(session.execute(select(Job.team_id, func.count()).where(Job.status == RUNNING)
                                .group_by(Job.team_id)).all())


def claim_order(session: Session, gpu_classes: list[str], limit: int = 5) -> list[str]:
    """Up to `limit` queued job ids of these classes, one per team, in the order they should be claimed."""
    queued = (Job.status == QUEUED, Job.gpu_class.in_(gpu_classes), Job.deleted_at.is_(None))
    teams = session.execute(select(Team.id, Team.weight, Team.max_running, Team.last_claim_at)
                            .where(Team.id.in_(select(Job.team_id).where(*queued)))).all()
    running = running_by_team(session)
    waiting = [t for t in teams if t.max_running is None or running.get(t.id, 0) < t.max_running]
    waiting.sort(key=lambda t: (running.get(t.id, 0) / t.weight, t.last_claim_at or NEVER, t.id))
    return [session.scalar(select(Job.id).where(*queued, Job.team_id == t.id)
                           .order_by(Job.priority.desc(), Job.created_at, Job.id).limit(1)) for t in waiting[:limit]]


def over_cap(session: Session, team_id: str) -> bool:
    """Whether the team runs more jobs than its cap (read after the claiming UPDATE, in its transaction)."""
    cap = session.scalar(select(Team.max_running).where(Team.id == team_id))
    return cap is not None and running_by_team(session).get(team_id, 0) > cap
