"""The HTTP contract of the service, against real databases (every test runs on SQLite and on Postgres).

Nothing of ours is mocked: requests go through the FastAPI app into the services, the database and a `file://`
artifact store under tmp_path; the one real job is calibrated in-process by the worker's JobRunner.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from api.core.context import ServiceContext
from api.datasets.endpoints import router as datasets_router
from api.health.endpoints import router as health_router
from api.jobs.endpoints import router as jobs_router
from api.main import create_app
from api.models import Dataset, Job, JobEvent
from api.teams.service import team_service
from tests.conftest import CALIB_TEXT
from tests.service.conftest import TINY_JOB, service_settings
from worker.runner import JobRunner

Headers = dict[str, str]
NO_SUCH_ID = "0" * 32


# --------------------------------------------------------------------------------------------------------- helpers


def job_body(config: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """TINY_JOB with some `config` keys and top-level fields replaced."""
    body = copy.deepcopy(TINY_JOB)
    body["config"].update(config or {})
    body.update(fields)
    return body


def count(service: ServiceContext, model, *where) -> int:
    with service.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


def store_root(service: ServiceContext) -> Path:
    return Path(service.settings.STORAGE_URL.removeprefix("file://"))


def stored_files(service: ServiceContext, under: str = "") -> list[Path]:
    root = store_root(service) / under
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def submit(client: TestClient, headers: Headers, body: dict[str, Any] | None = None, key: str | None = None):
    if key is not None:
        headers = headers | {"Idempotency-Key": key}
    return client.post("/v1/jobs", json=TINY_JOB if body is None else body, headers=headers)


def create_job(client: TestClient, headers: Headers, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = submit(client, headers, body)
    assert response.status_code == 201, response.text
    return response.json()


def assert_invalid(response, path: tuple[str, ...], msg: str) -> None:
    """A 422 whose first error's loc starts with the request part and ends at `path` (in order), with `msg` in it."""
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    loc, message = error["loc"], error["msg"]
    assert loc[0] in ("body", "header", "query"), loc
    assert loc[-1] == path[-1], f"{loc} does not name {path[-1]!r}"
    remaining = iter(loc)
    assert all(part in remaining for part in path), f"{loc} does not contain {path} in order"
    assert isinstance(message, str) and msg.lower() in message.lower(), f"{msg!r} not in {message!r}"


def api_routes() -> list[tuple[str, APIRoute]]:
    """(full path, route) of every operation, from the routers `create_app` mounts (under /v1 or at the root)."""
    mounted = [("/v1", jobs_router), ("/v1", datasets_router), ("", health_router)]
    return [(prefix + route.path, route) for prefix, router in mounted for route in router.routes
            if isinstance(route, APIRoute)]


def upload(client: TestClient, headers: Headers, data: bytes, filename: str = "calib.txt"):
    return client.post("/v1/datasets", files={"file": (filename, data, "text/plain")}, headers=headers)


def key_of(headers: Headers) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


def sse_events(raw: str) -> list[dict[str, Any]]:
    """Parse a text/event-stream body into [{"event", "id", "data"}], skipping comments (keep-alive pings)."""
    events = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if fields:
            fields["data"] = json.loads(fields["data"]) if "data" in fields else None
            events.append(fields)
    return events


