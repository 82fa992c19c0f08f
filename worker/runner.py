"""Runs one job on this worker: claim (lease), heartbeat, calibrate with per-block checkpoints, publish.

Every write after the claim is fenced by the lease token, so a worker that lost its lease (frozen, partitioned,
reaped) cannot overwrite the state of the job's new owner.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import func, select, update

from api.core.context import ServiceContext
from api.core.db import new_id, utcnow
from api.core.redact import public_message
from api.core.storage import StorageError, StoredObject
from api.datasets.builtin import BUILTIN_TEXTS
from api.jobs import states
from api.jobs.estimate import job_wkvq_config
from api.jobs.model_source import local_model_dir
from api.jobs.service import DONE, PUBLISHING, add_event
from api.models import Artifact, Dataset, Job, JobMetrics, JobStatus, Team
from api.queue.fair_share import claim_order, over_cap
from wkvq_core.calib.progress import CalibrationCallbacks, CalibrationEvent, EventKind
from wkvq_core.config import WKVQuantConfig
from wkvq_core.errors import CalibrationCancelled, WKVQError
from wkvq_core.export import NOTES, exporter
from wkvq_core.pipeline import QuantizeJob, run_quantize_job
from wkvq_core.targets import get_target

from .artifact_tar import write_reproducible_tar
from .checkpoints import StorageCheckpoints, drop_checkpoints
from .lease import Lease, LeaseLost, fence
from .logging import log_context
from .retention import purge_if_deleted, workdir_prefix
from .retry import with_db_retry

log = logging.getLogger(__name__)
ARTIFACT_NAME = "model.tar"
EXPORTING = "exporting"  # the stage writing the target's export (llamacpp: a GGUF, vllm: a directory) from the artifact
# what metrics["export"] takes from the export's notes: how to run it (GGUF: the cache types; vLLM: the serve command)
EXPORT_NOTE_KEYS = ("recommended_cache_type", "kv_cache_dtype", "serve", "loading")
MEDIA_TYPES = {".tar": "application/x-tar", ".json": "application/json"}  # else application/octet-stream
CANCEL_POLL_SECONDS = 0.5


def job_config(spec: dict[str, Any]) -> WKVQuantConfig:
    return job_wkvq_config(spec["config"])


def engine_of(config: WKVQuantConfig) -> dict[str, Any]:
    """{"target": ..., "cache_type": ...}: the engine a job's metrics are measured for, with the KV cache type (as
    the engine names it, e.g. llama.cpp's -ctk / -ctv) its WKV perplexity predicts the engine's for."""
    target = get_target(config.target)
    if target.cache_type is None:
        return {"target": target.name}
    return {"target": target.name, "cache_type": target.cache_type(config.kv)}


def export_format(config: WKVQuantConfig) -> str | None:
    """The `wkvq_core.export` format the job's target is deployed with (None: the packed artifact itself)."""
    return get_target(config.target).export


def export_files(fmt: str, artifact_dir: Path, out_dir: Path, top: str, metrics: dict[str, Any]) -> list[Path]:
    """Writes the export of the packed artifact into `out_dir`; returns the files the job ships: the export's one
    model file where its notes name one (a GGUF), else its files as one tar `model-FORMAT.tar` of the directory
    `top` (a vLLM checkpoint), and the notes json. Records in metrics["export"] what the job page shows: the
    format, the shipped file (and the directory it unpacks to), the notes' advice on running it."""
    try:
        exporter(fmt).export(artifact_dir, out_dir)
    except WKVQError as exc:
        raise WKVQError(f"the {fmt} export of the quantized model failed: {exc}") from exc
    notes = json.loads((out_dir / NOTES).read_text())
    if "file" in notes:
        shipped, unpacked = out_dir / notes["file"], {}
    else:
        shipped, unpacked = out_dir.parent / f"model-{fmt}.tar", {"directory": top}
        write_reproducible_tar(out_dir, shipped, top, files=notes["files"])
    metrics["export"] = {"format": fmt, "file": shipped.name, **unpacked, "notes": NOTES,
                         **{key: notes[key] for key in EXPORT_NOTE_KEYS if key in notes}}
    return [shipped, out_dir / NOTES]


