"""The worker's guarantees, in-process against real databases (every DB test runs on SQLite and on Postgres).

Jobs are submitted through the FastAPI app and run by the real `JobRunner` on the shipped tiny model (real
wkvq_core calibration, real `file://` store). Only the broker is replaced, by a recording dispatcher, where a test
needs to see what would have been sent; the Celery test talks to a real Redis.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.core.context import ServiceContext
from api.core.db import new_id, utcnow
from api.core.dispatch import RUN_TASK, CeleryDispatcher, celery_config
from api.jobs.schemas import QuantConfig
from api.models import Artifact, BlockCheckpoint, Job, JobEvent, JobStatus
from tests.conftest import EVAL_TEXT
from tests.service.conftest import TINY_JOB, service_settings
from wkvq_core.config import KVQuantConfig, kv_config
from worker.celery_app import create_celery
from worker.reaper import reap_expired, wake_stranded
from worker.runner import ARTIFACT_NAME, JobRunner, Lease, job_config

Headers = dict[str, str]
N_BLOCKS = 5  # stories260k
REDIS_URL = "redis://127.0.0.1:6379/11"


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def settings(db_url, tmp_path):
    """The shared service settings, with a second GPU class for the routing tests."""
    return service_settings(db_url, str(tmp_path / "store"), GPU_CLASSES=["default", "large"])


@pytest.fixture
def headers(team_headers) -> Headers:
    return team_headers("a")


@pytest.fixture
def job_body(client: TestClient, headers: Headers) -> Callable[..., dict[str, Any]]:
    """TINY_JOB evaluated on a small uploaded text (the shipped eval set would take ~10 s of the ~11 s a run takes)."""
    text = EVAL_TEXT.read_text(encoding="utf-8")[:1500]  # ~740 tokens: 11 windows of 64
    r = client.post("/v1/datasets", files={"file": ("eval.txt", text.encode(), "text/plain")}, headers=headers)
    assert r.status_code == 201, r.text
    evaluation = {"source": "upload", "dataset_id": r.json()["id"]}

    def make(config: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        body = copy.deepcopy(TINY_JOB) | {"evaluation": evaluation}
        body["config"].update(config or {})
        return body | fields

    return make


class RecordingDispatcher:
    """Stands in for the broker (an edge): records what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def enqueue(self, job_id: str, gpu_class: str) -> None:
        self.sent.append((job_id, gpu_class))

    def ping(self) -> None:
        return None

    def waiting(self, gpu_class: str) -> int:
        return 0  # an empty broker queue: every message sent was spent or lost


# --------------------------------------------------------------------------------------------------------- helpers


def submit(client: TestClient, headers: Headers, body: dict[str, Any]) -> str:
    r = client.post("/v1/jobs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "queued"
    return r.json()["id"]


def job_row(service: ServiceContext, job_id: str) -> Job:
    with service.session() as session:
        return session.get(Job, job_id)


def set_job(service: ServiceContext, job_id: str, **values: Any) -> None:
    with service.session() as session:
        assert session.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 1
        session.commit()


def events(service: ServiceContext, job_id: str, after: int = 0) -> list[JobEvent]:
    with service.session() as session:
        return list(session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id)))


def kinds(evs: list[JobEvent]) -> list[str]:
    return [e.kind for e in evs]


def blocks_of(evs: list[JobEvent], kind: str) -> list[int]:
    return [e.block for e in evs if e.kind == kind]


def last_event_id(service: ServiceContext, job_id: str, kind: str) -> int:
    return max(e.id for e in events(service, job_id) if e.kind == kind)


def count(service: ServiceContext, model, *where) -> int:
    with service.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def store_root(service: ServiceContext) -> Path:
    return Path(service.settings.STORAGE_URL.removeprefix("file://"))


def artifact_file(service: ServiceContext, job_id: str) -> Path:
    with service.session() as session:
        uri = session.scalar(select(Artifact.uri).where(Artifact.job_id == job_id, Artifact.name == ARTIFACT_NAME))
    return Path(uri.removeprefix("file://"))


def artifact_files(service: ServiceContext, job_id: str) -> list[Path]:
    """Every artifact object of the job in the store, whichever lease wrote it."""
    return sorted((store_root(service) / "jobs" / job_id).glob(f"*{ARTIFACT_NAME}"))


def checkpoint_file(service: ServiceContext, job_id: str, index: int) -> Path:
    with service.session() as session:
        uri = session.get(BlockCheckpoint, (job_id, index)).uri
    return Path(uri.removeprefix("file://"))