def read_events(client: TestClient, headers: Headers, job_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return sse_events(response.read().decode())


UTF8_TEXT = CALIB_TEXT.read_text(encoding="utf-8")[:3000].encode()


@pytest.fixture
def team_a(team_headers) -> Headers:
    return team_headers("a")


@pytest.fixture
def team_b(team_headers) -> Headers:
    return team_headers("b")


# ------------------------------------------------------------------------------------------------------------ auth


@pytest.fixture(params=["list", "status"])
def read_path(request, client, team_a) -> str:
    """The two reads clients poll; each checks the key in its own way (status: in the query that reads the job),
    so each gets every auth case. The status path names a real job of team a."""
    return "/v1/jobs" if request.param == "list" else f"/v1/jobs/{create_job(client, team_a)['id']}"


class TestAuth:
    @pytest.mark.parametrize("authorization, message", [
        (None, "missing or malformed"),
        ("Bearer ", "missing or malformed"),
        ("Bearer not-a-key", "missing or malformed"),
        ("Basic d2t2cTpzZWNyZXQ=", "missing or malformed"),
        ("Bearer wkvq_000000000000_unknownsecret", "invalid API key"),
    ])
    def test_rejected(self, client, read_path, authorization, message):
        headers = {} if authorization is None else {"Authorization": authorization}
        response = client.get(read_path, headers=headers)
        assert response.status_code == 401
        assert message in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"

    def test_known_prefix_with_wrong_secret(self, client, team_a, read_path):
        prefix = key_of(team_a).split("_")[1]
        response = client.get(read_path, headers={"Authorization": f"Bearer wkvq_{prefix}_wrong"})
        assert response.status_code == 401
        assert response.json()["detail"] == "invalid API key"

    def test_revoked(self, client, service, team_a, read_path):
        assert client.get(read_path, headers=team_a).status_code == 200
        with service.session() as session:
            team_service.revoke_key(session, prefix=key_of(team_a).split("_")[1])
        response = client.get(read_path, headers=team_a)
        assert response.status_code == 401
        assert "revoked" in response.json()["detail"]

    def test_keys_are_stored_hashed(self, service, team_a):
        key = key_of(team_a)
        prefix, secret = key.split("_", 2)[1:]
        with service.engine.connect() as conn:
            rows = conn.execute(text("SELECT * FROM api_keys")).mappings().all()
        assert len(rows) == 1
        row = rows[0]
        assert row["prefix"] == prefix
        assert row["key_hash"] != key and row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
        for column, value in row.items():
            assert key not in str(value) and secret not in str(value), f"the secret is stored in {column}"

    def test_every_v1_route_needs_a_key(self, client):
        routes = [(path, route) for path, route in api_routes() if path.startswith("/v1")]
        assert len(routes) == 14
        for template, route in routes:
            path = template.format(job_id=NO_SUCH_ID, name="model.tar", dataset_id=NO_SUCH_ID)
            for method in route.methods:
                response = client.request(method, path)
                assert response.status_code == 401, (method, path, response.text)


# ------------------------------------------------------------------------------------------------------------ jobs


class TestJobs:
    def test_submit_and_get(self, client, service, team_a):
        response = submit(client, team_a)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued" and job["gpu_class"] == "default" and job["attempts"] == 0
        assert job["model"] == TINY_JOB["model"] and job["calibration"] == TINY_JOB["calibration"]
        assert job["config"]["seqlen"] == 64 and job["config"]["w_bits"] == 4  # defaults filled in
        assert job["progress"] == 0.0 and job["total_blocks"] is None and job["error"] is None

        fetched = client.get(f"/v1/jobs/{job['id']}", headers=team_a)
        assert fetched.status_code == 200
        assert fetched.json() == job
        assert count(service, Job) == 1
        assert count(service, JobEvent, JobEvent.job_id == job["id"], JobEvent.kind == "queued") == 1

    def test_get_unknown_job(self, client, team_a):
        response = client.get(f"/v1/jobs/{NO_SUCH_ID}", headers=team_a)
        assert response.status_code == 404
        assert NO_SUCH_ID in response.json()["detail"]

    def test_list_filter_and_pagination(self, client, team_a):
        ids = [create_job(client, team_a)["id"] for _ in range(3)]
        assert client.post(f"/v1/jobs/{ids[0]}/cancel", headers=team_a).status_code == 200

        everything = client.get("/v1/jobs", headers=team_a).json()
        assert everything["count"] == 3 and {j["id"] for j in everything["data"]} == set(ids)

        queued = client.get("/v1/jobs", params={"status": "queued"}, headers=team_a).json()
        assert queued["count"] == 2 and {j["id"] for j in queued["data"]} == set(ids[1:])
        cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=team_a).json()
        assert cancelled["count"] == 1 and [j["id"] for j in cancelled["data"]] == ids[:1]
        assert client.get("/v1/jobs", params={"status": "succeeded"}, headers=team_a).json() == {"data": [], "count": 0}

        first = client.get("/v1/jobs", params={"limit": 2, "offset": 0}, headers=team_a).json()
        second = client.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=team_a).json()
        beyond = client.get("/v1/jobs", params={"limit": 2, "offset": 4}, headers=team_a).json()
        assert (first["count"], second["count"], beyond["count"]) == (3, 3, 3)
        assert (len(first["data"]), len(second["data"]), beyond["data"]) == (2, 1, [])
        assert {j["id"] for j in first["data"] + second["data"]} == set(ids)

    @pytest.mark.parametrize("params, field", [
        ({"status": "bogus"}, "status"), ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"offset": -1}, "offset"),
    ])
    def test_list_rejects_bad_query(self, client, team_a, params, field):
        response = client.get("/v1/jobs", params=params, headers=team_a)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", field]


