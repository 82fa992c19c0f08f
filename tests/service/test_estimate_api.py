"""Resource estimates at submit: stored in the job row, returned by the API, shown on the job page, and enforced
against the budget of the job's GPU class (422 naming the limit, nothing written). Every test runs on SQLite and
on Postgres (the `service` fixture)."""

from __future__ import annotations

import copy
import json
import shutil

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.core.config import GpuBudget, Settings
from api.core.context import ServiceContext
from api.core.migrate import upgrade
from api.main import create_app
from api.models import Job, JobEvent
from tests.conftest import TINY_MODEL
from tests.service.conftest import TINY_JOB, service_settings, team_key
from wkvq_core.calib import estimate as core_estimate
from wkvq_core.calib.estimate import format_bytes

# LLaMA-2-70B's shape (GQA 64/8), with a context long enough for the issue's 32768-token samples.
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "vocab_size": 32000, "max_position_embeddings": 32768, "torch_dtype": "float16"}
HUGE = {"model": {"source": "local", "name": "llama-70b-shape"},
        "calibration": {"source": "builtin", "name": "tinystories"}, "config": {"nsamples": 4096, "seqlen": 32768}, "gpu_class": "a100"}


@pytest.fixture
def ctx(tmp_path, db_url):
    """A service whose models directory holds stories260k and a 70B-shaped config; GPU classes a100 and default."""
    models = tmp_path / "models"
    shutil.copytree(TINY_MODEL, models / "stories260k")
    (models / "llama-70b-shape").mkdir()
    (models / "llama-70b-shape" / "config.json").write_text(json.dumps(LLAMA_70B))
    # an API in front of a worker pool (Celery): a GPU class's budget is its device kind's
    settings = service_settings(db_url, str(tmp_path / "store"), MODELS_DIR=models, GPU_CLASSES=["default", "a100"],
                                DISPATCHER="celery")
    upgrade(settings.DATABASE_URL)
    context = ServiceContext.from_settings(settings)
    yield context
    context.close()


def client_for(ctx: ServiceContext) -> TestClient:
    return TestClient(create_app(ctx), base_url="https://testserver", follow_redirects=False)


def new_key(ctx: ServiceContext, team: str = "a") -> str:
    return team_key(ctx, team)


def rows(ctx: ServiceContext, model) -> int:
    with ctx.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def assert_budget_error(response, *needles: str) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "config"]
    for needle in needles:
        assert needle in error["msg"], (needle, error["msg"])
    return error["msg"]


def test_estimate_is_stored_returned_and_listed(ctx):
    headers = {"Authorization": f"Bearer {new_key(ctx)}"}
    with client_for(ctx) as client:
        response = client.post("/v1/jobs", json=TINY_JOB, headers=headers)
        assert response.status_code == 201, response.text
        job = response.json()
        estimate = job["estimate"]
        assert estimate["device"] == "cpu"  # WKVQ_DEVICE=cpu: the default class is budgeted as the CPU
        assert estimate["peak_host_bytes"] > estimate["breakdown"]["host"]["activation_caches"] > 0
        assert estimate["inputs"]["nsamples"] == 4 and estimate["inputs"]["seqlen"] == 64
        assert estimate["inputs"]["eval_windows"] > 0  # the built-in set brings its evaluation text
        assert estimate["flops"] > 0 and estimate["seconds"] > 0
        assert client.get(f"/v1/jobs/{job['id']}", headers=headers).json()["estimate"] == estimate
        assert client.get("/v1/jobs", headers=headers).json()["data"][0]["estimate"] == estimate
    with ctx.session() as session:
        assert session.get(Job, job["id"]).estimate == estimate


def test_issue_example_is_refused_naming_the_budget(ctx):
    """The issue's 70B-shaped job with 4096 x 32768 samples got 201; its activation caches alone are 4.4 TB."""
    headers = {"Authorization": f"Bearer {new_key(ctx)}"}
    with client_for(ctx) as client:
        response = client.post("/v1/jobs", json=HUGE, headers=headers | {"Idempotency-Key": "huge"})
        message = assert_budget_error(response, "estimated peak host memory", "exceeds the budget of gpu class 'a100'",
                                      "(512 GB", "activation_caches")
        assert "TB" in message.split("exceeds")[0]
        # smaller samples fit the host, but one 32768-token batch through 5 blocks does not fit an A100
        small = copy.deepcopy(HUGE) | {"config": {"nsamples": 16, "seqlen": 32768, "crr_k": 5}}
        assert_budget_error(client.post("/v1/jobs", json=small, headers=headers), "estimated peak device memory",
                            "gpu class 'a100'")
        assert client.post("/v1/jobs", json=TINY_JOB, headers=headers | {"Idempotency-Key": "huge"}).status_code == 201
    assert rows(ctx, Job) == 1 and rows(ctx, JobEvent) == 1  # the refused ones left nothing


