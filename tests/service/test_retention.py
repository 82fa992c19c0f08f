"""Retention (docs/service.md, "A job's data, and when it goes"): DELETE of jobs and datasets over real HTTP, storage
quotas, checkpoints collected after success, bounded event logs, and scratch directories of killed workers removed
at worker start. SQLite and Postgres."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from api.core.db import utcnow
from api.jobs import service as job_service_module
from api.models import Artifact, BlockCheckpoint, Dataset, Job, JobEvent, JobMetrics
from api.teams.service import team_service
from worker.reaper import reap_expired
from worker.retention import purge_deleted, remove_stale_workdirs
from worker.runner import JobRunner

from .conftest import TINY_JOB
from .processes import REPO

TEXT = "Once upon a time there was a little robot who loved to read stories every night. " * 12


@pytest.fixture
def api(live_server, team_headers):
    headers = team_headers("a")
    with httpx.Client(base_url=live_server, headers=headers, timeout=30) as client:
        yield client


def submit(api: httpx.Client, body: dict = TINY_JOB) -> str:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def count(service, model, *where) -> int:
    with service.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def set_job(service, job_id: str, **values) -> None:
    with service.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(**values))
        session.commit()


def give_objects(service, job_id: str) -> list[str]:
    """A finished job's artifact, two block checkpoints and metrics, as a worker leaves them."""
    uris = []
    with service.session() as session:
        for index in range(2):
            stored = service.store.put_bytes(b"ckpt%d" % index, f"jobs/{job_id}/checkpoints/block-{index:04d}-t.safetensors")
            session.add(BlockCheckpoint(job_id=job_id, block_index=index, uri=stored.uri, sha256=stored.sha256,
                                        size=stored.size))
            uris.append(stored.uri)
        stored = service.store.put_bytes(b"t" * 200, f"jobs/{job_id}/t-model.tar")
        session.add(Artifact(job_id=job_id, name="model.tar", uri=stored.uri, sha256=stored.sha256, size=stored.size,
                             media_type="application/x-tar"))
        session.add(JobMetrics(job_id=job_id, metrics={"eval": {}}))
        session.commit()
    return uris + [stored.uri]


def test_deleting_a_finished_job_removes_its_objects_and_keeps_a_tombstone(service, api):
    job_id = submit(api)
    set_job(service, job_id, status="succeeded", finished_at=utcnow())
    uris = give_objects(service, job_id)
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert not any(service.store.exists(uri) for uri in uris)
    for model in (Artifact, BlockCheckpoint, JobEvent, JobMetrics):
        assert count(service, model, model.job_id == job_id) == 0
    assert count(service, Job, Job.id == job_id, Job.deleted_at.is_not(None)) == 1  # the tombstone
    for path in ("", "/artifacts", "/metrics", "/events", "/cancel", "/retry"):
        method = "POST" if path in ("/cancel", "/retry") else "GET"
        response = api.request(method, f"/v1/jobs/{job_id}{path}")
        assert response.status_code == 410 and "was deleted" in response.text, (path, response.text)
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 410
    assert job_id not in [job["id"] for job in api.get("/v1/jobs").json()["data"]]


def test_deleting_a_queued_job_cancels_it_and_its_key_is_not_reused(service, api):
    key = {"Idempotency-Key": "nightly-1"}
    job_id = api.post("/v1/jobs", json=TINY_JOB, headers=key).json()["id"]
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert count(service, Job, Job.id == job_id, Job.status == "cancelled") == 1
    assert JobRunner(service, "w1").claim_next(["default"]) is None
    replay = api.post("/v1/jobs", json=TINY_JOB, headers=key)
    assert replay.status_code == 410 and "was deleted" in replay.text


def test_deleting_a_running_job_cancels_it_and_purges_once_it_stopped(service, api):
    job_id = submit(api)
    assert JobRunner(service, "w1").claim(job_id) is not None
    uris = give_objects(service, job_id)
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 202
    assert count(service, Job, Job.id == job_id, Job.cancel_requested.is_(True)) == 1
    assert all(service.store.exists(uri) for uri in uris)  # its worker may still be writing
    set_job(service, job_id, lease_expires_at=utcnow())  # the worker died: the reaper ends the job cancelled
    reap_expired(service)
    assert purge_deleted(service) == [job_id]
    assert not any(service.store.exists(uri) for uri in uris)
    assert count(service, JobEvent, JobEvent.job_id == job_id) == 0
    assert purge_deleted(service) == []