class TestIdempotency:
    def test_replay_returns_the_same_job(self, client, service, team_a):
        first = submit(client, team_a, key="k-1")
        assert first.status_code == 201, first.text
        replay = submit(client, team_a, key="k-1")
        assert replay.status_code == 200, replay.text
        assert replay.json()["id"] == first.json()["id"]
        reordered = dict(reversed(list(copy.deepcopy(TINY_JOB).items())))  # same request, other key order
        assert submit(client, team_a, reordered, key="k-1").json()["id"] == first.json()["id"]
        assert count(service, Job) == 1
        assert count(service, JobEvent) == 1

    def test_same_key_other_body_is_rejected(self, client, service, team_a):
        assert submit(client, team_a, key="k-1").status_code == 201
        response = submit(client, team_a, job_body({"epochs": 2}), key="k-1")
        assert_invalid(response, ("header", "Idempotency-Key"), "Idempotency-Key")
        assert count(service, Job) == 1

    def test_keys_are_per_team(self, client, service, team_a, team_b):
        job_a = submit(client, team_a, key="shared")
        job_b = submit(client, team_b, key="shared")
        assert (job_a.status_code, job_b.status_code) == (201, 201)
        assert job_a.json()["id"] != job_b.json()["id"]
        assert count(service, Job) == 2


class TestTeamIsolation:
    @pytest.mark.parametrize("method, suffix", [
        ("GET", ""), ("POST", "/cancel"), ("POST", "/retry"), ("GET", "/events"), ("GET", "/metrics"),
        ("GET", "/artifacts"), ("GET", "/artifacts/model.tar"),
    ])
    def test_other_teams_job_is_not_found(self, client, team_a, team_b, method, suffix):
        job = create_job(client, team_a)
        response = client.request(method, f"/v1/jobs/{job['id']}{suffix}", headers=team_b)
        assert response.status_code == 404, response.text
        assert "not found" in response.json()["detail"]
        after = client.get(f"/v1/jobs/{job['id']}", headers=team_a).json()
        assert after["status"] == "queued" and after["updated_at"] == job["updated_at"]

    def test_lists_are_per_team(self, client, team_a, team_b):
        job = create_job(client, team_a)
        assert client.get("/v1/jobs", headers=team_b).json() == {"data": [], "count": 0}
        assert [j["id"] for j in client.get("/v1/jobs", headers=team_a).json()["data"]] == [job["id"]]


# ------------------------------------------------------------------------------------------------ input validation