def describe_stored(metrics: dict[str, Any], stored: dict[str, StoredObject]) -> None:
    """Size and sha256 of the stored files in the job's metrics (the packed artifact's and its export's)."""
    metrics["artifact"] = {"name": ARTIFACT_NAME, "size": stored[ARTIFACT_NAME].size,
                           "sha256": stored[ARTIFACT_NAME].sha256}
    if "export" in metrics:
        obj = stored[metrics["export"]["file"]]
        metrics["export"] |= {"size": obj.size, "sha256": obj.sha256}


def artifact_top_dir(spec: dict[str, Any]) -> str:
    model = spec["model"]
    name = model["name"] if model["source"] == "local" else model["id"].split("/")[-1]
    return f"{name}-w{spec['config']['w_bits']}kv{spec['config']['kv_bits']}"


class _Heartbeat(threading.Thread):
    def __init__(self, runner: JobRunner, lease: Lease) -> None:
        super().__init__(name=f"heartbeat-{lease.job_id}", daemon=True)
        self.runner, self.lease = runner, lease
        self.stopped, self.lost = threading.Event(), threading.Event()
        self.last_cancel_check = float("-inf")
        # the attempt's time limit, measured from its start (every mode: Celery's hard limit is only a backstop)
        self.deadline = time.monotonic() + runner.ctx.settings.JOB_TIME_LIMIT_SECONDS
        self.timed_out = False

    def run(self) -> None:
        with log_context(job_id=self.lease.job_id, worker_id=self.runner.worker_id):  # a thread of its own
            self._beat()

    def _beat(self) -> None:
        settings = self.runner.ctx.settings
        while not self.stopped.wait(settings.HEARTBEAT_SECONDS):
            try:
                now = utcnow()
                if not self.runner.fenced_update(self.lease, heartbeat_at=now,
                                                 lease_expires_at=now + timedelta(seconds=settings.LEASE_SECONDS)):
                    log.warning("job %s: lease lost (another worker owns it now)", self.lease.job_id)
                    self.lost.set()
                    return
            except Exception as exc:  # the database may be down for a while: keep trying until the lease ends
                log.warning("job %s: heartbeat failed: %s", self.lease.job_id, exc)


