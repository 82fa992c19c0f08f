"""No team can stall the pool. Fair sharing (api/queue/fair_share.py, JobRunner.claim): jobs are submitted over
real HTTP and claimed by real JobRunners, as free workers would take them, on SQLite and Postgres. Hub lookups
(api/jobs/model_source.py) never hold the request threads."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import func, select, update

from api.jobs.model_source import HUB_TIMEOUT_SECONDS, hub_configs
from api.models import Job
from api.teams.service import team_service
from worker.runner import JobRunner

from .conftest import TINY_JOB
from .processes import service_env, wkvq


@pytest.fixture
def submit(live_server, team_headers):
    keys: dict[str, dict[str, str]] = {}

    def send(team: str, priority: int = 0) -> str:
        headers = keys.setdefault(team, team_headers(team))
        response = httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB | {"priority": priority}, headers=headers,
                              timeout=30)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    return send


def configure(service, team: str, **values) -> None:
    with service.session() as session:
        team_service.configure(session, name=team, **values)


def finish(service, job_id: str) -> None:
    with service.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="succeeded"))
        session.commit()


def owners(service, job_ids: list[str]) -> list[str]:
    with service.session() as session:
        teams = dict(session.execute(select(Job.id, Job.team_id).where(Job.id.in_(job_ids))).all())
        names = {t.id: t.name for t in team_service.list_teams(session)}
    return [names[teams[j]] for j in job_ids]


def test_a_team_flooding_at_high_priority_does_not_starve_another(service, submit):
    """Team A fills the queue at priority 100 before team B submits one job at priority 0: B's job starts at the
    next free worker, whether that is the one that was busy or another one."""
    flood = [submit("a", priority=100) for _ in range(4)]
    w1, w2, w3 = (JobRunner(service, name) for name in ("w1", "w2", "w3"))
    assert w1.claim_next(["default"]).job_id == flood[0]
    b1 = submit("b")
    finish(service, flood[0])
    assert w1.claim_next(["default"]).job_id == b1  # the same worker, freed: b's turn
    b2 = submit("b")
    assert w2.claim_next(["default"]).job_id == flood[1]  # a runs nothing, b one: a's share is the smaller
    assert w3.claim_next(["default"]).job_id == b2  # equal shares: a claimed last, so b


def test_priority_orders_a_teams_own_jobs(service, submit):
    low, high = submit("a", priority=0), submit("a", priority=9)
    runner = JobRunner(service, "w1")
    assert [runner.claim_next(["default"]).job_id for _ in range(2)] == [high, low]


def test_weights_share_the_running_jobs(service, submit):
    for _ in range(6):
        submit("a")
        submit("b")
    configure(service, "a", weight=2.0)
    claimed = [JobRunner(service, f"w{i}").claim_next(["default"]).job_id for i in range(6)]
    assert sorted(owners(service, claimed)) == ["a"] * 4 + ["b"] * 2


def test_a_team_at_its_cap_waits_and_others_go_first(service, submit):
    a_jobs = [submit("a", priority=50) for _ in range(3)]
    configure(service, "a", max_running=1)
    runner = JobRunner(service, "w1")
    assert runner.claim_next(["default"]).job_id == a_jobs[0]
    assert runner.claim_next(["default"]) is None  # only a's jobs are left, and a is at its cap
    assert runner.claim(a_jobs[1]) is None  # a direct claim (a Celery message for that job) respects it too
    b_job = submit("b")
    assert runner.claim_next(["default"]).job_id == b_job
    finish(service, a_jobs[0])
    assert runner.claim_next(["default"]).job_id == a_jobs[1]


def test_the_cap_holds_under_concurrent_claims(service, submit):
    jobs = [submit("a") for _ in range(8)]
    configure(service, "a", max_running=2)
    barrier = threading.Barrier(len(jobs))

    def claim(job_id: str) -> None:
        barrier.wait()
        try:
            JobRunner(service, f"w-{job_id[:6]}").claim(job_id)
        except Exception:  # SQLite may refuse a racing writer outright: that claim simply did not happen
            pass

    threads = [threading.Thread(target=claim, args=(job_id,)) for job_id in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with service.session() as session:
        assert session.scalar(select(func.count()).select_from(Job).where(Job.status == "running")) == 2


def test_the_queue_page_shows_each_teams_share(service, submit, live_server, team_headers):
    for _ in range(3):
        submit("a")
    configure(service, "a", weight=3.0, max_running=2)
    JobRunner(service, "w1").claim_next(["default"])
    submit("b")
    with httpx.Client(base_url=live_server, timeout=30) as browser:
        browser.post("/dashboard/signin", data={"api_key": team_headers("b")["Authorization"].split()[1]})
        page = browser.get("/dashboard/queue").text
    rows = [row for row in page.split('<tr class="team-row">')[1:]]
    cells = [[c.split(">", 1)[1].strip() for c in row.split("</td>")[:-1]] for row in rows]
    assert cells == [["a", "3", "2", "2", "1", "100 %", "75 %"], ["b", "1", "–", "1", "0", "0 %", "25 %"]]


def test_admin_sets_weights_caps_and_quotas(tmp_path):
    env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store")
    assert wkvq(env, "admin", "create-team", "a", cwd=tmp_path).returncode == 0
    result = wkvq(env, "admin", "set-team", "a", "--weight", "2.5", "--max-running", "3", "--storage-quota-gb", "1.5",
                  "--max-queued", "7", "--submissions-per-minute", "9", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("a "))
    assert [cell.strip() for cell in row.strip("│").split("│")] == ["a", "2.5", "3", "0", "0 / 7", "9", "0.000 GB",
                                                                    "1.5 GB"]
    refused = wkvq(env, "admin", "set-team", "a", "--weight", "0", cwd=tmp_path)
    assert refused.returncode == 2 and "must be greater than 0" in refused.stdout


# ------------------------------------------------------------------------------------- the hub never stalls the API


@pytest.fixture
def silent_hub(monkeypatch):
    """A model hub that accepts connections and never answers (the service is not offline)."""
    from huggingface_hub import constants

    server = socket.create_server(("127.0.0.1", 0))
    server.listen(200)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(hub_configs, "unreachable_until", 0.0)
    yield
    server.close()


HUB_JOB = TINY_JOB | {"model": {"source": "hf", "id": "some-org/some-model"}}
# well under the hub timeout that a held thread or a lookup would wait, well over a loaded machine's jitter (1 s
# took 1.04 s on a loaded machine)
AT_ONCE = HUB_TIMEOUT_SECONDS / 2


def test_hub_lookups_do_not_hold_request_threads(live_server, team_headers, silent_hub):
    """40 submissions naming a hub model while the hub hangs: /healthz keeps answering at once, every submission
    gets a 422 within the lookup timeout, and once the hub has timed out further lookups fail immediately."""
    headers = team_headers("a")
    answers: list[httpx.Response] = []

    def post() -> None:
        answers.append(httpx.post(f"{live_server}/v1/jobs", json=HUB_JOB, headers=headers, timeout=60))

    threads = [threading.Thread(target=post) for _ in range(40)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    health = []
    while any(t.is_alive() for t in threads):
        began = time.monotonic()
        assert httpx.get(f"{live_server}/healthz", timeout=30).status_code == 200
        health.append(time.monotonic() - began)
        time.sleep(0.2)
    assert time.monotonic() - start < HUB_TIMEOUT_SECONDS + 10
    assert health and max(health) < AT_ONCE, health
    assert [a.status_code for a in answers] == [422] * 40
    assert "unreachable" in answers[0].json()["detail"][0]["msg"]
    began = time.monotonic()
    again = httpx.post(f"{live_server}/v1/jobs", json=HUB_JOB, headers=headers, timeout=60)
    assert again.status_code == 422 and time.monotonic() - began < AT_ONCE


def test_an_offline_service_refuses_hub_models_at_once(live_server, team_headers):
    began = time.monotonic()
    response = httpx.post(f"{live_server}/v1/jobs", json=HUB_JOB, headers=team_headers("a"), timeout=60)
    assert response.status_code == 422 and time.monotonic() - began < AT_ONCE
    assert "offline" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_queue_message_only_wakes_the_worker(service, submit):
    """Celery mode: a message for team a's job, while a is at its cap, runs team b's job instead; a's job stays
    queued and, once the worker is free again, a new wake-up is sent for it (its own message was spent)."""
    from .test_worker import RecordingDispatcher

    running, waiting = submit("a"), submit("a")
    configure(service, "a", max_running=1)
    assert JobRunner(service, "w0").claim(running) is not None
    other = submit("b")
    service.dispatcher = RecordingDispatcher()
    JobRunner(service, "w1").run_next(["default"], woken_by=waiting)
    with service.session() as session:
        status = dict(session.execute(select(Job.id, Job.status)).all())
    assert (status[other], status[waiting], status[running]) == ("succeeded", "queued", "running")
    assert service.dispatcher.sent == [(waiting, "default")]