BAD_JOBS = {
    # id: (body, loc path, message fragment)
    "unknown-local-model": (job_body(model={"source": "local", "name": "llama-404"}), ("model", "name"),
                            "unknown model 'llama-404'; available: stories260k"),
    "model-path-traversal": (job_body(model={"source": "local", "name": "../x"}), ("model", "name"), "pattern"),
    "model-absolute-path": (job_body(model={"source": "local", "name": "/etc"}), ("model", "name"), "pattern"),
    "w_bits-1": (job_body({"w_bits": 1}), ("config", "w_bits"), "between 2 and 8, or 16"),
    "w_bits-9": (job_body({"w_bits": 9}), ("config", "w_bits"), "between 2 and 8, or 16"),
    "w_bits-17": (job_body({"w_bits": 17}), ("config", "w_bits"), "between 2 and 8, or 16"),
    "kv_bits-0": (job_body({"kv_bits": 0}), ("config", "kv_bits"), "between 2 and 8, or 16"),
    "group_size-0": (job_body({"group_size": 0}), ("config", "group_size"), "positive or -1"),
    "group_size-100": (job_body({"group_size": 100}), ("config", "group_size"),
                       "group_size 100 does not divide the model's hidden_size 64"),
    "group_size-128": (job_body({"group_size": 128}), ("config", "group_size"), "does not divide"),
    "kv_group_size-3": (job_body({"kv_group_size": 3}), ("config", "kv_group_size"),
                        "kv_group_size 3 does not divide head_dim 8"),
    "seqlen-too-long": (job_body({"seqlen": 1024}), ("config", "seqlen"), "max_position_embeddings 512"),
    "unknown-method": (job_body({"method": "best"}), ("config", "method"), "'paper' or 'recommended'"),
    "epochs-negative": (job_body({"epochs": -1}), ("config", "epochs"), "greater than or equal to 0"),
    "nsamples-0": (job_body({"nsamples": 0}), ("config", "nsamples"), "greater than or equal to 1"),
    "unknown-gpu-class": (job_body(gpu_class="h100"), ("gpu_class",), "unknown GPU class 'h100'; available: default"),
    "unknown-dataset": (job_body(calibration={"source": "upload", "dataset_id": NO_SUCH_ID}),
                        ("calibration", "dataset_id"), f"unknown dataset {NO_SUCH_ID}"),
    "malformed-dataset-id": (job_body(calibration={"source": "upload", "dataset_id": "../x"}),
                             ("calibration", "dataset_id"), "pattern"),
    "unknown-builtin-dataset": (job_body(calibration={"source": "builtin", "name": "pile"}),
                                ("calibration", "name"), "tinystories"),
    "hub-model-offline": (job_body(model={"source": "hf", "id": "meta-llama/Llama-2-7b-hf"}), ("model", "id"),
                          "unreachable"),
    "unknown-field": (job_body(bogus=1), ("bogus",), "extra inputs are not permitted"),
    "unknown-config-field": (job_body({"bits": 4}), ("config", "bits"), "extra inputs are not permitted"),
    "missing-calibration": ({k: v for k, v in TINY_JOB.items() if k != "calibration"}, ("calibration",), "required"),
}


class TestValidation:
    @pytest.mark.parametrize("case", BAD_JOBS)
    def test_bad_job_is_rejected_without_side_effects(self, client, service, team_a, case):
        body, path, message = BAD_JOBS[case]
        assert_invalid(submit(client, team_a, body, key=f"bad-{case}"), path, message)
        assert count(service, Job) == 0
        assert count(service, JobEvent) == 0
        assert stored_files(service) == []

    def test_rejected_key_can_be_reused(self, client, team_a):
        assert submit(client, team_a, job_body({"w_bits": 1}), key="k").status_code == 422
        assert submit(client, team_a, key="k").status_code == 201

    def test_non_llama_model(self, client, service, team_a, tmp_path):
        models = tmp_path / "models"
        (models / "gpt2-tiny").mkdir(parents=True)
        (models / "gpt2-tiny" / "config.json").write_text(json.dumps(
            {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64, "n_head": 8}))
        ctx = ServiceContext.from_settings(service_settings(service.settings.DATABASE_URL, service.settings.STORAGE_URL,
                                                            MODELS_DIR=models))
        try:
            with TestClient(create_app(ctx)) as gpt2_client:
                response = submit(gpt2_client, team_a, job_body(model={"source": "local", "name": "gpt2-tiny"}))
                assert_invalid(response, ("model",), "architecture GPT2LMHeadModel is not supported")
                assert "LlamaForCausalLM" in response.json()["detail"][0]["msg"]
                response = submit(gpt2_client, team_a)  # stories260k is not in this models directory
                assert_invalid(response, ("model", "name"), "available: gpt2-tiny")
        finally:
            ctx.close()
        assert count(service, Job) == 0
        assert stored_files(service) == []


