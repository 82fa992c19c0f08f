"""Small promises, each over a real HTTP server (uvicorn in-process, `live_server`) on SQLite and Postgres:
bounded /metrics labels, no empty Idempotency-Key, no 5xx for values Postgres cannot hold nor for NaN and Infinity,
event streams that end on key revocation, no deployment paths or worker hostnames in what teams or anonymous scrapers
read, and no absolute URL taken from the Host header."""

from __future__ import annotations

import json
import random
import string
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from api.core.db import utcnow
from api.core.redact import public_message
from api.models import Artifact, Job, Worker
from api.teams.service import team_service
from wkvq_client import WKVQClient
from worker.runner import JobRunner

from .conftest import TINY_JOB, team_key

MADE_UP_METHODS = 200


def submit(base: str, headers: dict[str, str]) -> str:
    response = httpx.post(f"{base}/v1/jobs", json=TINY_JOB, headers=headers, timeout=30)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def metrics_text(base: str) -> str:
    response = httpx.get(f"{base}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    return response.text


# ------------------------------------------------------------------------------------------------ /metrics labels


def test_made_up_methods_share_one_metrics_label(live_server):
    """200 requests with random methods add one `method="other"` series per route, not one per method."""
    paths = ["/v1/jobs", "/healthz", "/no/such/path"]
    with httpx.Client(base_url=live_server, timeout=30) as anonymous:
        for path in paths:  # the `other` series exist before the measurement
            anonymous.request("XYZ123", path)
        metrics_text(live_server)
        before = len(metrics_text(live_server))
        rng = random.Random(0)
        for _ in range(MADE_UP_METHODS):
            method = "".join(rng.choices(string.ascii_uppercase + string.digits, k=8))
            assert anonymous.request(method, rng.choice(paths)).status_code in (404, 405)
    text = metrics_text(live_server)
    assert len(text) - before < 400, len(text) - before  # only counts and sums changed
    assert 'method="other",route="/v1/jobs",status="405"' in text
    assert 'method="other",route="<unmatched>",status="404"' in text


# ------------------------------------------------------------------------------------------------ Idempotency-Key


def test_an_empty_idempotency_key_is_refused_naming_the_header(live_server, client, team_headers):
    """Over HTTP a blank value arrives empty (h11 strips it); in-process ASGI also passes one of spaces."""
    headers = team_headers("a")
    attempts = [lambda: httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, timeout=30,
                                   headers=headers | {"Idempotency-Key": ""})] * 2  # twice: no replay of the first
    attempts.append(lambda: client.post("/v1/jobs", json=TINY_JOB, headers=headers | {"Idempotency-Key": " \t "}))
    for attempt in attempts:
        response = attempt()
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == ["header", "idempotency-key"] and "empty" in error["msg"]
    assert httpx.get(f"{live_server}/v1/jobs", headers=headers, timeout=30).json()["count"] == 0
    assert httpx.post(f"{live_server}/v1/jobs", json=TINY_JOB, headers=headers | {"Idempotency-Key": "k1"},
                      timeout=30).status_code == 201


# ------------------------------------------------------------------------------------------------ NUL, huge numbers


def test_nul_characters_and_huge_numbers_are_client_errors(live_server, service, team_headers):
    """Postgres text cannot hold NUL and its integers stop at 2**63: such inputs answer no 5xx (SQLite: they find
    nothing, Postgres: 422), a NUL in a key is a malformed key, a page past any offset is refused (found by fuzzing)."""
    headers = team_headers("a")
    with httpx.Client(base_url=live_server, headers=headers, timeout=30) as api:
        for path in ["/v1/jobs/%00", "/v1/jobs/%00/artifacts", "/v1/jobs?gpu_class=%00"]:
            assert api.get(path).status_code < 500, path
        assert api.post("/v1/jobs/%00/cancel").status_code in (404, 422)
        signin = api.post("/dashboard/signin", data={"api_key": "wkvq_\x00_x"})
        assert signin.status_code == 401 and "malformed" in signin.text
        assert api.post("/dashboard/signin", data={"api_key": team_key(service, "a")}).status_code == 303
        assert api.get("/dashboard/jobs", params={"page": 2**64}).status_code == 422