def published_sha(client: TestClient, headers: Headers, service: ServiceContext, job_id: str) -> str:
    """The artifact's sha256 as the API reports it, checked against the bytes in the store."""
    r = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers)
    assert r.status_code == 200, r.text
    [artifact] = r.json()
    assert artifact["name"] == ARTIFACT_NAME
    assert hashlib.sha256(artifact_file(service, job_id).read_bytes()).hexdigest() == artifact["sha256"]
    return artifact["sha256"]


def assert_succeeded(client: TestClient, headers: Headers, job_id: str) -> dict[str, Any]:
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "succeeded", job
    assert job["error"] is None and job["finished_at"] is not None
    assert job["current_block"] == job["total_blocks"] == N_BLOCKS
    return job


def retry(client: TestClient, headers: Headers, job_id: str) -> None:
    r = client.post(f"/v1/jobs/{job_id}/retry", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued" and r.json()["attempts"] == 0


def mark_failed_after_calibration(service: ServiceContext, job_id: str) -> None:
    """Only failed or cancelled jobs can be retried (a succeeded one answers 409): put the job where a worker that
    calibrated every block but died before publishing, on its last attempt, leaves it (the reaper's verdict)."""
    set_job(service, job_id, status=JobStatus.FAILED.value, error="worker lost: lease expired", finished_at=utcnow())


# ----------------------------------------------------------------------------------------------- 1. claiming


def test_claim_is_exclusive_between_racing_workers(client, service, headers, job_body):
    for _ in range(3):
        job_id = submit(client, headers, job_body())
        runners = [JobRunner(service, "w1"), JobRunner(service, "w2")]
        barrier, results = threading.Barrier(2), [None, None]

        def claim(i: int) -> None:
            barrier.wait()
            results[i] = runners[i].claim(job_id)

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        leases = [lease for lease in results if lease is not None]
        assert len(leases) == 1, results
        [lease] = leases
        assert isinstance(lease, Lease) and lease.job_id == job_id
        row = job_row(service, job_id)
        assert row.status == "running" and row.attempts == 1
        assert (row.lease_owner, row.lease_token) == (lease.owner, lease.token)
        assert row.started_at is not None and row.lease_expires_at > utcnow()
        assert kinds(events(service, job_id)) == ["queued", "started"]
        assert f"attempt 1 on {lease.owner}" in events(service, job_id)[-1].message

        # A job that is not queued is not claimed again, by anyone, and nothing about it changes.
        for runner in runners:
            assert runner.claim(job_id) is None
        again = job_row(service, job_id)
        assert (again.attempts, again.lease_token, again.lease_owner) == (1, lease.token, lease.owner)


def test_claim_returns_none_for_jobs_that_are_not_queued(client, service, headers, job_body):
    runner = JobRunner(service, "w1")
    cancelled = submit(client, headers, job_body())
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=headers).json()["status"] == "cancelled"
    assert runner.claim(cancelled) is None
    assert job_row(service, cancelled).attempts == 0
    assert runner.claim(uuid.uuid4().hex) is None
    assert runner.claim_next(["default", "large"]) is None


def test_attempts_count_every_claim(client, service, headers, job_body):
    job_id = submit(client, headers, job_body())
    for attempt in (1, 2, 3):
        lease = JobRunner(service, f"w{attempt}").claim(job_id)
        assert lease is not None and job_row(service, job_id).attempts == attempt
        set_job(service, job_id, status="queued", lease_token=None, lease_owner=None)  # as the reaper requeues
    started = [e.message for e in events(service, job_id) if e.kind == "started"]
    assert started == ["attempt 1 on w1", "attempt 2 on w2", "attempt 3 on w3"]


def test_claim_next_takes_priority_then_age_within_the_given_gpu_classes(client, service, headers, job_body):
    now = utcnow()
    jobs = {}
    for name, priority, gpu_class, age in [("old", 0, "default", 30), ("new", 0, "default", 10),
                                           ("urgent", 5, "default", 5), ("large", 50, "large", 60)]:
        jobs[name] = submit(client, headers, job_body(priority=priority, gpu_class=gpu_class))
        set_job(service, jobs[name], created_at=now - timedelta(seconds=age))
    runner = JobRunner(service, "w1")
    claimed = []
    while (lease := runner.claim_next(["default"])) is not None:
        claimed.append(lease.job_id)
    assert claimed == [jobs["urgent"], jobs["old"], jobs["new"]]  # never the (higher-priority) job of another class
    assert job_row(service, jobs["large"]).status == "queued"
    assert runner.claim_next(["other"]) is None
    lease = runner.claim_next(["default", "large"])
    assert lease is not None and lease.job_id == jobs["large"]
    assert runner.claim_next(["default", "large"]) is None


