"""Observability: Prometheus `/metrics` (read from the database at scrape time) and the workers' structured logs.

Scrapes go through the real app (TestClient) on SQLite and Postgres, after jobs in every state and one job run to
the end by the real `JobRunner`; one scrape and one job go through a real `wkvq serve` process.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, update

from api.core.context import ServiceContext
from api.core.db import utcnow
from api.main import create_app
from api.models import Job, JobEvent, Worker
from api.observability.middleware import UNMATCHED, route_template
from tests.conftest import EVAL_TEXT
from tests.service.conftest import TINY_JOB, service_settings
from worker.logging import configure_logging, log_context, make_handler
from worker.runner import JobRunner

from .processes import admin_key, service_env, start_server

STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
Samples = dict[tuple[str, frozenset], float]


def scrape(client: TestClient | httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for n, labels in samples if n == name]


@pytest.fixture
def settings(db_url, tmp_path):
    return service_settings(db_url, str(tmp_path / "store"), GPU_CLASSES=["default", "large"],
                            METRICS_WORKER_LABELS=True)  # per-worker gauges are opt-in (worker ids name hosts)


@pytest.fixture
def headers(team_headers) -> dict[str, str]:
    return team_headers("a")


@pytest.fixture
def small_job(client, headers) -> dict[str, Any]:
    """TINY_JOB evaluated on a small uploaded text (the shipped evaluation set would take most of the run)."""
    text = EVAL_TEXT.read_text(encoding="utf-8")[:1500]
    r = client.post("/v1/datasets", files={"file": ("eval.txt", text.encode(), "text/plain")}, headers=headers)
    assert r.status_code == 201, r.text
    return copy.deepcopy(TINY_JOB) | {"evaluation": {"source": "upload", "dataset_id": r.json()["id"]}}


def submit(client: TestClient, headers: dict[str, str], body: dict[str, Any], gpu_class: str = "default") -> str:
    r = client.post("/v1/jobs", json=body | {"gpu_class": gpu_class}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_to_end(service: ServiceContext, job_id: str) -> None:
    runner = JobRunner(service, "w")
    lease = runner.claim_next(["default"])
    assert lease is not None and lease.job_id == job_id
    runner.execute(lease)


# ------------------------------------------------------------------------------------------------------ /metrics


def test_scrape_reports_jobs_queues_durations_workers_and_requests(client, service, headers, small_job):
    finished = submit(client, headers, small_job)
    run_to_end(service, finished)
    assert client.get(f"/v1/jobs/{finished}", headers=headers).json()["status"] == "succeeded"

    submit(client, headers, small_job)                                # queued, default
    submit(client, headers, small_job, "large")                       # queued, large
    running = submit(client, headers, small_job, "large")
    assert JobRunner(service, "w2").claim(running) is not None        # running, large (never executed)
    cancelled = submit(client, headers, small_job)
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=headers).json()["status"] == "cancelled"
    failed = submit(client, headers, small_job)
    now = utcnow()
    with service.session() as session:                                # failed after 100 s of running
        session.execute(update(Job).where(Job.id == failed).values(
            status="failed", started_at=now - timedelta(seconds=100), finished_at=now, error="boom"))
        session.add_all([Worker(id="host:1:default:gpu0", hostname="host", gpu_classes=["default"], device="0",
                                last_seen_at=now),
                         Worker(id="host:2:large:gpu1", hostname="host", gpu_classes=["large"], device="1",
                                last_seen_at=now - timedelta(minutes=5)),
                         Worker(id="gone:3:default:gpu0", hostname="gone", gpu_classes=["default"], device="0",
                                last_seen_at=now - timedelta(hours=3))])
        session.commit()
        job = session.get(Job, finished)
        run_seconds = (job.finished_at - job.started_at).total_seconds()
        block_seconds = session.scalars(select(JobEvent.seconds).where(JobEvent.job_id == finished,
                                                                       JobEvent.kind == "block_end")).all()

    samples = scrape(client)  # no Authorization header: unauthenticated like /healthz
    assert value(samples, "wkvq_up", component="database") == 1
    assert {s: value(samples, "wkvq_jobs", status=s) for s in STATUSES} == {
        "queued": 2, "running": 1, "succeeded": 1, "failed": 1, "cancelled": 1}
    assert value(samples, "wkvq_queue_depth", gpu_class="default") == 1
    assert value(samples, "wkvq_queue_depth", gpu_class="large") == 1
    assert value(samples, "wkvq_jobs_running", gpu_class="default") == 0
    assert value(samples, "wkvq_jobs_running", gpu_class="large") == 1
    assert 0 <= value(samples, "wkvq_queue_oldest_age_seconds", gpu_class="default") < 600

    # job duration: over finished jobs that had started (the job cancelled while queued never ran)
    assert value(samples, "wkvq_job_duration_seconds_count", status="succeeded") == 1
    assert value(samples, "wkvq_job_duration_seconds_sum", status="succeeded") == pytest.approx(run_seconds, abs=0.01)
    assert value(samples, "wkvq_job_duration_seconds_count", status="failed") == 1
    assert value(samples, "wkvq_job_duration_seconds_sum", status="failed") == pytest.approx(100, abs=0.01)
    assert value(samples, "wkvq_job_duration_seconds_bucket", status="failed", le="60.0") == 0
    assert value(samples, "wkvq_job_duration_seconds_bucket", status="failed", le="120.0") == 1
    assert value(samples, "wkvq_job_duration_seconds_count", status="cancelled") == 0

    # block duration: the 5 block_end events of the finished job, cumulative buckets ending at the count
    assert len(block_seconds) == 5
    assert value(samples, "wkvq_block_duration_seconds_count") == 5
    assert value(samples, "wkvq_block_duration_seconds_sum") == pytest.approx(sum(block_seconds), rel=1e-6)
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in samples.items()
                     if name == "wkvq_block_duration_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (float("inf"), 5)
    assert all(v == sum(s <= le for s in block_seconds) for le, v in buckets)

    # workers: seconds since last seen, the ones seen within 3 heartbeats online, long-gone ones left out
    assert value(samples, "wkvq_worker_last_seen_seconds", worker="host:1:default:gpu0") < 60
    assert 300 <= value(samples, "wkvq_worker_last_seen_seconds", worker="host:2:large:gpu1") < 400
    assert {w["worker"] for w in labelled(samples, "wkvq_worker_last_seen_seconds")} == {
        "host:1:default:gpu0", "host:2:large:gpu1"}
    assert value(samples, "wkvq_workers_online") == 1

    # API latency by route template, never by raw path (no job id in any label)
    get_job = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "200"}
    assert value(samples, "wkvq_http_request_duration_seconds_count", **get_job) == 1
    assert value(samples, "wkvq_http_request_duration_seconds_bucket", **get_job, le="+Inf") == 1
    assert value(samples, "wkvq_http_requests_total", **get_job) == 1
    assert value(samples, "wkvq_http_requests_total", method="POST", route="/v1/jobs", status="201") == 5 + 1
    assert value(samples, "wkvq_http_requests_total", method="POST", route="/v1/jobs/{job_id}/cancel",
                 status="200") == 1
    routes = {labels["route"] for labels in labelled(samples, "wkvq_http_requests_total")}
    assert not any(job_id in route for route in routes for job_id in (finished, running, cancelled, failed))
    client.get(f"/v1/jobs/{finished}/no-such-thing")
    again = scrape(client)
    assert value(again, "wkvq_http_requests_total", method="GET", route=UNMATCHED, status="404") == 1
    assert value(again, "wkvq_http_requests_total", method="GET", route="/metrics", status="200") == 1


def test_metrics_is_outside_the_api_schema(client):
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]
    samples = scrape(client)
    assert {labels["status"] for labels in labelled(samples, "wkvq_jobs")} == STATUSES  # all five, even at 0
    assert {labels["gpu_class"] for labels in labelled(samples, "wkvq_queue_depth")} == {"default", "large"}
    assert value(samples, "wkvq_block_duration_seconds_count") == 0
    assert value(samples, "wkvq_workers_online") == 0


def test_database_outage_is_a_value_not_an_error(tmp_path):
    """Nothing listens on port 1: every query fails, the scrape still answers with wkvq_up 0."""
    down = ServiceContext.from_settings(service_settings("postgresql://nobody@127.0.0.1:1/none", str(tmp_path / "s")))
    try:
        with TestClient(create_app(down)) as client:
            client.get("/healthz")
            samples = scrape(client)
    finally:
        down.close()
    assert value(samples, "wkvq_up", component="database") == 0
    assert not labelled(samples, "wkvq_jobs")
    assert value(samples, "wkvq_http_requests_total", method="GET", route="/healthz", status="200") == 1


def test_each_app_has_its_own_registry(service):
    with TestClient(create_app(service)) as one, TestClient(create_app(service)) as two:
        one.get("/healthz")
        one.get("/healthz")
        two.get("/healthz")
        healthz = {"method": "GET", "route": "/healthz", "status": "200"}
        assert value(scrape(one), "wkvq_http_requests_total", **healthz) == 2
        assert value(scrape(two), "wkvq_http_requests_total", **healthz) == 1


def test_route_template_without_fastapi_route_context():
    """The fallback for an unprefixed route: the router prefix comes back from the raw path, ids do not."""
    route = type("R", (), {"path_format": "/jobs/{job_id}/artifacts/{name}"})()
    scope = {"route": route, "path": "/v1/jobs/abc/artifacts/model.tar", "root_path": "",
             "path_params": {"job_id": "abc", "name": "model.tar"}}
    assert route_template(scope) == "/v1/jobs/{job_id}/artifacts/{name}"
    assert route_template({"path": "/wp-login.php"}) == UNMATCHED


# ---------------------------------------------------------------------------------------------------------- logs


@pytest.fixture
def captured_logs():
    """Text and JSON handlers built exactly as `configure_logging` builds them, on the root logger for the test."""
    root = logging.getLogger()
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = [make_handler(fmt, stream) for fmt, stream in streams.items()]
    level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    yield streams
    for handler in handlers:
        root.removeHandler(handler)
    root.setLevel(level)


def test_every_line_of_a_job_carries_its_id(client, service, headers, small_job, captured_logs, monkeypatch):
    job_id = submit(client, headers, small_job)
    runner = JobRunner(service, "w")
    lease = runner.claim_next(["default"])
    assert lease is not None and lease.job_id == job_id
    real_update, failures = runner.fenced_update, []

    def flaky_heartbeat(*args, **kwargs):  # the first heartbeat fails: a warning from the heartbeat's own thread
        if not failures:
            failures.append(1)
            raise RuntimeError("database hiccup")
        return real_update(*args, **kwargs)

    monkeypatch.setattr(runner, "fenced_update", flaky_heartbeat)
    monkeypatch.setattr(service.settings, "HEARTBEAT_SECONDS", 0.05)  # the tiny job may take less than a second
    for stream in captured_logs.values():  # only what the job logs from here on
        stream.seek(0)
        stream.truncate()
    runner.execute(lease)
    assert failures, "the heartbeat never ran"
    with log_context(worker_id="w"):
        logging.getLogger("tests.after").info("after the job")

    text = captured_logs["text"].getvalue().splitlines()
    during, after = text[:-1], text[-1]
    assert len(during) >= 5 and all(f"[job={job_id} worker=w] " in line for line in during), "\n".join(during)
    assert any("worker.runner: job" in line and "block_end block 5/5" in line for line in during)
    assert any("heartbeat failed: database hiccup" in line for line in during)
    assert after.endswith("INFO [job=- worker=w] tests.after: after the job")

    records = [json.loads(line) for line in captured_logs["json"].getvalue().splitlines()]
    assert len(records) == len(text)
    assert all(r["job_id"] == job_id and r["worker_id"] == "w" for r in records[:-1])
    assert records[-1] | {"time": None} == {"time": None, "level": "INFO", "job_id": "-", "worker_id": "w",
                                             "logger": "tests.after", "message": "after the job",
                                             "thread": records[-1]["thread"]}
    [beat] = [r for r in records if "heartbeat failed" in r["message"]]
    assert beat["thread"] == f"heartbeat-{job_id}" and beat["level"] == "WARNING"


def test_configure_logging_routes_celery_and_warnings_through_one_handler(monkeypatch):
    import warnings

    from celery import Celery
    from celery.signals import setup_logging

    from worker.logging import HANDLER_NAME, celery_setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for name in ("celery", "celery.task"):
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "handlers", [logging.NullHandler()])
        monkeypatch.setattr(logger, "propagate", False)
    stream = io.StringIO()
    configure_logging("json", worker_id="host:1:default:gpucpu", stream=stream)
    try:
        configure_logging("json", worker_id="host:1:default:gpucpu", stream=stream)  # replaces, does not add
        assert [h.get_name() for h in root.handlers].count(HANDLER_NAME) == 1
        setup_logging.connect(celery_setup_logging, weak=False, dispatch_uid="wkvq-logging")
        Celery("t").log.setup_logging_subsystem(loglevel="INFO")  # with a receiver Celery adds no handler
        assert [h.get_name() for h in root.handlers].count(HANDLER_NAME) == 1
        logging.getLogger("celery.task").info("task line")
        logging.getLogger("celery").warning("celery line")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        for handler in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
            root.removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(r["logger"], r["worker_id"], r["job_id"]) for r in records] == [
        ("celery.task", "host:1:default:gpucpu", "-"), ("celery", "host:1:default:gpucpu", "-"),
        ("py.warnings", "host:1:default:gpucpu", "-")]


# ----------------------------------------------------------------------------------------- a real `wkvq serve`


def test_real_server_scrape_and_json_logs(tmp_path):
    """`wkvq serve` (SQLite, in-process worker, WKVQ_LOG_FORMAT=json): /metrics after a job; every log line JSON."""
    env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store", WKVQ_LOG_FORMAT="json")
    server, base = start_server(env, tmp_path)
    try:
        key = admin_key(env, tmp_path, "team-a")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
            job_id = api.post("/v1/jobs", json=TINY_JOB).raise_for_status().json()["id"]
            deadline = time.monotonic() + 300
            while api.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, server.output()
                time.sleep(0.5)
            assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        with httpx.Client(base_url=base, timeout=30) as anonymous:
            samples = scrape(anonymous)
    finally:
        server.stop()
    assert value(samples, "wkvq_up", component="database") == 1
    assert value(samples, "wkvq_jobs", status="succeeded") == 1
    assert value(samples, "wkvq_block_duration_seconds_count") == 5
    assert value(samples, "wkvq_job_duration_seconds_count", status="succeeded") == 1
    assert value(samples, "wkvq_workers_online") == 1
    assert value(samples, "wkvq_http_requests_total", method="GET", route="/readyz", status="200") >= 1
    assert value(samples, "wkvq_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") >= 2
    assert any(name.startswith("wkvq_process_") for name, _ in samples)

    records = [json.loads(line) for line in server.output().splitlines() if line.strip()]  # every line is JSON
    job_lines = [r for r in records if r["job_id"] == job_id]
    assert any(r["logger"] == "worker.runner" and "block_end block 5/5" in r["message"] for r in job_lines)
    assert all(r["worker_id"].endswith(":local-0") for r in job_lines)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's lines go through the same handler