# ------------------------------------------------------------------------------------------------ NaN, Infinity

# Python's json reads NaN, Infinity and -Infinity, and 1e400 as inf; no JSON number holds them (`...` = TINY_JOB's)
NON_FINITE_BODIES = {
    '{"model": ..., "calibration": ..., "priority": NaN}': ["body", "priority"],
    '{"model": ..., "calibration": ..., "priority": 1e400}': ["body", "priority"],
    '{"model": ..., "calibration": ..., "config": {"nsamples": NaN}}': ["body", "config", "nsamples"],
    '{"model": ..., "calibration": ..., "config": {"epochs": Infinity}}': ["body", "config", "epochs"],
    '{"model": NaN, "calibration": ...}': ["body", "model"],
    '{"model": ..., "calibration": ..., "extra": [-Infinity]}': ["body", "extra"],
    "NaN": ["body"],
}


def test_non_finite_numbers_are_422_naming_the_field(live_server, service, team_headers):
    """Raw JSON bodies with NaN, ±Infinity and 1e400 answer a 422 (strict JSON) naming the field, and create no job;
    the dashboard's new-job form refuses the same words in its number fields with its own 422 page."""
    headers = team_headers("a") | {"Content-Type": "application/json"}
    with httpx.Client(base_url=live_server, timeout=30) as http:
        for template, loc in NON_FINITE_BODIES.items():
            body = template.replace('"model": ...', '"model": ' + json.dumps(TINY_JOB["model"])).replace(
                '"calibration": ...', '"calibration": ' + json.dumps(TINY_JOB["calibration"]))
            response = http.post("/v1/jobs", content=body, headers=headers)
            assert response.status_code == 422, (body, response.text)
            detail = json.loads(response.text, parse_constant=lambda word: pytest.fail(f"{word} in {response.text}"))
            assert loc in [error["loc"][:len(loc)] for error in detail["detail"]], (body, detail)
        assert http.get("/v1/jobs", headers=headers).json()["count"] == 0
        signin = http.post("/dashboard/signin", data={"api_key": headers["Authorization"].removeprefix("Bearer ")})
        cookie = {"Cookie": signin.headers["set-cookie"].split(";", 1)[0], "Origin": live_server}
        for field, word in (("nsamples", "NaN"), ("epochs", "Infinity"), ("seqlen", "1e400"), ("seed", "-inf")):
            form = {"model": "stories260k", "preset": "W4KV4", "calib_source": "builtin", field: word}
            response = http.post("/dashboard/jobs/new", data=form, headers=cookie)
            assert response.status_code == 422 and "text/html" in response.headers["content-type"], response.text
        assert http.get("/v1/jobs", headers=headers).json()["count"] == 0


# ------------------------------------------------------------------------------------------------ event stream


def test_an_open_event_stream_ends_when_its_key_is_revoked(live_server, service, team_headers):
    """The job stays queued (no worker), so only the revocation can end the stream."""
    key = team_key(service, "a")
    headers = {"Authorization": f"Bearer {key}"}
    job_id = submit(live_server, headers)
    timeout = httpx.Timeout(30, read=10)  # the old code kept the stream open: a read timeout, not an end
    with httpx.stream("GET", f"{live_server}/v1/jobs/{job_id}/events", headers=headers, timeout=timeout) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("event:"))  # the stream is live
        with service.session() as session:
            team_service.revoke_key(session, prefix=key.split("_")[1])
        revoked = time.monotonic()
        rest = list(lines)
        ended_after = time.monotonic() - revoked
    assert "event: end" in rest and 'data: {"status": "unauthorized"}' in rest, rest
    assert ended_after < 5
    assert httpx.get(f"{live_server}/v1/jobs/{job_id}/events", headers=headers, timeout=30).status_code == 401