# ----------------------------------------------------------------------------------------------- 2. fencing


def test_stale_worker_is_fenced_after_the_reaper_handed_its_job_to_another(client, service, headers, job_body):
    job_id = submit(client, headers, job_body())
    w1, w2 = JobRunner(service, "w1"), JobRunner(service, "w2")
    stale = w1.claim(job_id)
    assert w1.fenced_update(stale, current_block=1)  # while it holds the lease, its writes land

    # w1 freezes; its lease expires, the reaper requeues the job, w2 claims it.
    set_job(service, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert reap_expired(service) == [job_id]
    assert w1.fenced_update(stale, current_block=2) is False  # queued: no owner
    lease = w2.claim(job_id)
    assert lease is not None and lease.token != stale.token
    assert w1.fenced_update(stale, current_block=3, error="stale") is False
    row = job_row(service, job_id)
    assert (row.current_block, row.error, row.lease_owner, row.attempts) == (1, None, "w2", 2)

    # w1 wakes up and carries on: it notices the lost lease at its first cancel check and writes nothing.
    mark = last_event_id(service, job_id, "started")
    w1.execute(stale)
    row = job_row(service, job_id)
    assert (row.status, row.lease_token, row.lease_owner, row.error, row.finished_at) == \
           ("running", lease.token, "w2", None, None)
    assert events(service, job_id, after=mark) == []
    assert count(service, Artifact, Artifact.job_id == job_id) == 0
    assert count(service, BlockCheckpoint, BlockCheckpoint.job_id == job_id) == 0
    assert artifact_files(service, job_id) == []

    # The new owner is unaffected and finishes the job.
    w2.execute(lease)
    assert_succeeded(client, headers, job_id)
    assert job_row(service, job_id).attempts == 2


def test_worker_losing_its_lease_mid_run_stops_without_writing(client, service, headers, job_body):
    job_id = submit(client, headers, job_body())
    runner = JobRunner(service, "w1")
    stale = runner.claim(job_id)
    done = threading.Thread(target=runner.execute, args=(stale,))
    done.start()
    try:
        deadline = time.monotonic() + 60
        while job_row(service, job_id).current_block < 1:  # block 0 calibrated, 4 more to go
            assert done.is_alive() and time.monotonic() < deadline, "the run ended before block 1"
            time.sleep(0.01)
        # Another worker now owns the job (as after a reap and a new claim). The swap is conditional on the old
        # token, so it cannot land after the run had finished; the events written so far are read in the same
        # transaction, so anything later is the stale worker's.
        new_token = new_id()
        with service.session() as session:
            swapped = session.execute(
                update(Job).where(Job.id == job_id, Job.lease_token == stale.token, Job.status == "running")
                .values(lease_token=new_token, lease_owner="w2", current_block=0)).rowcount
            mark = session.scalar(select(func.max(JobEvent.id)).where(JobEvent.job_id == job_id))
            session.commit()
        assert swapped == 1, "the run finished before the lease could be taken over"
    finally:
        done.join(60)
    assert not done.is_alive()
    row = job_row(service, job_id)
    assert (row.status, row.lease_token, row.lease_owner) == ("running", new_token, "w2")
    assert (row.current_block, row.error, row.finished_at) == (0, None, None)  # no progress written by w1 either
    assert kinds(events(service, job_id, after=mark)) == []
    assert count(service, Artifact, Artifact.job_id == job_id) == 0
    assert artifact_files(service, job_id) == []
    with service.session() as session:  # the stale worker's later checkpoints were neither recorded nor kept
        recorded = {Path(uri.removeprefix("file://")) for uri in session.scalars(
            select(BlockCheckpoint.uri).where(BlockCheckpoint.job_id == job_id))}
    assert set((store_root(service) / "jobs" / job_id / "checkpoints").glob("*")) == recorded
    assert all(stale.token in path.name for path in recorded)
    # the blocks ended before the takeover, and one more whose checkpoint was saved but not yet its block_end (on a
    # loaded machine the poll above may see block 1 late: a fixed count of 2 failed)
    ended = [e for e in events(service, job_id) if e.kind == "block_end" and e.id <= mark]
    assert len(recorded) <= len(ended) + 1


# ----------------------------------------------------------------------------------------------- 3. reaper


def test_reaper_requeues_fails_and_resends(client, service, headers, job_body, settings):
    dispatcher = RecordingDispatcher()
    reaper_seconds = 600  # longer than this test: its jobs stay recently queued until they are backdated
    ctx = ServiceContext.from_settings(settings.model_copy(update={"REAPER_SECONDS": reaper_seconds}),
                                       dispatcher=dispatcher)
    try:
        ids = {name: submit(client, headers, job_body(gpu_class=gpu_class))
               for name, gpu_class in [("expired", "large"), ("exhausted", "default"), ("alive", "default"),
                                       ("waiting", "large"), ("fresh", "default")]}
        leases = {name: JobRunner(ctx, f"w-{name}").claim(ids[name]) for name in ("expired", "exhausted", "alive")}
        past = utcnow() - timedelta(seconds=1)
        set_job(ctx, ids["expired"], lease_expires_at=past)
        set_job(ctx, ids["exhausted"], lease_expires_at=past, attempts=3)
        alive_before = job_row(ctx, ids["alive"])

        assert reap_expired(ctx) == [ids["expired"]]
        assert dispatcher.sent == [(ids["expired"], "large")]

        expired = job_row(ctx, ids["expired"])
        assert (expired.status, expired.lease_token, expired.lease_owner, expired.lease_expires_at) == \
               ("queued", None, None, None)
        assert expired.attempts == 1
        [requeued] = [e for e in events(ctx, ids["expired"]) if e.kind == "requeued"]
        assert "w-expired" in requeued.message and "attempt 1 of 3" in requeued.message

        exhausted = job_row(ctx, ids["exhausted"])
        assert exhausted.status == "failed" and exhausted.finished_at is not None
        assert exhausted.lease_token is None
        assert "lease" in exhausted.error and "retry" in exhausted.error and "w-exhausted" in exhausted.error
        assert events(ctx, ids["exhausted"])[-1].kind == "failed"
        api_view = client.get(f"/v1/jobs/{ids['exhausted']}", headers=headers).json()
        assert api_view["status"] == "failed" and "lease" in api_view["error"]

        alive = job_row(ctx, ids["alive"])
        assert (alive.status, alive.lease_token, alive.lease_expires_at, alive.updated_at) == \
               ("running", leases["alive"].token, alive_before.lease_expires_at, alive_before.updated_at)
        assert "requeued" not in kinds(events(ctx, ids["alive"]))

        assert job_row(ctx, ids["waiting"]).status == job_row(ctx, ids["fresh"]).status == "queued"

        # Jobs queued within a reaper period are left alone: their submitter's wake-up may still be on its way.
        woken: dict = {}
        assert wake_stranded(ctx, woken) == [] and len(dispatcher.sent) == 1
        for name in ("expired", "waiting", "fresh"):
            set_job(ctx, ids[name], updated_at=utcnow() - timedelta(seconds=reaper_seconds))
        # The broker's queues are empty (messages lost): one wake-up per class, then none until its queue changes.
        assert sorted(wake_stranded(ctx, woken)) == ["default", "large"]
        assert sorted(dispatcher.sent[1:]) == sorted([(min(ids["expired"], ids["waiting"]), "large"),
                                                      (ids["fresh"], "default")])
        assert reap_expired(ctx) == [] and wake_stranded(ctx, woken) == [] and len(dispatcher.sent) == 3
        assert JobRunner(ctx, "w-expired").fenced_update(leases["expired"], current_block=1) is False

        # The requeued job is claimed again (attempt 2); the exhausted one waits for a manual retry.
        lease = JobRunner(ctx, "w9").claim(ids["expired"])
        assert lease is not None and job_row(ctx, ids["expired"]).attempts == 2
        assert wake_stranded(ctx, woken) == ["large"]  # its class's queued jobs changed
        assert JobRunner(ctx, "w9").claim(ids["exhausted"]) is None
    finally:
        ctx.close()


# ----------------------------------------------------------------------------------------------- 4. checkpoints


def test_corrupt_or_missing_checkpoints_are_recomputed_to_the_same_artifact(client, service, headers, job_body):
    job_id = submit(client, headers, job_body())
    JobRunner(service, "w1").run(job_id)
    assert_succeeded(client, headers, job_id)
    first_sha = published_sha(client, headers, service, job_id)
    first = events(service, job_id)
    assert blocks_of(first, "block_start") == blocks_of(first, "block_end") == list(range(N_BLOCKS))
    assert count(service, BlockCheckpoint, BlockCheckpoint.job_id == job_id) == N_BLOCKS

    # Flip bytes in the middle of block 2's stored checkpoint (the file stays a plausible size).
    path = checkpoint_file(service, job_id, 2)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    mark_failed_after_calibration(service, job_id)
    retry(client, headers, job_id)
    mark = last_event_id(service, job_id, "retried")
    JobRunner(service, "w2").run(job_id)

    assert_succeeded(client, headers, job_id)
    after = events(service, job_id, after=mark)
    [corrupt] = [e for e in after if e.kind == "checkpoint_corrupt"]
    assert "block 2" in corrupt.message and "sha256" in corrupt.message
    assert blocks_of(after, "block_resumed") == [0, 1]
    assert blocks_of(after, "block_start") == blocks_of(after, "block_end") == [2, 3, 4]
    assert kinds(after)[-1] == "succeeded" and "failed" not in kinds(after)
    assert client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["run"]["resumed_blocks"] == 2
    assert published_sha(client, headers, service, job_id) == first_sha  # the recomputation is deterministic
    assert count(service, Artifact, Artifact.job_id == job_id) == 1

    # A checkpoint row whose file has gone: recomputed from there, not a crash.
    checkpoint_file(service, job_id, 3).unlink()
    mark_failed_after_calibration(service, job_id)
    retry(client, headers, job_id)
    mark = last_event_id(service, job_id, "retried")
    JobRunner(service, "w3").run(job_id)

    assert_succeeded(client, headers, job_id)
    after = events(service, job_id, after=mark)
    [missing] = [e for e in after if e.kind == "checkpoint_corrupt"]
    assert "block 3" in missing.message and "missing" in missing.message
    assert blocks_of(after, "block_resumed") == [0, 1, 2]
    assert blocks_of(after, "block_start") == [3, 4]
    assert checkpoint_file(service, job_id, 3).exists()
    assert published_sha(client, headers, service, job_id) == first_sha


# ----------------------------------------------------------------------------------------------- 5. failures


def assert_failed_cleanly(client: TestClient, headers: Headers, service: ServiceContext, job_id: str) -> str:
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["status"] == "failed", job
    assert job["finished_at"] is not None and job["attempts"] == 1 and job["worker"] == "w1"
    assert not job["error"].startswith("internal error"), job["error"]
    row = job_row(service, job_id)
    assert row.lease_token is None and row.lease_expires_at is None
    evs = events(service, job_id)
    assert evs[-1].kind == "failed" and evs[-1].message == job["error"]
    assert count(service, Artifact, Artifact.job_id == job_id) == 0
    assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json() == []
    assert artifact_files(service, job_id) == []
    assert client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).status_code == 404
    return job["error"]