def test_a_publishing_job_cannot_be_deleted_yet(service, api):
    job_id = submit(api)
    JobRunner(service, "w1").claim(job_id)
    set_job(service, job_id, stage="publishing")
    response = api.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 409 and "once it has succeeded" in response.text
    assert count(service, Job, Job.id == job_id, Job.deleted_at.is_(None)) == 1


def test_a_dataset_in_use_is_kept_until_its_jobs_are_gone(service, api):
    dataset = api.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())}).json()
    job_id = submit(api, TINY_JOB | {"calibration": {"source": "upload", "dataset_id": dataset["id"]}})
    refused = api.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409 and job_id in refused.text
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    with service.session() as session:
        uri = session.get(Dataset, dataset["id"]).uri
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert not service.store.exists(uri) and count(service, Dataset) == 0
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 404


def test_another_teams_job_and_dataset_cannot_be_deleted(service, api, live_server, team_headers):
    job_id = submit(api)
    dataset = api.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())}).json()
    other = team_headers("b")
    assert httpx.delete(f"{live_server}/v1/jobs/{job_id}", headers=other).status_code == 404
    assert httpx.delete(f"{live_server}/v1/datasets/{dataset['id']}", headers=other).status_code == 404
    assert count(service, Job, Job.deleted_at.is_(None)) == 1 and count(service, Dataset) == 1


def test_the_storage_quota_refuses_uploads_and_submissions_clearly(service, api):
    with service.session() as session:
        team_service.configure(session, name="a", storage_quota_bytes=len(TEXT) + 100)
    first = api.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())})
    assert first.status_code == 201
    second = api.post("/v1/datasets", files={"file": ("more.txt", TEXT.encode())})
    assert second.status_code == 413 and "storage quota is full" in second.json()["detail"]
    refused = api.post("/v1/jobs", json=TINY_JOB)  # 100 bytes left: not the room its checkpoints and artifact need
    assert refused.status_code == 409 and "DELETE /v1/jobs/ID" in refused.json()["detail"]
    with service.session() as session:
        team_service.configure(session, name="a", storage_quota_bytes=0)  # the service default: room for a job
    job_id = submit(api)
    reserve = sum(api.get(f"/v1/jobs/{job_id}").json()["estimate"]["breakdown"]["storage"].values())
    set_job(service, job_id, status="succeeded")
    give_objects(service, job_id)
    with service.session() as session:  # room for one job's reservation besides the dataset: full with the job's objects
        team_service.configure(session, name="a", storage_quota_bytes=len(TEXT) + reserve)
    refused = api.post("/v1/jobs", json=TINY_JOB)
    assert refused.status_code == 409 and "DELETE /v1/jobs/ID" in refused.json()["detail"]
    assert api.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert api.post("/v1/jobs", json=TINY_JOB).status_code == 201


def test_a_jobs_event_log_is_bounded(service, api, monkeypatch):
    monkeypatch.setattr(job_service_module, "MAX_EVENTS_PER_JOB", 20)
    job_id = submit(api)
    for _ in range(15):  # each round: cancelled + retried
        assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        assert api.post(f"/v1/jobs/{job_id}/retry").status_code == 200
    with service.session() as session:
        kinds = list(session.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    assert len(kinds) == 20 and kinds[-1] == "retried"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_checkpoints_are_collected_after_success_unless_kept(service, api):
    service.settings.KEEP_CHECKPOINTS = False
    job_id = submit(api)
    JobRunner(service, "w1").run(job_id)
    assert count(service, Job, Job.id == job_id, Job.status == "succeeded") == 1
    assert count(service, BlockCheckpoint, BlockCheckpoint.job_id == job_id) == 0
    store = Path(service.settings.STORAGE_URL.removeprefix("file://"))
    assert list((store / "jobs" / job_id / "checkpoints").glob("*.safetensors")) == []
    assert count(service, Artifact, Artifact.job_id == job_id) == 1


def test_scratch_directories_of_killed_workers_are_removed_at_worker_start(tmp_path):
    """A process makes a job's scratch directory as a worker does, then is killed with SIGKILL; the next worker
    start removes it and leaves the directory of a live worker alone."""
    job = uuid.uuid4().hex
    script = ("import os, signal, tempfile; from worker.retention import workdir_prefix; "
              f"tempfile.mkdtemp(prefix=workdir_prefix({job!r}), dir={str(tmp_path)!r}); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)})
    assert killed.returncode == -9
    [stale] = tmp_path.glob(f"wkvq-{job}-*")
    (stale / "calibration.txt").write_text(TEXT)
    live = Path(tempfile.mkdtemp(prefix=f"wkvq-{uuid.uuid4().hex}-{os.getpid()}-", dir=tmp_path))
    assert remove_stale_workdirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