# ------------------------------------------------------------------------------------------------ no paths, no hosts


def test_a_store_error_in_a_job_names_no_store_path(live_server, service, team_headers):
    """A real StorageError (the store cannot create `jobs/...`: a plain file sits there) fails the job; its error and
    its `failed` event say what failed relative to `<store>`."""
    headers = team_headers("a")
    job_id = submit(live_server, headers)
    store_root = Path(service.store.root)
    store_root.mkdir(parents=True, exist_ok=True)
    (store_root / "jobs").write_text("not a directory")
    JobRunner(service, "w1").run(job_id)
    job = httpx.get(f"{live_server}/v1/jobs/{job_id}", headers=headers, timeout=30).json()
    events = httpx.get(f"{live_server}/v1/jobs/{job_id}/events", headers=headers, timeout=30).text
    assert job["status"] == "failed"
    assert job["error"].startswith("artifact store write of <store>/jobs/"), job["error"]
    for text in (job["error"], events):
        assert str(store_root) not in text and tempfile.gettempdir() + "/" not in text


def test_public_message_hides_every_deployment_location(service):
    settings, tmp = service.settings, tempfile.gettempdir()
    text = (f"store file://{service.store.root}/jobs/x, data {settings.DATA_DIR}/a, models {settings.MODELS_DIR}/m, "
            f"scratch {tmp}/wkvq-1/calibration.txt, elsewhere /var{tmp}/x")
    assert public_message(text, service) == ("store <store>/jobs/x, data <data>/a, models <models>/m, "
                                             f"scratch <tmp>/wkvq-1/calibration.txt, elsewhere /var{tmp}/x")


def test_anonymous_metrics_name_no_worker_host(live_server, service):
    with service.session() as session:
        session.add(Worker(id="gpu-node-17.internal:4242:default:gpu0", hostname="gpu-node-17.internal",
                           gpu_classes=["default"], device="cpu", last_seen_at=utcnow()))
        session.commit()
    text = metrics_text(live_server)
    assert "gpu-node-17" not in text
    assert "wkvq_workers_online 1.0" in text


# ------------------------------------------------------------------------------------------------ Host header


def test_download_urls_ignore_a_forged_host_header(live_server, service, team_headers, monkeypatch):
    headers = team_headers("a")
    job_id = submit(live_server, headers)
    stored = service.store.put_bytes(b"tar bytes", f"jobs/{job_id}/model.tar")
    with service.session() as session:
        session.get(Job, job_id).status = "succeeded"
        session.add(Artifact(job_id=job_id, name="model.tar", uri=stored.uri, sha256=stored.sha256, size=stored.size,
                             media_type="application/x-tar"))
        session.commit()
    listing = f"{live_server}/v1/jobs/{job_id}/artifacts"
    forged = headers | {"Host": "evil.example"}
    (artifact,) = httpx.get(listing, headers=forged, timeout=30).json()
    assert artifact["download_url"] == f"/v1/jobs/{job_id}/artifacts/model.tar"
    download = httpx.get(httpx.URL(live_server).join(artifact["download_url"]), headers=headers, timeout=30)
    assert download.content == b"tar bytes"
    with WKVQClient(live_server, headers["Authorization"].removeprefix("Bearer ")) as client:  # joins it to its URL
        assert client.artifacts(job_id)[0].download_url == f"{live_server}/v1/jobs/{job_id}/artifacts/model.tar"

    monkeypatch.setattr(service.settings, "PUBLIC_URL", "https://wkvq.example.com/")
    (artifact,) = httpx.get(listing, headers=forged, timeout=30).json()
    assert artifact["download_url"] == f"https://wkvq.example.com/v1/jobs/{job_id}/artifacts/model.tar"
