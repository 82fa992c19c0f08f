"""`hf` data specs name hub datasets only: never the service's data directory (every team's uploads), whatever the
worker's working directory holds. Real `wkvq serve` / `wkvq worker` processes, over HTTP, on both databases."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from api.datasets.builtin import BUILTIN_TEXTS

from .conftest import TINY_JOB
from .processes import admin_key, free_port, service_env, start_server, start_worker
from .test_e2e import client, wait_status

pytestmark = pytest.mark.slow

DATA_DIR = "wkvq-data"  # the default WKVQ_DATA_DIR, relative to the processes' working directory
LOCAL_NAMES = (DATA_DIR, f"{DATA_DIR}/store")


def hub_jobs() -> list[tuple[str, dict]]:
    """(role, job) for each local name as calibration and as evaluation."""
    jobs = []
    for name in LOCAL_NAMES:
        spec = {"source": "hf", "name": name, "split": "train"}
        jobs.append(("calibration", copy.deepcopy(TINY_JOB) | {"calibration": spec}))
        jobs.append(("evaluation", copy.deepcopy(TINY_JOB) | {"evaluation": spec}))
    return jobs


def upload_team_a(env: dict[str, str], tmp_path: Path, base: str) -> None:
    """Team A's text in the store under the data directory: what a local read of it would calibrate on."""
    team_a = client(base, admin_key(env, tmp_path, "team-a"))
    text = BUILTIN_TEXTS["tinystories"]["calibration"].read_bytes()
    team_a.post("/v1/datasets", files={"file": ("secret.txt", text, "text/plain")}).raise_for_status()


def test_hub_names_of_the_data_directory_are_refused_at_submit_offline(db_url, tmp_path):
    env = service_env(db_url, tmp_path / DATA_DIR / "store")  # HF_HUB_OFFLINE=1
    server, base = start_server(env, tmp_path)
    try:
        upload_team_a(env, tmp_path, base)
        team_b = client(base, admin_key(env, tmp_path, "team-b"))
        for role, job in hub_jobs():
            r = team_b.post("/v1/jobs", json=job)
            assert r.status_code == 422, r.text
            (detail,) = r.json()["detail"]
            assert detail["loc"] == ["body", role, "name"] and "offline" in detail["msg"], detail
        assert team_b.get("/v1/jobs").json()["count"] == 0
    finally:
        server.stop()


def test_hub_names_of_the_data_directory_fail_the_job_on_a_worker_without_the_hub(db_url, tmp_path):
    """The API believes the hub reachable and accepts the jobs; the worker, offline, fails each one readably and
    never reads the data directory that the name also names in its working directory."""
    env = service_env(db_url, tmp_path / DATA_DIR / "store")
    online_api = env | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    server, base = start_server(online_api, tmp_path, "--workers", "0")
    worker = start_worker(env, tmp_path, "offline")
    try:
        upload_team_a(env, tmp_path, base)
        team_b = client(base, admin_key(env, tmp_path, "team-b"))
        for role, job in hub_jobs():
            job_id = team_b.post("/v1/jobs", json=job).raise_for_status().json()["id"]
            failed = wait_status(team_b, job_id, "failed")
            assert "Hugging Face hub" in failed["error"] and "offline" in failed["error"], (role, failed["error"])
            assert team_b.get(f"/v1/jobs/{job_id}/metrics").status_code == 404
            assert team_b.get(f"/v1/jobs/{job_id}/artifacts").json() == []
    finally:
        worker.stop()
        server.stop()
