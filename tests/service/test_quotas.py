"""Storage quotas hold under concurrency (uploads and submissions reserve in one transaction per team), and per-team
submission limits (queued jobs, submissions a minute) answer 429 with Retry-After, counted in the database: over
real HTTP, on both databases, with two API processes where it matters."""

from __future__ import annotations

from http.cookies import SimpleCookie
from pathlib import Path

import httpx
from sqlalchemy import func, select

from api.dashboard.web import COOKIE
from api.models import Artifact, BlockCheckpoint, Dataset, Job
from api.teams.service import team_service
from api.teams.usage import usage_service
from worker.runner import JobRunner

from .conftest import TINY_JOB, at_once
from .processes import admin_key, service_env, start_server

TEXT = ("Once upon a time there was a little robot who loved to read stories every night. " * 400).encode()[:30_000]


def configure(service, team: str, **limits) -> None:
    with service.session() as session:
        team_service.configure(session, name=team, **limits)


def stored_bytes(service, team: str) -> int:
    with service.session() as session:
        return usage_service.stored_bytes(session, team_service.get_team(session, name=team).id)


def test_concurrent_uploads_never_store_more_than_the_quota(service, live_server, team_headers):
    headers, quota = team_headers("a"), 100_000
    configure(service, "a", storage_quota_bytes=quota)
    upload = lambda: httpx.post(f"{live_server}/v1/datasets", headers=headers, timeout=60,  # noqa: E731
                                files={"file": ("calib.txt", TEXT, "text/plain")})
    answers = at_once([upload] * 10)
    assert sorted(a.status_code for a in answers) == [201] * (quota // len(TEXT)) + [413] * (10 - quota // len(TEXT))
    assert all("storage quota is full" in a.json()["detail"] for a in answers if a.status_code == 413)
    assert stored_bytes(service, "a") == quota // len(TEXT) * len(TEXT) <= quota
    with service.session() as session:  # a refused upload leaves no object behind
        uris = set(session.scalars(select(Dataset.uri)))
    assert {f"file://{p}" for p in (Path(service.store.root) / "datasets").rglob("*.txt")} == uris


def test_submissions_reserve_their_storage_and_accepted_jobs_end_within_the_quota(service, live_server, team_headers):
    headers = team_headers("a")
    first = httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, headers=headers, timeout=60).json()
    reserve = sum(first["estimate"]["breakdown"]["storage"].values())
    quota = int(2.5 * reserve)  # room for two jobs' reservations
    configure(service, "a", storage_quota_bytes=quota)
    submit = lambda: httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, headers=headers, timeout=60)  # noqa: E731
    answers = at_once([submit] * 4)
    assert sorted(a.status_code for a in answers) == [201, 409, 409, 409]
    refusal = next(a.json()["detail"] for a in answers if a.status_code == 409)
    assert "used" in refusal and "reserved" in refusal and "quota" in refusal and "reserves" in refusal
    accepted = [first["id"]] + [a.json()["id"] for a in answers if a.status_code == 201]
    for job_id in accepted:
        JobRunner(service, "w1").run(job_id)
        assert httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=headers).json()["status"] == "succeeded"
    with service.session() as session:  # the bound: each job stores no more than it reserved
        for job_id in accepted:
            used = sum(session.scalar(select(func.coalesce(func.sum(model.size), 0)).where(model.job_id == job_id))
                       for model in (Artifact, BlockCheckpoint))
            assert 0 < used <= session.get(Job, job_id).reserved_bytes
        team = team_service.get_team(session, name="a")
        assert usage_service.reserved_bytes(session, team.id) == 0  # released once the jobs ended
    assert stored_bytes(service, "a") <= quota