class JobRunner:
    def __init__(self, ctx: ServiceContext, worker_id: str) -> None:
        self.ctx, self.worker_id = ctx, worker_id
        self.current_job: str | None = None

    # ------------------------------------------------------------------ claiming

    def _claim_values(self) -> dict[str, Any]:
        now = utcnow()
        return dict(lease_owner=self.worker_id, lease_token=new_id(),
                    lease_expires_at=now + timedelta(seconds=self.ctx.settings.LEASE_SECONDS), heartbeat_at=now,
                    attempts=Job.attempts + 1, stage=None)

    def claim(self, job_id: str) -> Lease | None:
        """Conditional UPDATE queued -> running; None if the job is not (or no longer) queued, or its team is at its
        running cap. The team's row is updated first, so concurrent claims for one team wait for each other (a
        Postgres row lock; SQLite has one writer) and the cap holds."""
        values = self._claim_values()
        with self.ctx.session() as session:
            team_id = session.scalar(select(Job.team_id).where(Job.id == job_id, Job.status == JobStatus.QUEUED.value))
            if team_id is None:
                return None
            session.execute(update(Team).where(Team.id == team_id).values(last_claim_at=values["heartbeat_at"]))
            if not states.claim(session, job_id, **values) or over_cap(session, team_id):
                session.rollback()
                return None
            session.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None)).values(started_at=utcnow()))
            job = session.get(Job, job_id)
            add_event(session, job_id, "started", f"attempt {job.attempts} on {self.worker_id}")
            session.commit()
        return Lease(job_id, values["lease_token"], self.worker_id)

    def claim_next(self, gpu_classes: list[str]) -> Lease | None:
        """The next queued job of these classes by fair share between teams (`api.queue.fair_share`)."""
        with self.ctx.session() as session:
            candidates = claim_order(session, gpu_classes)
        for job_id in candidates:
            lease = self.claim(job_id)
            if lease is not None:
                return lease
        return None

    def fenced_update(self, lease: Lease, **values: Any) -> bool:
        with self.ctx.session() as session:
            changed = fence(session, lease, **values)
            session.commit()
        return changed

    def _db(self, fn: Callable[[], Any], what: str) -> Any:
        return with_db_retry(fn, deadline_seconds=self.ctx.settings.LEASE_SECONDS, what=what)

    # ------------------------------------------------------------------ running

    def run(self, job_id: str) -> None:
        with log_context(job_id=job_id, worker_id=self.worker_id):
            lease = self.claim(job_id)
            if lease is None:
                log.info("job %s: not queued any more, nothing to do", job_id)
                return
            self.execute(lease)

    def run_next(self, gpu_classes: list[str], woken_by: str) -> None:
        """A queue message only wakes the worker: it runs the next job by fair share, which is the message's job
        unless another team's turn comes first (that job's own message then finds it taken, a no-op)."""
        lease = self.claim_next(gpu_classes)
        if lease is None:
            log.info("woken by job %s: no job of %s may start now", woken_by, ", ".join(gpu_classes))
            return
        self.execute(lease)
        self._wake_for_queued(gpu_classes)

    def _wake_for_queued(self, gpu_classes: list[str]) -> None:
        """A wake-up per class that still has queued jobs: their messages may have been spent while their team was
        at its cap or another team's turn came first."""
        with self.ctx.session() as session:
            oldest = session.execute(select(Job.gpu_class, func.min(Job.id)).where(
                Job.status == JobStatus.QUEUED.value, Job.gpu_class.in_(gpu_classes)).group_by(Job.gpu_class)).all()
        for gpu_class, job_id in oldest:
            self.ctx.dispatcher.enqueue(job_id, gpu_class)

    def execute(self, lease: Lease) -> None:
        """Runs the claimed job to its end; every log line of this thread meanwhile carries the job id."""
        with log_context(job_id=lease.job_id, worker_id=self.worker_id):
            self._execute_logged(lease)

    def _execute_logged(self, lease: Lease) -> None:
        self.current_job = lease.job_id
        heartbeat = _Heartbeat(self, lease)
        heartbeat.start()
        workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix(lease.job_id)))
        try:
            self._execute(lease, heartbeat, workdir)
        except LeaseLost:
            log.warning("job %s: stopped, the lease belongs to another worker", lease.job_id)
        except CalibrationCancelled as exc:
            if heartbeat.lost.is_set():
                log.warning("job %s: stopped, the lease belongs to another worker", lease.job_id)
            elif heartbeat.timed_out:  # failed, not cancelled: nobody asked; the checkpoints let a retry resume
                self._finish(lease, JobStatus.FAILED, "failed",
                             f"time limit of {self.ctx.settings.JOB_TIME_LIMIT_SECONDS:g} s exceeded")
            else:
                self._finish(lease, JobStatus.CANCELLED, "cancelled", str(exc))
        except (WKVQError, StorageError) as exc:  # the team sees the message without the deployment's paths
            self._finish(lease, JobStatus.FAILED, "failed", public_message(str(exc), self.ctx))
        except Exception as exc:
            log.error("job %s failed:\n%s", lease.job_id, traceback.format_exc())  # the log keeps them
            self._finish(lease, JobStatus.FAILED, "failed",
                         public_message(f"internal error: {type(exc).__name__}: {exc}", self.ctx))
        finally:
            heartbeat.stopped.set()
            self.current_job = None
            shutil.rmtree(workdir, ignore_errors=True)
            self._db(lambda: purge_if_deleted(self.ctx, lease.job_id), f"purging job {lease.job_id} if deleted")

    def _finish(self, lease: Lease, status: JobStatus, kind: str, message: str) -> None:
        def write() -> None:
            with self.ctx.session() as session:
                if states.finish(session, lease.job_id, lease.token, status,
                                 error=message if status == JobStatus.FAILED else None):
                    add_event(session, lease.job_id, kind, message)
                session.commit()

        self._db(write, f"marking job {lease.job_id} {status.value}")

    def _execute(self, lease: Lease, heartbeat: _Heartbeat, workdir: Path) -> None:
        with self.ctx.session() as session:
            job = session.get(Job, lease.job_id)
            spec, team_id = job.spec, job.team_id
            calib = self._text(session, spec["calibration"], "calibration", team_id, workdir)
            evaluation = spec.get("evaluation") or (
                spec["calibration"] if spec["calibration"]["source"] == "builtin" else None)
            eval_text = self._text(session, evaluation, "evaluation", team_id, workdir) if evaluation else None
        model = spec["model"]
        quantize_job = QuantizeJob(
            model=str(local_model_dir(self.ctx.settings, model["name"])) if model["source"] == "local" else model["id"],
            revision=model.get("revision"), calib=calib, eval=eval_text, out=workdir / "artifact",
            config=job_config(spec), device=self.ctx.settings.DEVICE,
            eval_tokens=spec["config"].get("eval_tokens", 0))  # jobs submitted before the bound: the whole text
        callbacks = CalibrationCallbacks(
            on_event=lambda event: self._on_event(lease, heartbeat, event),
            should_cancel=lambda: self._should_cancel(lease, heartbeat),
            checkpoints=StorageCheckpoints(
                self.ctx.store, self.ctx.sessions, lease, db_write=self._db,
                on_corrupt=lambda index, msg: self._event(lease, heartbeat, "checkpoint_corrupt", msg)),
        )
        metrics = run_quantize_job(quantize_job, callbacks)
        if heartbeat.lost.is_set():
            raise LeaseLost()
        if "eval" in metrics:  # the engine whose arithmetic the perplexities were measured with
            metrics["eval"]["engine"] = engine_of(quantize_job.config)
        tar_path = workdir / ARTIFACT_NAME
        write_reproducible_tar(workdir / "artifact", tar_path, artifact_top_dir(spec))
        files = [tar_path]
        export = export_format(quantize_job.config)
        if export is not None:
            self._event(lease, heartbeat, "stage", EXPORTING, progress={"stage": EXPORTING})
            top = f"{artifact_top_dir(spec)}-{export}"  # the directory a tarred export unpacks to
            files += export_files(export, workdir / "artifact", workdir / "export", top, metrics)
        self._enter_publishing(lease, heartbeat)
        stored: list[tuple[str, StoredObject]] = []
        try:
            for path in files:
                key = f"jobs/{lease.job_id}/{lease.token}-{path.name}"
                stored.append((path.name, self.ctx.store.put_file(str(path), key)))
            describe_stored(metrics, dict(stored))
            self._db(lambda: self._publish(lease, stored, metrics), f"publishing job {lease.job_id}")
        except BaseException:
            for _, obj in stored:
                self.ctx.store.delete(obj.uri)
            raise

    def _enter_publishing(self, lease: Lease, heartbeat: _Heartbeat) -> None:
        """Stage "publishing", only where no cancel was requested: the converse of the cancel endpoint's conditional
        UPDATE, so a cancel accepted before this point ends the job cancelled (CalibrationCancelled, no artifact) and
        one after it is refused (409). Fenced by the lease like every other write."""
        def write() -> tuple[bool, bool, str | None]:
            with self.ctx.session() as session:
                if states.enter_publishing(session, lease.job_id, lease.token):
                    add_event(session, lease.job_id, "stage", PUBLISHING)
                    session.commit()
                    return True, False, lease.token
                cancel, token, status = session.execute(
                    select(Job.cancel_requested, Job.lease_token, Job.status).where(Job.id == lease.job_id)).one()
                session.rollback()
                return False, bool(cancel), token if status == JobStatus.RUNNING.value else None

        published, cancel, token = self._db(write, f"publishing stage of job {lease.job_id}")
        if published:
            return
        if cancel and token == lease.token:
            raise CalibrationCancelled("cancelled before publishing the artifact")
        heartbeat.lost.set()
        raise LeaseLost()

    def _publish(self, lease: Lease, stored: list[tuple[str, StoredObject]], metrics: dict[str, Any]) -> None:
        """One transaction: the artifact rows (the packed model, and the target's export if it has one), metrics,
        status succeeded (fenced)."""
        with self.ctx.session() as session:
            if not states.finish(session, lease.job_id, lease.token, JobStatus.SUCCEEDED, stage=DONE, error=None):
                session.rollback()
                raise LeaseLost()
            previous = list(session.scalars(select(Artifact).where(  # republished after a manual requeue: replaced
                Artifact.job_id == lease.job_id, Artifact.name.in_([name for name, _ in stored]))))
            for artifact in previous:
                session.delete(artifact)
            session.flush()
            for name, obj in stored:
                session.add(Artifact(job_id=lease.job_id, name=name, uri=obj.uri, sha256=obj.sha256, size=obj.size,
                                     media_type=MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")))
            session.merge(JobMetrics(job_id=lease.job_id, metrics=metrics))
            add_event(session, lease.job_id, "succeeded",
                      ", ".join(f"artifact {name} ({obj.size} bytes)" for name, obj in stored))
            session.commit()
        kept = {obj.uri for _, obj in stored}
        for artifact in previous:
            if artifact.uri not in kept:
                self.ctx.store.delete(artifact.uri)
        if not self.ctx.settings.KEEP_CHECKPOINTS:
            drop_checkpoints(self.ctx, lease.job_id)

    def _text(self, session, spec: dict[str, Any], role: str, team_id: str, workdir: Path) -> str:
        """A text SPEC the library reads: a shipped file, an uploaded file fetched from the store, or `hf:...`."""
        if spec["source"] == "builtin":
            return str(BUILTIN_TEXTS[spec["name"]][role])
        if spec["source"] == "upload":
            dataset = session.scalar(select(Dataset).where(Dataset.id == spec["dataset_id"], Dataset.team_id == team_id))
            if dataset is None:
                raise WKVQError(f"{role} dataset {spec['dataset_id']} no longer exists")
            path = workdir / f"{role}.txt"
            self.ctx.store.download(dataset.uri, str(path))
            return str(path)
        if spec.get("config"):
            return f"hf:{spec['name']}:{spec['config']}:{spec['split']}:{spec['field']}"
        return f"hf:{spec['name']}:{spec['split']}"  # the schema requires a config for a field other than "text"

    # ------------------------------------------------------------------ callbacks

    def _event(self, lease: Lease, heartbeat: _Heartbeat, kind: str, message: str | None = None,
               progress: dict[str, Any] | None = None, **fields: Any) -> None:
        """The event and the job's progress in one fenced transaction: a worker that lost its lease writes neither."""
        def write() -> bool:
            with self.ctx.session() as session:
                if not fence(session, lease, **(progress or {})):
                    session.rollback()
                    return False
                add_event(session, lease.job_id, kind, message, **fields)
                session.commit()
                return True

        if not self._db(write, f"event {kind}"):
            heartbeat.lost.set()

    def _on_event(self, lease: Lease, heartbeat: _Heartbeat, event: CalibrationEvent) -> None:
        if event.kind == EventKind.STAGE:  # the row's `stage` and one event, in one fenced transaction
            self._event(lease, heartbeat, event.kind.value, event.stage, progress={"stage": event.stage})
            heartbeat.last_cancel_check = float("-inf")  # a stage's first cancel check reads the database
            log.info("job %s: stage %s", lease.job_id, event.stage)
            return
        if event.kind == EventKind.EVAL_WINDOWS:  # a log line only: the job's progress is counted in blocks
            log.info("job %s: evaluated %d/%d window passes", lease.job_id, event.windows, event.n_windows)
            return
        progress: dict[str, Any] = {"total_blocks": event.n_blocks}
        if event.kind in (EventKind.BLOCK_END, EventKind.BLOCK_RESUMED):
            progress["current_block"] = event.block + 1
        if event.kind == EventKind.BLOCK_START:
            progress["current_block"] = event.block
        self._event(lease, heartbeat, event.kind.value, progress=progress, block=event.block, n_blocks=event.n_blocks,
                    epoch=event.epoch or None, epochs=event.epochs or None, loss=event.loss, seconds=event.seconds)
        log.info("job %s: %s block %d/%d%s", lease.job_id, event.kind.value, event.block + 1, event.n_blocks,
                 "" if event.loss is None else f" loss {event.loss:.6g}")

    def _should_cancel(self, lease: Lease, heartbeat: _Heartbeat) -> bool:
        """Asked in every long loop of the library; True when the lease is lost, the attempt is past its time limit
        (`timed_out`: the job then fails) or a cancel was requested. The database is read at most every
        CANCEL_POLL_SECONDS, and at the first check of each stage."""
        if heartbeat.lost.is_set():
            return True
        now = time.monotonic()
        if now >= heartbeat.deadline:
            heartbeat.timed_out = True
            return True
        if now - heartbeat.last_cancel_check < CANCEL_POLL_SECONDS:
            return False
        heartbeat.last_cancel_check = now

        def read() -> tuple[bool, str | None]:
            with self.ctx.session() as session:
                return session.execute(select(Job.cancel_requested, Job.lease_token).where(Job.id == lease.job_id)).one()

        cancel, token = self._db(read, "cancel check")
        if token != lease.token:
            heartbeat.lost.set()
            return True
        return bool(cancel)
