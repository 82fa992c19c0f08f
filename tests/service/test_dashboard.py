"""The dashboard (api/dashboard): cookie sign-in, team isolation, forms, the loss chart, live fragments, downloads.

The TestClient tests run on SQLite and on Postgres, over https://testserver so that the client keeps the Secure
cookie. One real-browser test (slow) drives `wkvq serve` with Chromium through a whole job."""

from __future__ import annotations

import hashlib
import os
import html as html_lib
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.core.context import ServiceContext
from api.core.db import utcnow
from api.dashboard.charts import LossPoint, loss_chart_svg, loss_points
from api.jobs.service import add_event
from api.main import create_app
from api.models import ApiKey, Artifact, DashboardSession, Job, JobEvent, JobMetrics, Worker
from api.teams.service import team_service

from .conftest import TINY_JOB, served, team_key
from .processes import REPO, admin_key, service_env, start_server

POLYLINE = re.compile(r'<polyline class="loss" data-block="(\d+)" points="([^"]*)"')
FORM = {"model": "stories260k", "preset": "W4KV4", "group_size": "-1", "nsamples": "4", "seqlen": "64",
        "epochs": "1", "crr_k": "2", "seed": "0", "gpu_class": "default", "calib_source": "builtin",
        "builtin_name": "tinystories"}
METRICS = {"calibration": {"block_losses": [0.01, 0.02], "device": "cpu"},
           "eval": {"tokens": 4096, "ppl": {"fp": 10.5, "w": 11.25, "wkv": 12.0}, "kv_bytes_per_token": 40.0,
                    "kv_bytes_per_token_fp16": 160.0, "baselines": {"rtn": {"w": 11.5, "wkv": 15.25}}},
           "run": {"seconds": 12.5, "peak_memory_bytes": 3 * 2**20, "resumed_blocks": 0}}


# --------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def web(service) -> TestClient:
    with TestClient(create_app(service), base_url="https://testserver", follow_redirects=False) as c:
        yield c


@pytest.fixture
def new_key(service) -> Callable[[str], str]:
    return lambda team: team_key(service, team)


@pytest.fixture
def sign_in(web, new_key) -> Callable[[str], dict[str, str]]:
    """sign_in("a"): the web client signs in as team a (cookie); returns API headers with another key of a."""

    def make(team: str) -> dict[str, str]:
        response = web.post("/dashboard/signin", data={"api_key": new_key(team)})
        assert response.status_code == 303, response.text
        return {"Authorization": f"Bearer {new_key(team)}"}

    return make


def submit_api(web: TestClient, headers: dict[str, str], body: dict[str, Any] = TINY_JOB) -> str:
    response = web.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def update_job(service: ServiceContext, job_id: str, **values: Any) -> None:
    with service.session() as session:
        job = session.get(Job, job_id)
        for name, value in values.items():
            setattr(job, name, value)
        session.commit()


def add_losses(service: ServiceContext, job_id: str, blocks: int, epochs: int) -> None:
    with service.session() as session:
        for block in range(blocks):
            add_event(session, job_id, "block_start", block=block, n_blocks=5)
            for epoch in range(1, epochs + 1):
                add_event(session, job_id, "epoch_end", block=block, n_blocks=5, epoch=epoch, epochs=epochs,
                          loss=0.1 * (block + 1) / epoch)
            add_event(session, job_id, "block_end", block=block, n_blocks=5, seconds=1.5)
        session.commit()


def finish_with_artifact(service: ServiceContext, job_id: str, data: bytes) -> str:
    stored = service.store.put_bytes(data, f"jobs/{job_id}/model.tar")
    with service.session() as session:
        job = session.get(Job, job_id)
        job.status, job.current_block, job.total_blocks, job.finished_at = "succeeded", 5, 5, utcnow()
        job.started_at = job.finished_at - timedelta(seconds=75)
        session.add(Artifact(job_id=job_id, name="model.tar", uri=stored.uri, sha256=stored.sha256, size=stored.size,
                             media_type="application/x-tar"))
        session.add(JobMetrics(job_id=job_id, metrics=METRICS | {"artifact": {"name": "model.tar", "size": stored.size,
                                                                              "sha256": stored.sha256}}))
        add_event(session, job_id, "succeeded", "artifact model.tar")
        session.commit()
    return stored.sha256


