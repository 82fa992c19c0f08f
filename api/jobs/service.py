"""Job lifecycle on the API side: submit (idempotent, enqueue after commit), read, list, cancel, retry."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime

from sqlalchemy import Row, and_, bindparam, case, delete, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from . import states
from ..core.context import ServiceContext
from ..core.db import utcnow
from ..core.errors import Conflict, Gone, InvalidField, NotFound, ServiceError
from ..core.storage import ArtifactStore
from ..datasets.service import dataset_service
from ..models import ApiKey, Artifact, BlockCheckpoint, Job, JobEvent, JobMetrics, JobStatus, Team
from ..teams.service import check_key, key_prefix
from ..teams.usage import usage_service
from .estimate import check_budget, estimate_job, reserved_bytes
from .model_source import check_dims, check_hub_data, model_config
from .schemas import JobCreate, JobRead, UploadedData
from .targets import check_target
from .states import DONE, PUBLISHING, RETRYABLE  # noqa: F401  (re-exported: the dashboard and the worker use them)

MAX_EVENTS_PER_JOB = 5000  # past it, a job's oldest events are dropped (cancel/retry loops cannot grow it forever)


def request_hash(body: JobCreate) -> str:
    return hashlib.sha256(json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def add_event(session: Session, job_id: str, kind: str, message: str | None = None, **fields) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message, **fields))
    session.execute(_PRUNE_EVENTS, {"job_id": job_id, "newer": MAX_EVENTS_PER_JOB - 1})


# run with every event: built once (see _PROGRESS). Deletes a job's events older than its `newer`+1 newest.
_PRUNE_EVENTS = delete(JobEvent).where(
    JobEvent.job_id == bindparam("job_id"),
    JobEvent.id < (select(JobEvent.id).where(JobEvent.job_id == bindparam("job_id")).order_by(JobEvent.id.desc())
                   .offset(bindparam("newer")).limit(1).scalar_subquery()))


def _progress_columns(job_id: ColumnElement) -> tuple[ColumnElement, ColumnElement, ColumnElement]:
    """What a status read derives from the job's events, as three scalar subqueries on `job_id` (`Job.id` to
    correlate them with a query over jobs, or a bound parameter): the mean block time (for the ETA), the last loss,
    the epoch reached in the current block (the latest `epoch_end`'s epoch, 0 right after a `block_start`, NULL
    before any). One statement reads a whole page of jobs with their progress."""
    block_seconds = (select(func.avg(JobEvent.seconds))
                     .where(JobEvent.job_id == job_id, JobEvent.kind == "block_end").scalar_subquery())
    last_loss = (select(JobEvent.loss).where(JobEvent.job_id == job_id, JobEvent.loss.is_not(None))
                 .order_by(JobEvent.id.desc()).limit(1).scalar_subquery())
    epoch = (select(case((JobEvent.kind == "epoch_end", JobEvent.epoch), else_=0))
             .where(JobEvent.job_id == job_id, or_(JobEvent.kind == "block_start", JobEvent.kind == "epoch_end"))
             .order_by(JobEvent.id.desc()).limit(1).scalar_subquery())
    return block_seconds, last_loss, epoch


# The hot reads, built once: building a statement and computing its cache key cost more CPU than executing it.
_PROGRESS = select(*_progress_columns(bindparam("job_id", type_=Job.id.type)))
# What `_read_row` reads: the job columns `_read` uses and the job's progress, named. Core rows, not ORM entities.
_READ_COLUMNS = (Job.id, Job.status, Job.spec, Job.gpu_class, Job.priority, Job.attempts, Job.max_attempts,
                 Job.cancel_requested, Job.lease_owner, Job.current_block, Job.total_blocks, Job.error, Job.heartbeat_at,
                 Job.stage, Job.estimate, Job.created_at, Job.started_at, Job.finished_at, Job.updated_at, Job.deleted_at,
                 *(column.label(name) for column, name in zip(_progress_columns(Job.id),
                                                                ("block_seconds", "last_loss", "epoch"))))
# A status read, the request clients poll, in one round trip: the API key by its prefix, and the job if it belongs
# to the key's team (NULL columns otherwise), with its progress.
_KEY_AND_JOB_WITH_PROGRESS = (
    select(ApiKey.key_hash, ApiKey.revoked_at, *_READ_COLUMNS)
    .select_from(ApiKey)
    .outerjoin(Job, and_(Job.team_id == ApiKey.team_id, Job.id == bindparam("job_id")))
    .where(ApiKey.prefix == bindparam("prefix")))


class JobService:
    def submit(self, ctx: ServiceContext, session: Session, *, team: Team, body: JobCreate,
               idempotency_key: str | None, hub_config: dict | None = None) -> tuple[Job, bool]:
        """Returns (job, created). The job is enqueued only after its row has committed. A hub model's config is
        looked up by the caller (`model_source.hub_configs`), off the request threads."""
        digest = request_hash(body)
        if idempotency_key is not None:
            existing = self._by_idempotency_key(session, team, idempotency_key)
            if existing is not None:
                return self._replay(existing, digest), False
        model = self._validate(ctx, session, team, body, hub_config)
        gpu_class = body.gpu_class or ctx.settings.GPU_CLASSES[0]
        estimate = estimate_job(ctx.settings, session, team=team, body=body, gpu_class=gpu_class, model_config=model)
        check_budget(estimate, gpu_class, ctx.settings.budget(gpu_class), ctx.settings)  # before anything is written
        reserve = reserved_bytes(estimate)
        usage_service.check_submit(session, ctx.settings, team=team, reserve=reserve)  # holds the team until commit
        job = Job(team_id=team.id, spec=body.model_dump(mode="json", exclude={"gpu_class", "priority"}),
                  gpu_class=gpu_class, priority=body.priority, max_attempts=ctx.settings.MAX_ATTEMPTS,
                  idempotency_key=idempotency_key, request_hash=digest, estimate=estimate.to_dict(),
                  reserved_bytes=reserve)
        session.add(job)
        try:
            session.flush()
            add_event(session, job.id, "queued", f"queued on {gpu_class}")
            session.commit()
        except IntegrityError:
            session.rollback()
            existing = self._by_idempotency_key(session, team, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._replay(existing, digest), False
        ctx.dispatcher.enqueue(job.id, job.gpu_class)
        return job, True

    def _by_idempotency_key(self, session: Session, team: Team, key: str) -> Job | None:
        return session.scalar(select(Job).where(Job.team_id == team.id, Job.idempotency_key == key))

    def _replay(self, job: Job, digest: str) -> Job:
        if job.deleted_at is not None:
            raise Gone(f"job {job.id}, submitted with this Idempotency-Key, was deleted")
        if job.request_hash != digest:
            raise InvalidField(("header", "Idempotency-Key"),
                               "this Idempotency-Key was already used with a different request body")
        return job

    def _validate(self, ctx: ServiceContext, session: Session, team: Team, body: JobCreate,
                  hub_config: dict | None) -> dict:
        """Raises InvalidField for a job that cannot run; returns the model's config.json."""
        settings = ctx.settings
        if body.gpu_class is not None and body.gpu_class not in settings.GPU_CLASSES:
            raise InvalidField(("body", "gpu_class"), f"unknown GPU class {body.gpu_class!r}; "
                                                      f"available: {', '.join(settings.GPU_CLASSES)}")
        model = model_config(settings, body.model, hub_config)
        check_dims(model, body.config)
        check_target(model, body.config)
        check_hub_data(body)
        for field in ("calibration", "evaluation"):
            spec = getattr(body, field)
            if isinstance(spec, UploadedData):
                try:
                    dataset = dataset_service.get(session, team=team, dataset_id=spec.dataset_id)
                except NotFound:
                    raise InvalidField(("body", field, "dataset_id"), f"unknown dataset {spec.dataset_id}") from None
                if dataset.chars <= body.config.seqlen:
                    raise InvalidField(("body", field, "dataset_id"),
                                       f"dataset has {dataset.chars} characters, fewer than the {body.config.seqlen + 1} "
                                       f"tokens a {body.config.seqlen}-token window needs")
        return model

    def get(self, session: Session, *, team: Team, job_id: str) -> Job:
        job = session.scalar(select(Job).where(Job.id == job_id, Job.team_id == team.id))
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.deleted_at is not None:
            raise Gone(f"job {job_id} was deleted")
        return job

    def status(self, engine: Engine, *, key: str | None, job_id: str) -> JobRead:
        """`read(get(...))` for the team of `key` (checked as `team_service.authenticate` does), in one query."""
        with engine.connect() as connection:
            row = connection.execute(_KEY_AND_JOB_WITH_PROGRESS, {"prefix": key_prefix(key), "job_id": job_id}).first()
        check_key(key, row)
        if row.id is None:
            raise NotFound(f"job {job_id} not found")
        if row.deleted_at is not None:
            raise Gone(f"job {job_id} was deleted")
        return self._read_row(row)

    def list(self, session: Session, *, team: Team, status: str | None, gpu_class: str | None, limit: int,
             offset: int) -> tuple[list[JobRead], int]:
        """A page of the team's jobs, newest first, as read models (jobs and their progress in one query, as rows:
        ORM entities would cost more CPU than the rest of the request), and the number of jobs matching the
        filters."""
        where = [Job.team_id == team.id, Job.deleted_at.is_(None)]
        if status is not None:
            where.append(Job.status == status)
        if gpu_class is not None:
            where.append(Job.gpu_class == gpu_class)
        count = session.scalar(select(func.count()).select_from(Job).where(*where))
        rows = session.execute(select(*_READ_COLUMNS).where(*where)
                               .order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))
        now = utcnow()
        return [self._read_row(row, now) for row in rows], count

    def cancel(self, session: Session, *, team: Team, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one stops within seconds, wherever it is, and ends
        `cancelled` (keeping its checkpoints). One conditional UPDATE (`states.cancel`), the converse of the worker's
        switch to stage "publishing": a job publishing its artifact can no longer be cancelled (Conflict), and an
        accepted cancel always ends `cancelled`. Asking again while a cancel is pending changes nothing and adds no
        event."""
        job = self.get(session, team=team, job_id=job_id)
        changed = states.cancel(session, job.id)
        status, cancel_requested, stage, deleted_at = session.execute(
            select(Job.status, Job.cancel_requested, Job.stage, Job.deleted_at).where(Job.id == job.id)).one()
        if changed and status == JobStatus.CANCELLED.value:
            add_event(session, job.id, "cancelled", "cancelled before it started")
        elif changed:
            add_event(session, job.id, "cancel_requested", "will stop at its next cancel check, within seconds")
        elif deleted_at is not None:
            session.rollback()
            raise Gone(f"job {job.id} was deleted")
        elif status == JobStatus.RUNNING.value and stage == PUBLISHING:
            session.rollback()
            raise Conflict(f"job {job.id} is publishing its artifact and can no longer be cancelled")
        elif not (status == JobStatus.RUNNING.value and cancel_requested):  # pending: accepted again, no new event
            session.rollback()
            raise Conflict(f"job {job.id} is already {status}")
        session.commit()
        session.refresh(job)
        return job

    def retry(self, ctx: ServiceContext, session: Session, *, team: Team, job_id: str) -> Job:
        """Requeue a failed or cancelled job; it resumes from its last block checkpoint."""
        job = self.get(session, team=team, job_id=job_id)
        if JobStatus(job.status) in RETRYABLE:  # else no limit applies: the conditional UPDATE below refuses it
            try:
                usage_service.check_retry(session, ctx.settings, team=team, job=job)  # locks the team first
            except ServiceError:
                session.rollback()
                raise
        if not states.retry(session, job.id):
            session.rollback()
            job = self.get(session, team=team, job_id=job_id)  # Gone if a delete came first
            raise Conflict(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
        add_event(session, job.id, "retried", "requeued; resumes from the last block checkpoint")
        session.commit()
        session.refresh(job)
        ctx.dispatcher.enqueue(job.id, job.gpu_class)
        return job

    def delete(self, session: Session, store: ArtifactStore, *, team: Team, job_id: str) -> bool:
        """Deletes a job: stops it if it is queued or running (`states.delete`, one UPDATE with the deletion), then
        removes its artifact, checkpoints, metrics and events. The row stays as a tombstone (status, times,
        `deleted_at`; GET answers 410) so that ids and idempotency keys are never reused. Returns True when done,
        False when the job is still stopping: its worker purges it when it stops (or the reaper, if the worker
        died)."""
        job = self.get(session, team=team, job_id=job_id)
        status = states.delete(session, job.id)
        if status is None:
            session.rollback()
            job = self.get(session, team=team, job_id=job_id)  # Gone if another delete came first
            raise Conflict(f"job {job.id} is publishing its artifact and cannot be stopped; delete it once it has "
                           "succeeded, in a few seconds")
        if status == JobStatus.RUNNING.value:  # a stopped job's events go with the purge
            add_event(session, job.id, "cancel_requested", "deleted; will stop at its next cancel check")
        session.commit()
        if not JobStatus(status).terminal:
            return False
        purge_job(session, store, job.id)
        return True

    def events(self, session: Session, *, job_id: str, after: int, limit: int = 500) -> list[JobEvent]:
        return list(session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)))

    def metrics(self, session: Session, *, team: Team, job_id: str) -> dict:
        job = self.get(session, team=team, job_id=job_id)
        row = session.get(JobMetrics, job.id)
        if row is None:
            raise NotFound(f"job {job.id} has no metrics yet (status {job.status})")
        return row.metrics

    def artifacts(self, session: Session, *, team: Team, job_id: str) -> list[Artifact]:
        job = self.get(session, team=team, job_id=job_id)
        return list(session.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)))

    def artifact(self, session: Session, *, team: Team, job_id: str, name: str) -> Artifact:
        for artifact in self.artifacts(session, team=team, job_id=job_id):
            if artifact.name == name:
                return artifact
        raise NotFound(f"job {job_id} has no artifact {name!r}")

    def read(self, session: Session, job: Job, now: datetime | None = None) -> JobRead:
        block_seconds, last_loss, epoch = session.execute(_PROGRESS, {"job_id": job.id}).one()
        return self._read(job, block_seconds, last_loss, epoch, now=now)

    def _read_row(self, row: Row, now: datetime | None = None) -> JobRead:
        """`_read` of a row of `_READ_COLUMNS`."""
        return self._read(row, row.block_seconds, row.last_loss, row.epoch, now=now)

    def _read(self, job: Job | Row, block_seconds: float | None, last_loss: float | None, epoch: int | None,
              now: datetime | None = None) -> JobRead:
        now = now or utcnow()
        total = job.total_blocks
        eta = None
        if job.status == JobStatus.RUNNING.value and total and block_seconds is not None:
            eta = block_seconds * (total - job.current_block)
        return JobRead(
            id=job.id, status=job.status, model=job.spec["model"], config=job.spec["config"],
            calibration=job.spec["calibration"], evaluation=job.spec.get("evaluation"), gpu_class=job.gpu_class,
            priority=job.priority, attempts=job.attempts, max_attempts=job.max_attempts,
            cancel_requested=job.cancel_requested, current_block=job.current_block, total_blocks=total,
            progress=job.current_block / total if total else (1.0 if job.status == JobStatus.SUCCEEDED.value else 0.0),
            eta_seconds=eta, last_loss=last_loss, epoch=epoch, stage=job.stage, worker=job.lease_owner, error=job.error,
            heartbeat_age_seconds=(now - job.heartbeat_at).total_seconds() if job.heartbeat_at else None,
            estimate=job.estimate,
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, updated_at=job.updated_at,
        )


def remove_objects(session: Session, store: ArtifactStore, model: type[Artifact | BlockCheckpoint], job_id: str) -> None:
    """A job's stored objects of one kind, then their rows (uncommitted). A crash in between leaves rows whose
    objects are missing: a download answers 410, a run recomputes the block."""
    for uri in session.scalars(select(model.uri).where(model.job_id == job_id)).all():
        store.delete(uri)
    session.execute(delete(model).where(model.job_id == job_id))


def purge_job(session: Session, store: ArtifactStore, job_id: str) -> None:
    """Removes a deleted, stopped job's objects, then their rows, events and metrics (the tombstone row stays)."""
    for model in (Artifact, BlockCheckpoint):
        remove_objects(session, store, model, job_id)
    for model in (JobEvent, JobMetrics):
        session.execute(delete(model).where(model.job_id == job_id))
    session.commit()


job_service = JobService()