def test_time_budget_and_override(ctx):
    """A budget from WKVQ_GPU_BUDGETS replaces the default of its class; the estimated time is checked too."""
    settings = ctx.settings.model_copy(update={"GPU_BUDGETS": {"default": GpuBudget(device="cpu", host_memory_gb=64,
                                                                                     max_seconds=1)}})
    strict = ServiceContext.from_settings(settings)
    headers = {"Authorization": f"Bearer {new_key(strict)}"}
    try:
        with client_for(strict) as client:
            body = copy.deepcopy(TINY_JOB)
            body["config"] |= {"nsamples": 64, "seqlen": 512, "epochs": 5}
            assert_budget_error(client.post("/v1/jobs", json=body, headers=headers), "estimated time",
                                "gpu class 'default' (1.0 s, cpu)")
    finally:
        strict.close()
    assert rows(ctx, Job) == 0


def test_budgets_from_the_environment(monkeypatch):
    monkeypatch.setenv("WKVQ_GPU_BUDGETS", json.dumps({"gpu-a100": {"device": "a100-80gb", "host_memory_gb": 256,
                                                                    "max_seconds": 3600}}))
    settings = Settings(_env_file=None, GPU_CLASSES=["gpu-a100", "gpu-h100"], DISPATCHER="celery")
    assert settings.budget("gpu-a100").host_memory_bytes == 256 * 10**9
    assert settings.budget("gpu-a100").seconds(settings) == 3600
    h100 = settings.budget("gpu-h100")  # not listed: by the kind its name mentions
    assert h100.device == "h100-80gb" and h100.seconds(settings) == settings.JOB_TIME_LIMIT_SECONDS
    assert h100.device_memory_bytes == int(0.9 * 80 * 2**30)
    monkeypatch.setenv("WKVQ_GPU_BUDGETS", json.dumps({"x": {"device": "tpu-v5"}}))
    with pytest.raises(ValueError, match="unknown device kind 'tpu-v5'"):
        Settings(_env_file=None)


def test_job_page_shows_the_estimate(ctx):
    key = new_key(ctx)
    with client_for(ctx) as web:
        job = web.post("/v1/jobs", json=TINY_JOB, headers={"Authorization": f"Bearer {key}"}).json()
        assert web.post("/dashboard/signin", data={"api_key": key}).status_code == 303
        page = web.get(f"/dashboard/jobs/{job['id']}")
        assert page.status_code == 200
        html = page.text
        section = html[html.index('id="estimate"'):]
        section = section[:section.index("</section>")]
        assert "Resource estimate" in section and "for cpu" in section
        assert format_bytes(job["estimate"]["peak_host_bytes"]) in section
        assert "activation_caches" in section or "baseline" in section


def test_dashboard_form_shows_the_budget_refusal(ctx):
    form = {"model": "llama-70b-shape", "preset": "W4KV4", "group_size": "128", "nsamples": "4096", "seqlen": "32768",
            "epochs": "5", "crr_k": "5", "seed": "0", "gpu_class": "a100", "calib_source": "builtin",
            "builtin_name": "tinystories"}
    with client_for(ctx) as web:
        assert web.post("/dashboard/signin", data={"api_key": new_key(ctx)}).status_code == 303
        response = web.post("/dashboard/jobs/new", data=form)
    assert response.status_code == 422 and "was not submitted" in response.text
    assert "exceeds the budget of gpu class &#39;a100&#39; (512 GB" in response.text
    assert rows(ctx, Job) == 0 and rows(ctx, JobEvent) == 0


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    """`service` and `live_server` with GPU classes default and a100, run by embedded workers on the CPU."""
    return service_settings(db_url, str(tmp_path / "store"), GPU_CLASSES=["default", "a100"])


def test_an_embedded_cpu_service_estimates_for_the_cpu(live_server, service):
    """Issue 24 finding 7: a job that embedded workers run on the CPU (WKVQ_DEVICE=cpu) was estimated, budgeted and
    shown "for a100-80gb" because its class is named a100; the API and the job page now name the CPU, with the CPU's
    time."""
    key = team_key(service, "a")
    with httpx.Client(base_url=live_server, timeout=60) as http:
        response = http.post("/v1/jobs", json=TINY_JOB | {"gpu_class": "a100"},
                             headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["estimate"]["device"] == "cpu"
        assert job["estimate"]["inputs"]["flops_per_second"] == core_estimate.DEVICE_KINDS["cpu"].flops_per_second(
            "float32")
        signin = http.post("/dashboard/signin", data={"api_key": key})
        assert signin.status_code == 303, signin.text
        cookie = signin.headers["set-cookie"].split(";")[0]  # Secure: httpx keeps it for https only
        page = http.get(f"/dashboard/jobs/{job['id']}", headers={"Cookie": cookie})
    assert page.status_code == 200, page.text
    section = page.text[page.text.index('id="estimate"'):]
    assert "for cpu" in section[:section.index("</section>")]
    assert "a100-80gb" not in page.text
