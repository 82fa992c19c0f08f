"""The job state machine (`api/jobs/states.py`) under racing requests over real HTTP, SQLite and Postgres: retry,
cancel and delete sent at once on failed and cancelled jobs leave no job both deleted and queued or running."""

from __future__ import annotations

import functools

import httpx
import pytest
from sqlalchemy import select

from api.models import Job, JobEvent

from .conftest import TINY_JOB, at_once
from .test_metrics import scrape, value
from .test_retention import TEXT, api, count, set_job, submit  # noqa: F401  (api: the fixture)

ROUNDS = 30


def send(live_server: str, headers: dict, method: str, path: str) -> int:
    return httpx.request(method, f"{live_server}{path}", headers=headers, timeout=60).status_code


@pytest.mark.parametrize("racers", [("retry",), ("retry", "cancel")])
def test_retry_and_cancel_racing_delete_leave_no_zombie(service, api, live_server, team_headers, racers):
    """The reported race: a retry committed between DELETE's read and its write left jobs queued *and* deleted,
    never run nor purged, counted as queued in /metrics and holding their dataset forever."""
    dataset = api.post("/v1/datasets", files={"file": ("calib.txt", TEXT.encode())}).json()
    body = TINY_JOB | {"calibration": {"source": "upload", "dataset_id": dataset["id"]}}
    headers = dict(api.headers)
    deletes = {}
    for round_ in range(ROUNDS):
        job_id = submit(api, body)
        if round_ % 2:
            set_job(service, job_id, status="failed", error="lost")
        else:
            assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        requests = [("POST", f"/v1/jobs/{job_id}/{action}") for action in racers] + [("DELETE", f"/v1/jobs/{job_id}")]
        *_, deletes[job_id] = at_once([functools.partial(send, live_server, headers, *request) for request in requests])
    ids = list(deletes)

    with service.session() as session:
        rows = session.execute(select(Job.id, Job.status, Job.deleted_at).where(Job.id.in_(ids))).all()
    zombies = [(job_id, status) for job_id, status, deleted_at in rows if status in ("queued", "running")]
    assert zombies == [], f"{len(zombies)} of {ROUNDS} deleted jobs left queued or running"
    assert all(deleted_at is not None for _, _, deleted_at in rows)
    assert set(deletes.values()) == {204}  # stopped at once: no job left to stop
    assert count(service, JobEvent, JobEvent.job_id.in_(ids)) == 0  # every deleted job purged
    metrics = scrape(httpx.Client(base_url=live_server))
    assert value(metrics, "wkvq_jobs", status="queued") == value(metrics, "wkvq_jobs", status="running") == 0
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