# -------------------------------------------------------------------------------------------------------- datasets


class TestDatasets:
    def test_upload_and_use(self, client, service, team_a):
        response = upload(client, team_a, UTF8_TEXT)
        assert response.status_code == 201, response.text
        dataset = response.json()
        assert dataset["sha256"] == hashlib.sha256(UTF8_TEXT).hexdigest()
        assert dataset["size"] == len(UTF8_TEXT) and dataset["chars"] == len(UTF8_TEXT.decode())
        assert dataset["filename"] == "calib.txt"
        [stored] = stored_files(service)
        assert stored.read_bytes() == UTF8_TEXT
        assert [d["id"] for d in client.get("/v1/datasets", headers=team_a).json()] == [dataset["id"]]

        job = create_job(client, team_a, job_body(calibration={"source": "upload", "dataset_id": dataset["id"]}))
        assert job["calibration"] == {"source": "upload", "dataset_id": dataset["id"]}

    def test_dataset_shorter_than_a_window(self, client, service, team_a):
        dataset = upload(client, team_a, UTF8_TEXT[:300]).json()
        response = submit(client, team_a, job_body({"seqlen": 500},
                                                   calibration={"source": "upload", "dataset_id": dataset["id"]}))
        assert_invalid(response, ("calibration", "dataset_id"), "fewer than the 501 tokens")
        assert count(service, Job) == 0

    @pytest.mark.parametrize("data, status, message", [
        pytest.param(UTF8_TEXT[:500] + b"\xff\xfe" + UTF8_TEXT[500:], 422,
                     "not UTF-8 text (invalid byte at offset 500)", id="not-utf8"),
        pytest.param(b"too short " * 5, 422, "too short", id="too-short"),
        pytest.param(b" " * 5000 + b"x" * 50, 422, "too short", id="whitespace"),
        pytest.param(b"a" * (64 * 1024 + 1), 413, "larger than 65536 bytes", id="oversized"),
    ])
    def test_rejected_upload_leaves_nothing(self, client, service, team_a, data, status, message):
        response = upload(client, team_a, data)
        assert response.status_code == status, response.text
        if status == 422:
            assert_invalid(response, ("file",), message)
        else:
            assert message in response.json()["detail"]
        assert count(service, Dataset) == 0
        assert stored_files(service) == []

    def test_upload_without_file(self, client, service, team_a):
        response = client.post("/v1/datasets", data={"other": "x"}, headers=team_a)
        assert_invalid(response, ("file",), "required")
        assert count(service, Dataset) == 0

    @pytest.mark.parametrize("filename, stored_as", [
        ("../../etc/passwd", "passwd"), ("..\\..\\windows\\evil.txt", "evil.txt"), ("a b;<c>.txt", "a bc.txt"),
        ("..", "upload.txt"),
    ])
    def test_filename_is_sanitized(self, client, service, team_a, tmp_path, filename, stored_as):
        response = upload(client, team_a, UTF8_TEXT, filename=filename)
        assert response.status_code == 201, response.text
        assert response.json()["filename"] == stored_as
        with service.session() as session:
            assert session.scalar(select(Dataset.filename)) == stored_as
        [stored] = stored_files(service)
        assert stored.relative_to(store_root(service)).parts[0] == "datasets"
        assert stored.name == f"{response.json()['id']}.txt"
        assert not list(tmp_path.rglob("passwd")) and not list(tmp_path.rglob("evil.txt"))

    def test_other_teams_dataset_is_unknown(self, client, service, team_a, team_b):
        dataset = upload(client, team_a, UTF8_TEXT).json()
        assert client.get("/v1/datasets", headers=team_b).json() == []
        response = submit(client, team_b, job_body(calibration={"source": "upload", "dataset_id": dataset["id"]}))
        assert_invalid(response, ("calibration", "dataset_id"), f"unknown dataset {dataset['id']}")
        response = submit(client, team_b, job_body(evaluation={"source": "upload", "dataset_id": dataset["id"]}))
        assert_invalid(response, ("evaluation", "dataset_id"), "unknown dataset")
        assert count(service, Job) == 0


