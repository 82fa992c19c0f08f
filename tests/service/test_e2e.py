"""End to end over real HTTP: `wkvq serve` processes, a real Celery worker process, Postgres and Redis."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from api.models import BlockCheckpoint
from tests.conftest import fresh_pg_database
from worker.artifact_tar import extract_artifact
from wkvq_client import sse_events
from wkvq_core.artifact import load_quantized

from .conftest import TINY_JOB
from .processes import REPO, RedisServer, admin_key, service_env, start_server, start_worker, wkvq

pytestmark = pytest.mark.slow

# About 3 s per block on one CPU thread: long enough to act between blocks.
SLOW_JOB = TINY_JOB | {"config": TINY_JOB["config"] | {"nsamples": 32, "seqlen": 128, "epochs": 6}}


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def client(base: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def job_state(api: httpx.Client, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}").raise_for_status().json()


def wait_status(api: httpx.Client, job_id: str, status: str, timeout: float = 240) -> dict:
    def reached():
        job = job_state(api, job_id)
        assert job["status"] not in {"succeeded", "failed", "cancelled"} - {status}, job
        return job if job["status"] == status else None

    return wait_for(reached, timeout, f"job {job_id} to be {status}")


def download_and_load(api: httpx.Client, job_id: str, tmp_path: Path) -> str:
    """Downloads the artifact, checks its sha256 three ways, unpacks and loads it; returns the sha256."""
    (artifact,) = api.get(f"/v1/jobs/{job_id}/artifacts").raise_for_status().json()
    response = api.get(artifact["download_url"]).raise_for_status()
    digest = hashlib.sha256(response.content).hexdigest()
    assert digest == artifact["sha256"] == response.headers["x-content-sha256"]
    assert len(response.content) == artifact["size"]
    tar = tmp_path / f"{job_id}.tar"
    tar.write_bytes(response.content)
    model = load_quantized(extract_artifact(tar, tmp_path / job_id))
    assert model.config.quantization_config["kv_bits"] == 4
    return digest


def events(api: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    return list(sse_events(api, f"/v1/jobs/{job_id}/events"))


class TestEmbedded:
    """`wkvq serve` with SQLite, a local store and its in-process worker; keys from `wkvq admin`."""

    @pytest.fixture
    def embedded(self, tmp_path):
        env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store")
        server, base = start_server(env, tmp_path)
        key = admin_key(env, tmp_path, "team-a")
        yield client(base, key), tmp_path
        server.stop()

    def test_job_from_post_to_loaded_artifact(self, embedded):
        api, tmp_path = embedded
        job = api.post("/v1/jobs", json=TINY_JOB).raise_for_status().json()
        stream = events(api, job["id"])  # follows the job until it ends
        kinds = [kind for kind, _ in stream]
        assert kinds[0] == "queued" and kinds[-1] == "end" and "succeeded" in kinds
        assert [data["block"] for kind, data in stream if kind == "block_end"] == [0, 1, 2, 3, 4]
        assert all(data["loss"] > 0 for kind, data in stream if kind == "epoch_end")
        done = job_state(api, job["id"])
        assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["current_block"] == 5
        metrics = api.get(f"/v1/jobs/{job['id']}/metrics").raise_for_status().json()
        assert set(metrics["eval"]["ppl"]) == {"fp", "w", "wkv"}
        assert metrics["eval"]["ppl"]["wkv"] > metrics["eval"]["ppl"]["fp"]
        assert download_and_load(api, job["id"], tmp_path) == metrics["artifact"]["sha256"]

    def test_cancel_between_blocks_keeps_checkpoints_and_retry_resumes(self, embedded):
        api, tmp_path = embedded
        job_id = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
        wait_for(lambda: job_state(api, job_id)["current_block"] >= 2, 120, "two finished blocks")
        assert api.post(f"/v1/jobs/{job_id}/cancel").raise_for_status().json()["cancel_requested"] is True
        cancelled = wait_status(api, job_id, "cancelled", timeout=60)
        kept = len(list((tmp_path / "store" / "jobs" / job_id / "checkpoints").glob("block-*.safetensors")))
        assert 2 <= kept < 5 and cancelled["current_block"] >= 2

        assert api.post(f"/v1/jobs/{job_id}/retry").raise_for_status().json()["status"] == "queued"
        wait_status(api, job_id, "succeeded")
        stream = events(api, job_id)
        retried = [kind for kind, _ in stream].index("retried")
        after = stream[retried:]
        assert [d["block"] for k, d in after if k == "block_resumed"] == list(range(kept))
        assert [d["block"] for k, d in after if k == "block_start"] == list(range(kept, 5))
        download_and_load(api, job_id, tmp_path)

    def test_readme_main_command(self, tmp_path):
        readme = (REPO / "README.md").read_text()
        command = re.search(r"\.venv/bin/(wkvq demo[^\n]*)", readme)
        assert command, "the README's main command runs `wkvq demo`"
        args = command.group(1).split()[1:] + ["--nsamples", "8", "--seqlen", "128", "--epochs", "1",
                                               "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
        result = wkvq(service_env("unused", tmp_path), *args, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verified" in result.stdout and re.search(r"wkv\s+│\s+\d+\.\d+", result.stdout), result.stdout
        assert (tmp_path / "out" / "model.safetensors").is_file()


class TestCeleryPool:
    """Postgres + a private Redis + `wkvq serve` as the API + real `wkvq worker` processes (Celery, solo pool)."""

    @pytest.fixture
    def pool(self, tmp_path):
        redis = RedisServer(tmp_path)
        with fresh_pg_database() as db_url:
            env = service_env(db_url, tmp_path / "store", WKVQ_DISPATCHER="celery", WKVQ_BROKER_URL=redis.url)
            server, base = start_server(env, tmp_path)
            key = admin_key(env, tmp_path, "team-a")
            try:
                yield env, client(base, key), db_url
            finally:
                server.stop()
                redis.stop()

    def test_kill_9_mid_job_resumes_from_checkpoint_with_identical_artifact(self, pool, tmp_path):
        env, api, db_url = pool
        first = start_worker(env, tmp_path, "first")
        try:
            reference = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
            wait_status(api, reference, "succeeded")
            reference_sha = download_and_load(api, reference, tmp_path)

            job_id = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
            wait_for(lambda: job_state(api, job_id)["current_block"] >= 2, 120, "block 1 to finish")
            first.kill9()
        finally:
            first.stop()
        finished_before_kill = job_state(api, job_id)["current_block"]
        assert 2 <= finished_before_kill < 5, "the kill landed after block 1 and before the end"

        second = start_worker(env, tmp_path, "second")
        try:
            done = wait_status(api, job_id, "succeeded")
        finally:
            second.stop()
        assert done["attempts"] == 2
        stream = events(api, job_id)
        kinds = [kind for kind, _ in stream]
        assert "requeued" in kinds  # the reaper saw the expired lease
        starts = [d["block"] for k, d in stream if k == "block_start"]
        for block in range(finished_before_kill):
            assert starts.count(block) == 1, f"block {block} was finished before the kill and must not be redone"
        resumed = [d["block"] for k, d in stream if k == "block_resumed"]
        assert resumed == list(range(finished_before_kill))
        log = second.output()
        assert "block_resumed block 1/5" in log and "block_start block 1/5" not in log, log[-3000:]
        assert download_and_load(api, job_id, tmp_path) == reference_sha  # byte-identical artifact

        engine = create_engine(db_url)
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(BlockCheckpoint)
                               .where(BlockCheckpoint.job_id == job_id)) == 5
        engine.dispose()