def test_unreachable_hub_dataset_fails_the_job_readably(client, service, headers, monkeypatch):
    from huggingface_hub import constants

    calibration = {"source": "hf", "name": "wikitext", "config": "wikitext-2-raw-v1", "split": "train"}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the API believes the hub reachable...
    job_id = submit(client, headers, copy.deepcopy(TINY_JOB) | {"calibration": calibration})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # ...the worker cannot reach it
    JobRunner(service, "w1").run(job_id)
    error = assert_failed_cleanly(client, headers, service, job_id)
    assert "hf:wikitext:wikitext-2-raw-v1:train" in error
    assert "Hugging Face hub" in error and "offline" in error


def test_dataset_with_too_few_tokens_fails_the_job_readably(client, service, headers):
    # ~2 characters per token: 600 characters pass the API's cheap check (more characters than seqlen) but hold
    # fewer than the 512 tokens one window needs.
    text = EVAL_TEXT.read_text(encoding="utf-8")[:600]
    r = client.post("/v1/datasets", files={"file": ("short.txt", text.encode(), "text/plain")}, headers=headers)
    assert r.status_code == 201, r.text
    body = copy.deepcopy(TINY_JOB) | {"calibration": {"source": "upload", "dataset_id": r.json()["id"]}}
    body["config"]["seqlen"] = 512
    job_id = submit(client, headers, body)
    JobRunner(service, "w1").run(job_id)
    error = assert_failed_cleanly(client, headers, service, job_id)
    assert "calibration text has" in error and "tokens" in error and "seqlen=512" in error