# ---------------------------------------------------------------------------------------------- cancel and retry


class TestCancelRetry:
    def test_cancel_queued_then_retry(self, client, service, team_a):
        job = create_job(client, team_a)
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=team_a)
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"] is not None
        assert client.get(f"/v1/jobs/{job['id']}", headers=team_a).json()["status"] == "cancelled"
        events = read_events(client, team_a, job["id"])  # the job has ended, so the stream ends
        assert [e["event"] for e in events] == ["queued", "cancelled", "end"]
        assert events[-1]["data"] == {"status": "cancelled"}

        again = client.post(f"/v1/jobs/{job['id']}/cancel", headers=team_a)
        assert again.status_code == 409
        assert "already cancelled" in again.json()["detail"]

        retried = client.post(f"/v1/jobs/{job['id']}/retry", headers=team_a)
        assert retried.status_code == 200
        assert retried.json()["status"] == "queued" and retried.json()["attempts"] == 0
        assert retried.json()["finished_at"] is None
        assert count(service, JobEvent, JobEvent.job_id == job["id"], JobEvent.kind == "retried") == 1

        queued = client.post(f"/v1/jobs/{job['id']}/retry", headers=team_a)
        assert queued.status_code == 409
        assert "only failed or cancelled jobs can be retried" in queued.json()["detail"]

    def test_unknown_job(self, client, team_a):
        assert client.post(f"/v1/jobs/{NO_SUCH_ID}/cancel", headers=team_a).status_code == 404
        assert client.post(f"/v1/jobs/{NO_SUCH_ID}/retry", headers=team_a).status_code == 404

    def test_no_results_yet(self, client, team_a):
        job = create_job(client, team_a)
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics", headers=team_a)
        assert metrics.status_code == 404
        assert "no metrics yet (status queued)" in metrics.json()["detail"]
        assert client.get(f"/v1/jobs/{job['id']}/artifacts", headers=team_a).json() == []
        download = client.get(f"/v1/jobs/{job['id']}/artifacts/model.tar", headers=team_a)
        assert download.status_code == 404


# ------------------------------------------------------------------------------------------ a real job, downloads