def test_submissions_per_minute_are_limited_across_api_processes(service, live_server, team_headers, db_url, tmp_path):
    """Two API processes on one database (this one and a `wkvq serve`): 8 submissions at once, a limit of 3."""
    env = service_env(db_url, tmp_path / "store")
    server, other_base = start_server(env, tmp_path, "--workers", "0")
    try:
        headers = {"Authorization": f"Bearer {admin_key(env, tmp_path, 'a')}"}
        configure(service, "a", max_submissions_per_minute=3)
        submit = lambda base: lambda: httpx.post(f"{base}/v1/jobs", json=TINY_JOB, headers=headers,  # noqa: E731
                                                 timeout=60)
        answers = at_once([submit(live_server), submit(other_base)] * 4)
    finally:
        server.stop()
    assert sorted(a.status_code for a in answers) == [201] * 3 + [429] * 5
    for refused in (a for a in answers if a.status_code == 429):
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert "3 jobs in the last minute" in refused.json()["detail"]
    other = httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, headers=team_headers("b"), timeout=60)
    assert other.status_code == 201, other.text  # another team's limit is its own


def test_queued_jobs_are_limited(service, live_server, team_headers):
    headers = team_headers("a")
    configure(service, "a", max_queued=2)
    submit = lambda: httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, headers=headers, timeout=60)  # noqa: E731
    answers = at_once([submit] * 5)
    assert sorted(a.status_code for a in answers) == [201, 201, 429, 429, 429]
    refused = next(a for a in answers if a.status_code == 429)
    assert int(refused.headers["Retry-After"]) > 0 and "2 jobs queued" in refused.json()["detail"]
    started = next(a.json()["id"] for a in answers if a.status_code == 201)
    assert httpx.post(f"{live_server}/v1/jobs/{started}/cancel", headers=headers).status_code == 200
    assert submit().status_code == 201  # a place in the queue is free again


def test_a_retry_reserves_again_within_the_quota_and_the_queue_limit(service, live_server, team_headers):
    headers = team_headers("a")
    post = lambda path, **kw: httpx.post(f"{live_server}{path}", headers=headers, timeout=60, **kw)  # noqa: E731
    status = lambda job_id: httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=headers).json()["status"]  # noqa: E731
    first = post("/v1/jobs", json=TINY_JOB).json()
    configure(service, "a", storage_quota_bytes=int(1.5 * sum(first["estimate"]["breakdown"]["storage"].values())))
    assert post(f"/v1/jobs/{first['id']}/cancel").status_code == 200
    second = post("/v1/jobs", json=TINY_JOB)
    assert second.status_code == 201, second.text  # the cancelled job reserves nothing
    refused = post(f"/v1/jobs/{first['id']}/retry")
    assert refused.status_code == 409 and "storage quota is full" in refused.json()["detail"]
    assert status(first["id"]) == "cancelled"
    assert post(f"/v1/jobs/{second.json()['id']}/cancel").status_code == 200
    retried = post(f"/v1/jobs/{first['id']}/retry")
    assert retried.status_code == 200, retried.text

    configure(service, "a", max_queued=1)
    refused = post(f"/v1/jobs/{second.json()['id']}/retry")
    assert refused.status_code == 429 and "1 jobs queued, its limit is 1" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) > 0 and status(second.json()["id"]) == "cancelled"


def test_the_new_job_form_shows_a_refusal_as_a_page_message(service, live_server, team_headers):
    signed_in = httpx.post(f"{live_server}/dashboard/signin", timeout=30,
                           data={"api_key": team_headers("a")["Authorization"].split()[1]})
    cookie = SimpleCookie(signed_in.headers["set-cookie"])[COOKIE].value
    configure(service, "a", max_queued=1)
    form = {"model": "stories260k", "preset": "W4KV4", "group_size": "-1", "nsamples": "4", "seqlen": "64",
            "epochs": "1", "crr_k": "2", "seed": "0", "gpu_class": "default", "calib_source": "builtin",
            "builtin_name": "tinystories"}
    post = lambda: httpx.post(f"{live_server}/dashboard/jobs/new", data=form, timeout=60,  # noqa: E731
                              headers={"Cookie": f"{COOKIE}={cookie}"})
    assert post().status_code == 303
    page = post()
    assert page.headers["content-type"].startswith("text/html")
    assert 'role="alert"' in page.text and "1 jobs queued, its limit is 1" in page.text