# ----------------------------------------------------------------------------------------------- 6. cancel


def test_cancel_of_a_claimed_job_ends_cancelled_and_retry_succeeds(client, service, headers, job_body):
    job_id = submit(client, headers, job_body())
    runner = JobRunner(service, "w1")
    lease = runner.claim(job_id)
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["cancel_requested"]) == ("running", True)

    runner.execute(lease)
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert (job["status"], job["error"]) == ("cancelled", None)
    assert job["finished_at"] is not None
    evs = events(service, job_id)
    assert kinds(evs)[-1] == "cancelled" and "failed" not in kinds(evs)
    assert blocks_of(evs, "block_start") == []  # stopped before calibrating, while measuring the RTN baselines
    assert count(service, Artifact, Artifact.job_id == job_id) == 0
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 409
    checkpoints = count(service, BlockCheckpoint, BlockCheckpoint.job_id == job_id)

    retry(client, headers, job_id)
    assert job_row(service, job_id).cancel_requested is False
    JobRunner(service, "w2").run(job_id)
    assert_succeeded(client, headers, job_id)
    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()
    assert metrics["run"]["resumed_blocks"] == checkpoints
    assert set(metrics["eval"]["baselines"]["rtn"]) == {"w", "wkv"}
    assert published_sha(client, headers, service, job_id)