def field_error(html: str, field: str) -> str | None:
    match = re.search(rf'<p class="field-error" id="{field}-error" role="alert">([^<]*)</p>', html)
    return html_lib.unescape(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------------- sign-in


def test_sign_in_sets_a_strict_secure_httponly_session_cookie(web, new_key):
    key = new_key("a")
    response = web.post("/dashboard/signin", data={"api_key": key, "next": "/dashboard/queue"})
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/signin/check?next=/dashboard/queue"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("wkvq_session=") and key not in cookie and key.split("_", 2)[2] not in cookie
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags  # served over https
    assert web.get(response.headers["location"]).headers["location"] == "/dashboard/queue"
    page = web.get("/dashboard/jobs")
    assert page.status_code == 200 and "Team <strong>a</strong>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


@contextmanager
def signed_in_browser(base: str, key: str) -> Iterator[httpx.Client]:
    """An HTTP client signed in to the dashboard at `base` (http: the cookie is not Secure there)."""
    with httpx.Client(base_url=base, timeout=30) as browser:
        response = browser.post("/dashboard/signin", data={"api_key": key})
        assert response.status_code == 303 and "secure" not in response.headers["set-cookie"].lower()
        assert browser.get(response.headers["location"]).headers["location"] == "/dashboard/jobs"
        yield browser


def test_a_copied_cookie_stops_working_after_sign_out(live_server, service):
    key = team_key(service, "a")
    with signed_in_browser(live_server, key) as browser, httpx.Client(base_url=live_server, timeout=30) as thief:
        cookie = browser.cookies["wkvq_session"]
        assert key.split("_", 2)[2] not in cookie  # the cookie is not the API key
        thief.cookies.set("wkvq_session", cookie)
        assert thief.get("/dashboard/jobs").status_code == 200
        assert browser.post("/dashboard/logout").status_code == 303
        signed_out = thief.get("/dashboard/jobs")
        assert signed_out.status_code == 303 and signed_out.headers["location"].startswith("/dashboard/signin")
        assert thief.get("/v1/jobs", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401
    with service.session() as session:  # stored hashed only
        assert session.scalar(select(func.count()).select_from(DashboardSession)
                              .where(DashboardSession.token_hash == hashlib.sha256(cookie.encode()).hexdigest(),
                                     DashboardSession.revoked_at.is_not(None))) == 1


def test_the_pager_keeps_the_status_filter(live_server, service):
    key = team_key(service, "a")
    headers = {"Authorization": f"Bearer {key}"}
    with signed_in_browser(live_server, key) as browser:
        ids = [browser.post("/v1/jobs", json=TINY_JOB, headers=headers).json()["id"] for _ in range(4)]
        for job_id in ids[:3]:
            assert browser.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 200
        first = browser.get("/dashboard/jobs", params={"status": "cancelled", "size": 2}).text
        assert "1–2 of 3" in first
        older = html_lib.unescape(re.search(r'href="([^"]*)">Older', first).group(1))
        second = browser.get(older).text
        assert "3–3 of 3" in second and ids[3] not in second
        newer = html_lib.unescape(re.search(r'href="([^"]*)">← Newer', second).group(1))
        assert "1–2 of 3" in browser.get(newer).text


@pytest.mark.parametrize("key, message", [("wkvq_000000000000_nope", "invalid API key"), ("hello", "starts with wkvq_")])
def test_a_bad_key_shows_an_error_and_sets_no_cookie(web, new_key, key, message):
    new_key("a")
    response = web.post("/dashboard/signin", data={"api_key": key})
    assert response.status_code == 401 and "set-cookie" not in response.headers
    assert message in field_error(response.text, "api_key")


def test_next_is_only_followed_within_the_dashboard(web, new_key):
    response = web.post("/dashboard/signin", data={"api_key": new_key("a"), "next": "https://evil.example/"})
    assert web.get(response.headers["location"]).headers["location"] == "/dashboard/jobs"


def test_logout_clears_the_cookie(web, sign_in):
    sign_in("a")
    response = web.post("/dashboard/logout")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/signin"
    assert re.match(r'wkvq_session="?"?;', response.headers["set-cookie"]) and "Max-Age=0" in response.headers["set-cookie"]
    assert web.get("/dashboard/jobs").headers["location"].startswith("/dashboard/signin")


@pytest.mark.parametrize("path", ["/dashboard/jobs", "/dashboard/jobs/new", "/dashboard/queue",
                                  f"/dashboard/jobs/{'0' * 32}", f"/dashboard/jobs/{'0' * 32}/artifacts/model.tar"])
def test_signed_out_pages_redirect_to_sign_in(web, path):
    response = web.get(path)
    assert response.status_code == 303
    assert response.headers["location"] == f"/dashboard/signin?next={path}"
    assert web.get("/").headers["location"] == "/dashboard/jobs"
    fragment = web.get(f"/dashboard/jobs/{'0' * 32}/fragment", headers={"HX-Request": "true"})
    assert fragment.status_code == 401 and fragment.headers["hx-redirect"].startswith("/dashboard/signin")
    cancel = web.post(f"/dashboard/jobs/{'0' * 32}/cancel")
    assert cancel.status_code == 303 and cancel.headers["location"] == "/dashboard/signin"


def test_a_revoked_key_signs_out(web, service, sign_in):
    sign_in("a")
    with service.session() as session:
        for prefix in session.scalars(select(ApiKey.prefix)):
            team_service.revoke_key(session, prefix=prefix)
    response = web.get("/dashboard/jobs")
    assert response.status_code == 303 and 'wkvq_session=""' in response.headers["set-cookie"]


# --------------------------------------------------------------------------------------------------------- jobs


def test_another_teams_job_is_not_found(web, sign_in, service, team_headers):
    job_id = submit_api(web, team_headers("a"))
    finish_with_artifact(service, job_id, b"x" * 100)
    sign_in("b")
    for path in ("", "/fragment", "/artifacts/model.tar"):
        response = web.get(f"/dashboard/jobs/{job_id}{path}")
        assert response.status_code == 404 and "Not found" in response.text, path
    assert web.post(f"/dashboard/jobs/{job_id}/retry").status_code == 404
    assert job_id not in web.get("/dashboard/jobs").text


def test_job_list_filters_and_pages(web, sign_in):
    headers = sign_in("a")
    ids = [submit_api(web, headers, TINY_JOB | {"priority": i}) for i in range(3)]
    web.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers).raise_for_status()
    page = web.get("/dashboard/jobs?status=cancelled").text
    assert ids[0] in page and ids[1] not in page and "1–1 of 1" in page
    first = web.get("/dashboard/jobs?size=2").text
    assert "1–2 of 3" in first and "page=2&amp;size=2" in first and ids[2] in first and ids[0] not in first
    assert 'hx-trigger="every 3s"' in first  # queued jobs: the table refreshes itself
    second = web.get("/dashboard/jobs?size=2&page=2").text
    assert "3–3 of 3" in second and ids[0] in second and 'badge-cancelled' in second
    assert "W4KV4" in second and "stories260k" in second


def test_the_loss_chart_has_one_point_per_epoch_in_a_polyline_per_block(web, sign_in, service):
    job_id = submit_api(web, sign_in("a"))
    update_job(service, job_id, status="running", started_at=utcnow(), total_blocks=5, current_block=2,
               lease_owner="host:1:local-0", heartbeat_at=utcnow())
    add_losses(service, job_id, blocks=2, epochs=3)
    html = web.get(f"/dashboard/jobs/{job_id}").text
    lines = POLYLINE.findall(html)
    assert [block for block, _ in lines] == ["0", "1"]
    xs = [float(p.split(",")[0]) for _, points in lines for p in points.split()]
    assert all(len(points.split()) == 3 for _, points in lines) and xs == sorted(xs)
    assert html.count('class="separator"') == 1 and "decoder block" in html
    assert 'hx-trigger="every 2s"' in html and "2 / 5" in html and "host:1:local-0" in html
    fragment = web.get(f"/dashboard/jobs/{job_id}/fragment").text
    assert fragment.lstrip().startswith('<div id="job-live"') and "<html" not in fragment
    assert len(POLYLINE.findall(fragment)) == 2 and "Cancel job" in fragment and "Retry" not in fragment


def test_loss_points_keep_the_latest_attempt_of_a_block():
    events = [JobEvent(kind="epoch_end", block=0, epoch=e, loss=1.0 / e) for e in (1, 2, 3)]
    events += [JobEvent(kind="epoch_end", block=1, epoch=1, loss=9.0), JobEvent(kind="block_end", block=1)]
    events += [JobEvent(kind="epoch_end", block=1, epoch=e, loss=2.0 / e) for e in (1, 2)]  # retried block 1
    points = loss_points(events)
    assert [(p.block, p.epoch) for p in points] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]
    assert loss_chart_svg([]) is None
    wide = loss_chart_svg([LossPoint(0, 1, 1e-4), LossPoint(1, 1, 1.0)])
    assert "log scale" in wide and wide.count("<polyline class=\"loss\"") == 2 and "trend" in wide


