"""What workers clean up: deleted jobs' objects once they have stopped, and scratch directories left behind by
worker processes that were killed (kill -9, SIGTERM during a job)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from sqlalchemy import exists, or_, select

from api.core.context import ServiceContext
from api.jobs.service import purge_job
from api.models import Artifact, BlockCheckpoint, Job, JobEvent, JobStatus

log = logging.getLogger(__name__)
WORKDIR_PREFIX = "wkvq-"
WORKDIR = re.compile(rf"^{WORKDIR_PREFIX}[0-9a-f]{{32}}-(\d+)-")
TERMINAL = [s.value for s in JobStatus if s.terminal]


def workdir_prefix(job_id: str) -> str:
    """A job's scratch directory in the system temp dir, named after the process that owns it (`WORKDIR`)."""
    return f"{WORKDIR_PREFIX}{job_id}-{os.getpid()}-"


def purge_if_deleted(ctx: ServiceContext, job_id: str) -> None:
    with ctx.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.deleted_at is not None and JobStatus(job.status).terminal:
            purge_job(session, ctx.store, job_id)


def purge_deleted(ctx: ServiceContext) -> list[str]:
    """Deleted jobs that have stopped but still hold objects, events or metrics (their worker died, or wrote its
    last event after the purge): purged. Returns their ids."""
    left = or_(*(exists().where(model.job_id == Job.id) for model in (Artifact, BlockCheckpoint, JobEvent)))
    with ctx.session() as session:
        ids = list(session.scalars(select(Job.id).where(Job.deleted_at.is_not(None), Job.status.in_(TERMINAL), left)))
        for job_id in ids:
            purge_job(session, ctx.store, job_id)
    return ids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_workdirs(root: Path | None = None) -> list[Path]:
    """Scratch directories of jobs (they hold a team's calibration text) whose process is gone; run at worker
    start. Directories of live processes (other workers of this host) are left alone."""
    root = root or Path(tempfile.gettempdir())
    removed = []
    for path in root.glob(f"{WORKDIR_PREFIX}*"):
        match = WORKDIR.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d scratch directories of stopped workers", len(removed))
    return removed