# ----------------------------------------------------------------------------------------------- 7. Celery


def test_celery_is_configured_for_long_tasks_acknowledged_when_done(tmp_path):
    settings = service_settings(f"sqlite:///{tmp_path}/unused.db", str(tmp_path / "store"), BROKER_URL=REDIS_URL)
    config = celery_config(settings)
    assert config["task_acks_late"] is True
    assert config["task_reject_on_worker_lost"] is True
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_ignore_result"] is True
    assert config["broker_transport_options"]["visibility_timeout"] > config["task_time_limit"]
    # the worker enforces JOB_TIME_LIMIT_SECONDS itself (tests/service/test_cancel.py); Celery's limit is a backstop
    assert settings.JOB_TIME_LIMIT_SECONDS < config["task_time_limit"] <= settings.JOB_TIME_LIMIT_SECONDS + 600

    app = create_celery(settings, runner=None, gpu_classes=["default"])  # the runner is only called when a task runs
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1 and app.conf.task_ignore_result
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    task = app.tasks[RUN_TASK]
    assert RUN_TASK == "calibration.run"
    assert task.acks_late is True and task.reject_on_worker_lost is True and task.ignore_result is True


def test_celery_dispatcher_routes_to_the_queue_of_the_gpu_class(tmp_path):
    redis = pytest.importorskip("redis")
    queues = [f"wkvq-test-{uuid.uuid4().hex[:8]}-{name}" for name in ("default", "large")]
    settings = service_settings(f"sqlite:///{tmp_path}/unused.db", str(tmp_path / "store"), BROKER_URL=REDIS_URL,
                                GPU_CLASSES=queues, DISPATCHER="celery")
    client = redis.Redis.from_url(REDIS_URL)
    dispatcher = CeleryDispatcher(settings)
    try:
        dispatcher.ping()
        job_id = new_id()
        dispatcher.enqueue(job_id, queues[1])
        assert client.llen(queues[0]) == 0
        assert client.llen(queues[1]) == 1
        message = json.loads(client.lindex(queues[1], 0))
        assert message["headers"]["task"] == RUN_TASK
        assert message["headers"]["argsrepr"] in (repr([job_id]), repr((job_id,)))
        assert message["properties"]["delivery_info"]["routing_key"] == queues[1]
    finally:
        client.delete(*queues, *(f"_kombu.binding.{q}" for q in queues))
        dispatcher.app.close()
        client.close()


def test_job_config_applies_the_method_and_older_jobs_stay_on_the_paper():
    config = QuantConfig().model_dump()
    assert config["method"] == "recommended"
    assert job_config({"config": config}).kv == kv_config("recommended", bits=4, group_size=None)
    assert job_config({"config": config | {"method": "paper"}}).kv == KVQuantConfig()
    stored_before_methods = {k: v for k, v in config.items() if k != "method"}
    assert job_config({"config": stored_before_methods}).kv == KVQuantConfig()