def test_a_finished_job_shows_metrics_and_downloads_by_cookie(web, sign_in, service):
    job_id = submit_api(web, sign_in("a"))
    data = bytes(range(256)) * 40
    sha256 = finish_with_artifact(service, job_id, data)
    html = web.get(f"/dashboard/jobs/{job_id}").text
    assert 'data-status="succeeded"' in html and "hx-trigger" not in html.split('id="job-live"')[1][:300]
    assert html.count('class="ppl-row"') == 3 and "12.000" in html and "+1.500" in html
    assert "Δ vs RTN" in html and "15.250" in html and "-3.250" in html and "-0.250" in html  # RTN baselines
    assert "RTN, job's KV options" in html_lib.unescape(html) and "attention-sink tokens" in html  # not plain RTN
    assert "Calibration with per-block evaluation</th><td class=\"num\">12 s" in html  # not "Calibration time"
    assert "Whole run</th><td class=\"num\">1 min 15 s" in html
    assert "4.0× smaller" in html and "3.0 MiB" in html and sha256 in html
    link = f"/dashboard/jobs/{job_id}/artifacts/model.tar"
    assert f'href="{link}"' in html and "Cancel job" not in html and "Retry" not in html
    download = web.get(link)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == sha256
    assert download.headers["x-content-sha256"] == sha256 and "attachment" in download.headers["content-disposition"]
    part = web.get(link, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == data[10:20]

    with service.session() as session:  # a job from before the RTN baselines
        evaluation = {key: value for key, value in METRICS["eval"].items() if key != "baselines"}
        session.get(JobMetrics, job_id).metrics = METRICS | {"eval": evaluation}
        session.commit()
    html = web.get(f"/dashboard/jobs/{job_id}").text
    assert html.count('class="ppl-row"') == 3 and "12.000" in html and "RTN" not in html


def test_a_llamacpp_job_shows_its_target_the_engine_labels_and_how_to_run_the_gguf(web, sign_in, service):
    job_id = submit_api(web, sign_in("a"))
    with service.session() as session:  # as stored for a llamacpp job (stories260k itself is refused for one)
        job = session.get(Job, job_id)
        job.spec = job.spec | {"config": job.spec["config"] | {"target": "llamacpp", "kv_cache_type": "q4_1"}}
        session.commit()
    finish_with_artifact(service, job_id, b"x" * 1000)
    export = {"format": "gguf", "file": "model.gguf", "notes": "wkvquant_export.json", "size": 4096, "sha256": "0" * 64,
              "recommended_cache_type": {"k": "q4_1", "v": "q4_1"}}
    with service.session() as session:
        row = session.get(JobMetrics, job_id)
        row.metrics = row.metrics | {"eval": METRICS["eval"] | {"engine": {"target": "llamacpp", "cache_type": "q4_1"}},
                                     "export": export}
        session.commit()
    html = html_lib.unescape(web.get(f"/dashboard/jobs/{job_id}").text)
    assert '<span id="target">llamacpp, q4_1 cache</span>' in html
    assert "predicted llama.cpp perplexity (q4_1 cache)</td><td class=\"num\">12.000" in html
    assert "RTN + llama.cpp's own q4_1 cache</th>" in html and "attention-sink" not in html
    assert "llama-cli -m model.gguf -ctk q4_1 -ctv q4_1 -fa on" in html
    assert "llama-perplexity -m model.gguf -f TEXT -ctk q4_1 -ctv q4_1 -fa on" in html
    assert "model.gguf size</th><td class=\"num\">4.0 KiB" in html

    with service.session() as session:  # a runtime job's page has no engine labels and no GGUF command
        row = session.get(JobMetrics, job_id)
        row.metrics = METRICS
        session.get(Job, job_id).spec = TINY_JOB
        session.commit()
    html = html_lib.unescape(web.get(f"/dashboard/jobs/{job_id}").text)
    assert '<span id="target">runtime</span>' in html and "llama" not in html and "WKV: weights + KV cache" in html


def test_a_vllm_job_shows_the_predicted_vllm_perplexity_and_how_to_serve_it(web, sign_in, service):
    job_id = submit_api(web, sign_in("a"))
    with service.session() as session:  # as stored for a vllm job (stories260k itself is refused for one)
        job = session.get(Job, job_id)
        job.spec = job.spec | {"config": job.spec["config"] | {"target": "vllm"}}
        session.commit()
    finish_with_artifact(service, job_id, b"x" * 1000)
    serve = "vllm serve OUT --dtype bfloat16 --kv-cache-dtype int4_per_token_head --attention-backend TRITON_ATTN"
    export = {"format": "vllm", "file": "model-vllm.tar", "directory": "stories260k-w4kv4-vllm",
              "notes": "wkvquant_export.json", "size": 8192, "sha256": "0" * 64, "serve": serve,
              "kv_cache_dtype": "int4_per_token_head"}
    with service.session() as session:
        row = session.get(JobMetrics, job_id)
        row.metrics = row.metrics | {"eval": METRICS["eval"] | {"engine": {"target": "vllm",
                                                                           "cache_type": "int4_per_token_head"}},
                                     "export": export}
        session.commit()
    html = html_lib.unescape(web.get(f"/dashboard/jobs/{job_id}").text)
    assert '<span id="target">vllm</span>' in html
    assert "predicted vLLM perplexity (int4_per_token_head cache)</td><td class=\"num\">12.000" in html
    assert "RTN + vLLM's own int4_per_token_head cache</th>" in html and "attention-sink" not in html
    assert "W: weights quantized (auto cache)" in html and "predicted for the compressed-tensors checkpoint" in html
    assert "Serve it with vLLM" in html and "tar -xf model-vllm.tar" in html
    assert ("vllm serve stories260k-w4kv4-vllm --dtype bfloat16 --kv-cache-dtype int4_per_token_head "
            "--attention-backend TRITON_ATTN") in html
    assert "model-vllm.tar unpacks to stories260k-w4kv4-vllm/" in html and "llama" not in html
    assert "(int4_per_token_head) is the one the job was calibrated for; it is in vLLM's Triton attention" in html
    assert "model-vllm.tar size</th><td class=\"num\">8.0 KiB" in html


def test_cancel_and_retry_buttons(web, sign_in):
    job_id = submit_api(web, sign_in("a"))
    html = web.get(f"/dashboard/jobs/{job_id}").text
    assert f'action="/dashboard/jobs/{job_id}/cancel"' in html and "/retry" not in html
    response = web.post(f"/dashboard/jobs/{job_id}/cancel")
    assert response.status_code == 303 and response.headers["location"] == f"/dashboard/jobs/{job_id}"
    html = web.get(f"/dashboard/jobs/{job_id}").text
    assert "badge-cancelled" in html and f'action="/dashboard/jobs/{job_id}/retry"' in html and "/cancel" not in html
    refused = web.post(f"/dashboard/jobs/{job_id}/cancel")
    assert refused.status_code == 409 and "already cancelled" in refused.text
    assert web.post(f"/dashboard/jobs/{job_id}/retry").status_code == 303
    assert "badge-queued" in web.get(f"/dashboard/jobs/{job_id}").text


def test_the_delete_button_removes_the_job(web, sign_in):
    job_id = submit_api(web, sign_in("a"))
    assert f'action="/dashboard/jobs/{job_id}/delete"' in web.get(f"/dashboard/jobs/{job_id}").text
    response = web.post(f"/dashboard/jobs/{job_id}/delete")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/jobs"
    assert job_id not in web.get("/dashboard/jobs").text
    assert web.get(f"/dashboard/jobs/{job_id}").status_code == 410


# --------------------------------------------------------------------------------------------------------- new job


def test_the_new_job_form_lists_models_gpu_classes_and_datasets(web, sign_in):
    headers = sign_in("a")
    web.post("/v1/datasets", files={"file": ("notes.txt", b"a story. " * 100)}, headers=headers).raise_for_status()
    html = web.get("/dashboard/jobs/new").text
    assert '<option value="stories260k" selected>' in html and '<option value="default" selected>' in html
    assert "notes.txt" in html and 'value="W4KV8"' in html and 'name="idempotency_key"' in html


@pytest.mark.parametrize("changes, errors", [
    ({"nsamples": "0", "epochs": "many"}, {"nsamples": "greater than or equal to 1", "epochs": "valid integer"}),
    ({"group_size": "0"}, {"group_size": "positive or -1"}),
    ({"group_size": "7"}, {"group_size": "does not divide the model's hidden_size 64"}),
    ({"seqlen": "1024"}, {"seqlen": "max_position_embeddings 512"}),
    ({"gpu_class": "h100"}, {"gpu_class": "unknown GPU class 'h100'"}),
    ({"calib_source": "file"}, {"file": "choose a UTF-8 text file"}),
    ({"target": "llamacpp"}, {"target": "head_dim divisible by 32; this model's is 8"}),
    ({"target": "llamacpp", "kv_cache_type": "q8_0"}, {"kv_cache_type": "kv_bits is 4"}),
    ({"target": "vllm"}, {"target": "head_dim >= 32; this model's is 8"}),
    ({"target": "vllm", "kv_cache_type": "q4_0"}, {"kv_cache_type": "got 'q4_0'"}),
], ids=["pydantic", "validator", "group-size", "seqlen", "gpu-class", "no-file", "llamacpp-head_dim", "cache-type",
        "vllm-head_dim", "vllm-cache-type"])
def test_form_errors_render_inline(web, sign_in, changes, errors):
    sign_in("a")
    response = web.post("/dashboard/jobs/new", data=FORM | changes)
    assert response.status_code == 422 and "was not submitted" in response.text
    for field, message in errors.items():
        assert message in (field_error(response.text, field) or ""), (field, response.text)
        assert re.search(rf'id="{field}"[^>]*aria-invalid="true"', response.text) or field == "file"
    for field, value in changes.items():
        if field not in ("calib_source", "gpu_class"):
            assert f'value="{value}"' in response.text  # what was typed is kept


def test_a_too_short_upload_is_refused_inline_and_a_good_one_submits(web, sign_in, service):
    headers = sign_in("a")
    short = web.post("/dashboard/jobs/new", data=FORM | {"calib_source": "file"}, files={"file": ("s.txt", b"short")})
    assert short.status_code == 422 and "too short" in field_error(short.text, "file")
    text = ("Once upon a time there was a little dog. " * 20).encode()
    response = web.post("/dashboard/jobs/new", data=FORM | {"calib_source": "file", "preset": "W4"},
                        files={"file": ("story.txt", text, "text/plain")})
    assert response.status_code == 303, response.text
    job = web.get(f"/v1/jobs/{response.headers['location'].rsplit('/', 1)[1]}", headers=headers).json()
    assert job["calibration"]["source"] == "upload" and (job["config"]["w_bits"], job["config"]["kv_bits"]) == (4, 16)


def test_a_valid_form_submits_once_per_idempotency_key(web, sign_in):
    headers = sign_in("a")
    form = FORM | {"preset": "W4KV8", "idempotency_key": "form-1"}
    first, again = web.post("/dashboard/jobs/new", data=form), web.post("/dashboard/jobs/new", data=form)
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    job = web.get(f"/v1/jobs/{first.headers['location'].rsplit('/', 1)[1]}", headers=headers).json()
    assert job["config"]["kv_bits"] == 8 and job["config"]["nsamples"] == 4 and job["status"] == "queued"


# --------------------------------------------------------------------------------------------------------- queue


def test_queue_shows_counts_and_online_workers(web, sign_in, service, team_headers):
    own = submit_api(web, sign_in("a"))
    other = submit_api(web, team_headers("b"))
    update_job(service, other, status="running")
    now = utcnow()
    with service.session() as session:
        session.add_all([
            Worker(id="host:1:busy-own", hostname="host", gpu_classes=["default"], device="cuda:0", last_seen_at=now,
                   current_job_id=own),
            Worker(id="host:2:busy-other", hostname="host", gpu_classes=["default"], device="cpu", last_seen_at=now,
                   current_job_id=other),
            Worker(id="host:3:gone", hostname="host", gpu_classes=["default"], device="cpu",
                   last_seen_at=now.replace(year=now.year - 1)),
        ])
        session.commit()
    html = web.get("/dashboard/queue").text
    assert re.search(r'<tr class="class-row"><td>default</td><td class="num">1</td><td class="num">1</td>'
                     r'<td class="num">2</td>', html)
    assert html.count('class="worker-row"') == 2 and "host:3:gone" not in html
    assert f'href="/dashboard/jobs/{own}"' in html and other not in html and "busy (another team)" in html


def test_static_files_are_served_locally(web):
    htmx = web.get("/dashboard/static/htmx.min.js")
    assert htmx.status_code == 200 and htmx.headers["content-type"].startswith("text/javascript")
    assert web.get("/dashboard/static/dashboard.css").status_code == 200
    assert web.get("/dashboard/static/../endpoints.py").status_code == 404


# --------------------------------------------------------------------------------------------------------- CSRF


CROSS_SITE = [{"Origin": "https://evil.example"}, {"Origin": "https://testserver:8443"}, {"Origin": "null"},
              {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site", "Origin": "https://testserver"}]


@pytest.mark.parametrize("headers", CROSS_SITE)
def test_cross_site_posts_change_nothing(web, sign_in, service, headers):
    api = sign_in("a")
    job_id = submit_api(web, api)
    assert web.post("/dashboard/jobs/new", data=FORM, headers=headers).status_code == 403
    assert web.post(f"/dashboard/jobs/{job_id}/cancel", headers=headers).status_code == 403
    assert web.post("/dashboard/logout", headers=headers).status_code == 403
    signin = web.post("/dashboard/signin", data={"api_key": team_key(service, "b")}, headers=headers)
    assert signin.status_code == 403 and "set-cookie" not in signin.headers
    assert "another site" in signin.text
    assert [job["id"] for job in web.get("/v1/jobs", headers=api).json()["data"]] == [job_id]
    assert web.get(f"/v1/jobs/{job_id}", headers=api).json()["status"] == "queued"
    assert "Team <strong>a</strong>" in web.get("/dashboard/jobs").text


@pytest.mark.parametrize("headers", [{}, {"Origin": "https://testserver"}, {"Sec-Fetch-Site": "same-origin"},
                                     {"Sec-Fetch-Site": "none"}])
def test_same_origin_and_non_browser_posts_are_accepted(web, sign_in, headers):
    sign_in("a")
    assert web.post("/dashboard/jobs/new", data=FORM | {"idempotency_key": ""}, headers=headers).status_code == 303


def test_public_url_sets_the_accepted_origin(service, new_key):
    service.settings.PUBLIC_URL = "https://wkvq.example.com/"
    with TestClient(create_app(service), base_url="https://testserver", follow_redirects=False) as web:
        data = {"api_key": new_key("a")}
        assert web.post("/dashboard/signin", data=data, headers={"Origin": "https://testserver"}).status_code == 403
        assert web.post("/dashboard/signin", data=data,
                        headers={"Origin": "https://wkvq.example.com"}).status_code == 303


# --------------------------------------------------------------------------------------------------------- browser


@pytest.fixture
def page(request):
    """A Chromium page (Debian's, no download); on failure its screenshot goes to test-artifacts/<test>.png."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        yield page
        report = getattr(request.node, "rep_call", None)
        if report is None or report.failed:
            (REPO / "test-artifacts").mkdir(exist_ok=True)
            page.screenshot(path=REPO / "test-artifacts" / f"{request.node.name}.png", full_page=True)
        browser.close()


@pytest.mark.slow
def test_browser_submits_a_job_and_watches_it_live(page, tmp_path):
    from playwright.sync_api import expect

    env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store")
    server, base = start_server(env, tmp_path)
    try:
        key = admin_key(env, tmp_path, "team-ui")
        page.goto(f"{base}/")
        expect(page).to_have_url(re.compile(r"/dashboard/signin"))
        page.fill("#api_key", key)
        page.click("button:has-text('Sign in')")
        expect(page).to_have_url(re.compile(r"/dashboard/jobs$"))
        page.click("nav >> text=New job")
        page.select_option("#model", "stories260k")
        page.select_option("#preset", "W4KV4")
        for field, value in (("group_size", "-1"), ("nsamples", "4"), ("seqlen", "64"), ("epochs", "3"), ("crr_k", "2")):
            page.fill(f"#{field}", value)
        page.check("#calib_builtin")
        page.select_option("select[name=builtin_name]", "tinystories")
        page.click("button:has-text('Submit job')")
        expect(page).to_have_url(re.compile(r"/dashboard/jobs/[0-9a-f]{32}$"))

        page.evaluate("window.notReloaded = true")  # gone if the page were reloaded
        live = page.locator("#job-live")
        expect(page.locator("#block-progress")).to_have_text("5 / 5", timeout=240_000)
        expect(live).to_have_attribute("data-status", "succeeded", timeout=60_000)
        assert page.evaluate("window.notReloaded === true")
        expect(live).not_to_have_attribute("hx-trigger", re.compile("."))  # polling stopped
        expect(page.locator("#loss-chart svg polyline.loss")).to_have_count(5)
        expect(page.locator("#loss-chart svg")).to_be_visible()
        expect(page.locator("#metrics tr.ppl-row")).to_have_count(3)

        shown = page.locator("#artifacts .sha256").inner_text().strip()
        with page.expect_download() as info:
            page.click("#artifacts a:has-text('Download')")
        assert hashlib.sha256(Path(info.value.path()).read_bytes()).hexdigest() == shown

        # the README's picture: WKVQ_UPDATE_SCREENSHOT=1 pytest -k browser rewrites docs/dashboard.png
        target = REPO / ("docs" if os.environ.get("WKVQ_UPDATE_SCREENSHOT") else "test-artifacts") / "dashboard.png"
        target.parent.mkdir(exist_ok=True)
        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=target)
        assert target.stat().st_size < 300_000
    finally:
        server.stop()


def lan_address() -> str | None:
    """This machine's address on its network, not loopback: Chromium treats http://localhost and 127.x as secure
    origins (where Secure cookies are kept), as it does no other http address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))  # sends nothing: picks the outgoing interface
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.fixture
def lan_server(service):
    """The app served over plain http on the network address, as `wkvq serve --host 0.0.0.0` is reached."""
    address = lan_address()
    if address is None:
        pytest.skip("no network address besides loopback")
    with served(service, address) as base:
        yield base


def browser_sign_in(page, base: str, key: str) -> None:
    page.goto(f"{base}/dashboard/signin")
    page.fill("#api_key", key)
    page.click("button:has-text('Sign in')")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_browser_signs_in_over_plain_http_on_a_network_address(page, lan_server, service):
    from playwright.sync_api import expect

    browser_sign_in(page, lan_server, team_key(service, "a"))
    expect(page).to_have_url(re.compile(r"/dashboard/jobs$"))
    expect(page.locator("header")).to_contain_text("Team a")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_sign_in_the_browser_did_not_keep_says_so(page, live_server, service):
    """The browser drops the cookie (blocked, or Secure over http): the sign-in page says so instead of
    showing the empty form again."""
    from playwright.sync_api import expect

    def without_cookie(route):
        if route.request.method != "POST":
            return route.continue_()
        response = route.fetch(max_redirects=0)  # stores the cookie in the context: dropped again below
        page.context.clear_cookies()
        route.fulfill(response=response,
                      headers={k: v for k, v in response.headers.items() if k.lower() != "set-cookie"})

    page.route(re.compile(r"/dashboard/signin$"), without_cookie)
    browser_sign_in(page, live_server, team_key(service, "a"))
    expect(page).to_have_url(re.compile(r"/dashboard/signin"))
    expect(page.locator("#api_key-error")).to_contain_text("did not keep the sign-in cookie")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_header_fits_a_narrow_window(page, live_server, service):
    from playwright.sync_api import expect

    page.set_viewport_size({"width": 420, "height": 800})
    browser_sign_in(page, live_server, team_key(service, "a-team-with-a-rather-long-name"))
    expect(page).to_have_url(re.compile(r"/dashboard/jobs$"))
    for element in page.locator("header a, header span, header button").all():
        box = element.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 420, (element.inner_text(), box)
    assert page.evaluate("document.documentElement.scrollWidth") <= 420


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_api_docs_and_favicon_are_served_locally(page, live_server):
    """/docs renders with no network beyond this service (Swagger UI's files are shipped); the favicon exists."""
    from playwright.sync_api import expect

    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(live_server) else outside.append(r.url))
    page.goto(f"{live_server}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("WKVQuant calibration service", timeout=30_000)
    expect(page.locator(".opblock").first).to_be_visible()
    assert outside == []
    favicon = httpx.get(f"{live_server}/favicon.ico", timeout=30)
    assert favicon.status_code == 200 and favicon.headers["content-type"] == "image/x-icon"
    assert favicon.content[:4] == b"\x00\x00\x01\x00"  # an ICO file


ATTACK = """<!doctype html><html><body>
<form id="job" method="post" action="{base}/dashboard/jobs/new">{fields}</form>
<form id="signin" method="post" action="{base}/dashboard/signin"><input name="api_key" value="{key}"></form>
<script>document.getElementById("{form}").submit()</script></body></html>"""


@pytest.fixture
def attacker_site():
    """Serves one page (set `pages[path]`) on another port of 127.0.0.1: same site, other origin."""
    import http.server
    import threading

    pages: dict[str, str] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path, "").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", pages
    server.shutdown()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_page_on_another_port_cannot_post_as_the_signed_in_team(page, live_server, service, attacker_site):
    """The victim is signed in; a page of another origin on the same host (SameSite does not separate ports)
    auto-submits the new-job form, then a sign-in form with the attacker's key. Neither takes effect."""
    from playwright.sync_api import expect

    victim, attacker = team_key(service, "victim"), team_key(service, "attacker")
    page.goto(f"{live_server}/dashboard/signin")
    page.fill("#api_key", victim)
    page.click("button:has-text('Sign in')")
    expect(page).to_have_url(re.compile(r"/dashboard/jobs$"))

    origin, pages = attacker_site
    fields = "".join(f'<input name="{k}" value="{v}">' for k, v in FORM.items())
    for form in ("job", "signin"):
        pages[f"/{form}"] = ATTACK.format(base=live_server, fields=fields, key=attacker, form=form)
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.goto(f"{origin}/{form}")
        assert posted.value.status == 403
        expect(page.locator("h1")).to_have_text("Refused")

    with service.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    page.goto(f"{live_server}/dashboard/jobs")
    expect(page.locator("header")).to_contain_text("victim")