class TestFinishedJob:
    @pytest.fixture
    def finished(self, client, service, team_a) -> dict[str, Any]:
        """TINY_JOB calibrated in-process by the worker's runner."""
        job = create_job(client, team_a)
        runner = JobRunner(service, "test-worker")
        lease = runner.claim_next(["default"])
        assert lease is not None and lease.job_id == job["id"]
        runner.execute(lease)
        return job

    def test_run_download_and_events(self, client, team_a, team_b, finished):
        job_url = f"/v1/jobs/{finished['id']}"
        job = client.get(job_url, headers=team_a).json()
        assert (job["status"], job["error"], job["stage"]) == ("succeeded", None, "done"), job
        assert (job["total_blocks"], job["current_block"], job["progress"]) == (5, 5, 1.0)
        assert job["attempts"] == 1 and job["last_loss"] is not None

        metrics = client.get(f"{job_url}/metrics", headers=team_a)
        assert metrics.status_code == 200
        [artifact] = client.get(f"{job_url}/artifacts", headers=team_a).json()
        assert artifact["name"] == "model.tar" and artifact["media_type"] == "application/x-tar"
        assert artifact["sha256"] == metrics.json()["artifact"]["sha256"]
        assert artifact["download_url"].endswith(f"{job_url}/artifacts/model.tar")

        full = client.get(artifact["download_url"], headers=team_a)
        assert full.status_code == 200
        body, size = full.content, artifact["size"]
        assert len(body) == size == int(full.headers["content-length"])
        assert hashlib.sha256(body).hexdigest() == full.headers["x-content-sha256"] == artifact["sha256"]
        assert full.headers["accept-ranges"] == "bytes"
        assert full.headers["content-type"] == "application/x-tar"

        head = client.get(artifact["download_url"], headers=team_a | {"Range": "bytes=0-99"})
        assert head.status_code == 206 and head.content == body[:100]
        assert head.headers["content-range"] == f"bytes 0-99/{size}" and head.headers["content-length"] == "100"
        tail = client.get(artifact["download_url"], headers=team_a | {"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == body[-10:]
        assert tail.headers["content-range"] == f"bytes {size - 10}-{size - 1}/{size}"
        rest = client.get(artifact["download_url"], headers=team_a | {"Range": f"bytes={size - 5}-"})
        assert rest.status_code == 206 and rest.content == body[-5:]
        beyond = client.get(artifact["download_url"], headers=team_a | {"Range": "bytes=999999999-"})
        assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{size}"

        assert client.get(artifact["download_url"], headers=team_b).status_code == 404
        assert client.get(f"{job_url}/artifacts/other.tar", headers=team_a).status_code == 404

        events = read_events(client, team_a, finished["id"])
        kinds = [e["event"] for e in events]
        assert kinds[0] == "queued" and "started" in kinds and kinds[-2:] == ["succeeded", "end"]
        assert events[-1]["data"] == {"status": "succeeded"}
        block_ends = [e["data"] for e in events if e["event"] == "block_end"]
        assert sorted(e["block"] for e in block_ends) == [0, 1, 2, 3, 4]
        assert all(e["n_blocks"] == 5 and e["seconds"] is not None for e in block_ends)
        ids = [int(e["id"]) for e in events if e["event"] != "end"]
        assert ids == sorted(ids) and all(int(e["id"]) == e["data"]["id"] for e in events if e["event"] != "end")

        with client.stream("GET", f"{job_url}/events", headers=team_a | {"Last-Event-ID": str(ids[-2])}) as resumed:
            assert [e["event"] for e in sse_events(resumed.read().decode())] == ["succeeded", "end"]

        done = client.post(f"{job_url}/cancel", headers=team_a)
        assert done.status_code == 409 and "already succeeded" in done.json()["detail"]
        assert client.post(f"{job_url}/retry", headers=team_a).status_code == 409


# ---------------------------------------------------------------------------------------------- health, OpenAPI


class TestHealth:
    def test_healthz(self, client):
        response = client.get("/healthz")
        assert response.status_code == 200 and response.json() == {"status": "ok"}

    def test_readyz(self, client):
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok", "storage": "ok"}}


class TestOpenAPI:
    V1_PATHS = {
        "/v1/jobs": {"get", "post"},
        "/v1/jobs/{job_id}": {"get", "delete"},
        "/v1/jobs/{job_id}/cancel": {"post"},
        "/v1/jobs/{job_id}/retry": {"post"},
        "/v1/jobs/{job_id}/events": {"get"},
        "/v1/jobs/{job_id}/metrics": {"get"},
        "/v1/jobs/{job_id}/artifacts": {"get"},
        "/v1/jobs/{job_id}/artifacts/{name}": {"get", "head"},
        "/v1/datasets": {"get", "post"},
        "/v1/datasets/{dataset_id}": {"delete"},
    }

    def test_lists_every_v1_path(self, client):
        paths = client.get("/openapi.json").json()["paths"]
        assert {p: set(ops) for p, ops in paths.items() if p.startswith("/v1")} == self.V1_PATHS
        assert {path for path, _ in api_routes() if path.startswith("/v1")} == set(self.V1_PATHS)

    def test_operation_ids(self, client):
        paths = client.get("/openapi.json").json()["paths"]
        seen = []
        for path, route in api_routes():
            for method in route.methods:
                operation = paths[path][method.lower()]
                assert operation["operationId"] == f"{route.tags[0]}-{route.name}"
                assert operation["tags"] == route.tags
                seen.append(operation["operationId"])
        assert len(seen) == len(set(seen)) == sum(len(ops) for ops in paths.values())
        assert {"jobs-submit_job", "jobs-download_artifact", "datasets-upload_dataset", "health-readyz"} <= set(seen)
