"""vllm jobs (config.target "vllm"): what vLLM cannot serve is refused at submit naming the field (SQLite and
Postgres), and a job ships its compressed-tensors export as one tar of the directory to serve (model-vllm.tar)
beside the packed artifact and the export's notes, with the predicted vLLM perplexity and the serve command in its
metrics. Jobs run in-process by the worker's JobRunner; the slow test runs real processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from api.models import Artifact, Job, JobEvent, Team
from api.teams.usage import usage_service
from tests.service.conftest import team_key
from tests.service.test_api import assert_invalid, count, stored_files
from worker.artifact_tar import extract_artifact
from wkvq_core.errors import ConfigError
from wkvq_core.export import NOTES
from wkvq_core.export.vllm import serve_command
from wkvq_core.targets.vllm import INT4

from .processes import REPO, service_env
from .test_targets import (GGUF_MODEL, HD16_MODEL, download, models_dir, run_one, served_pool,  # noqa: F401 (fixtures)
                           settings, team_a)

ARCHIVE = "model-vllm.tar"
VLLM_JOB = {
    "model": {"source": "local", "name": GGUF_MODEL},  # head_dim 64: vLLM's Triton backend takes 32 and up
    "calibration": {"source": "builtin", "name": "tinystories"},
    "config": {"target": "vllm", "nsamples": 4, "seqlen": 64, "epochs": 1, "crr_k": 2, "eval_tokens": 1024},
}
SERVED_FILES = {"config.json", "model.safetensors", "README.md", NOTES}  # and the tokenizer's


def body(model: str = GGUF_MODEL, **config: Any) -> dict[str, Any]:
    return VLLM_JOB | {"model": {"source": "local", "name": model}, "config": VLLM_JOB["config"] | config}


BAD_VLLM_JOBS = {
    # id: (body, field, message fragment)
    "stories260k-head_dim-8": (body("stories260k"), "target", "head_dim >= 32; this model's is 8"),
    "head_dim-16": (body(HD16_MODEL), "target", "this model's is 16"),
    "llamacpp-cache-type": (body(kv_cache_type="q4_0"), "kv_cache_type", "int4_per_token_head; got 'q4_0'"),
    "vllm-cache-type-on-llamacpp": (body(target="llamacpp", kv_cache_type="int4_per_token_head"), "kv_cache_type",
                                    "llama.cpp KV cache type must be one of"),
    "vllm-cache-type-on-runtime": (body(target="runtime", kv_cache_type="auto"), "kv_cache_type", "runtime"),
    "cache-type-of-other-bits": (body(kv_cache_type="auto"), "kv_cache_type", "kv_bits is 4"),
    "unknown-cache-type": (body(kv_cache_type="int8"), "kv_cache_type", "'int4_per_token_head'"),
    "kv_bits-8": (body(kv_bits=8), "kv_bits", "got kv_bits 8"),
    "kv_group_size-32": (body(kv_group_size=32), "kv_group_size", "kv_group_size must be unset"),
    "w_bits-3": (body(w_bits=3), "w_bits", "got w_bits 3"),
    "group_size-16": (body(group_size=16), "group_size", "group_size -1, 32, 64, 128; got 16"),
}


@pytest.mark.parametrize("case", BAD_VLLM_JOBS)
def test_what_vllm_cannot_serve_is_refused_naming_the_field(client, service, team_a, case):
    job, field, message = BAD_VLLM_JOBS[case]
    assert_invalid(client.post("/v1/jobs", json=job, headers=team_a), ("config", field), message)
    assert count(service, Job) == 0
    assert stored_files(service) == []


def test_vllm_job_ships_the_directory_to_serve_verified_counted_and_deleted(client, service, team_a, tmp_path):
    created = client.post("/v1/jobs", json=body(kv_cache_type="int4_per_token_head"), headers=team_a)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    run_one(service)
    job = client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert (job["status"], job["stage"], job["error"]) == ("succeeded", "done", None), job
    with service.session() as session:
        stages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                                             JobEvent.kind == "stage"))]
    assert stages[-2:] == ["exporting", "publishing"]

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=team_a).json()}
    assert set(artifacts) == {"model.tar", ARCHIVE, NOTES}
    assert artifacts[ARCHIVE]["media_type"] == "application/x-tar"
    assert artifacts[ARCHIVE]["download_url"].endswith(f"/v1/jobs/{job_id}/artifacts/{ARCHIVE}")
    files = {name: download(client, team_a, a) for name, a in artifacts.items()}

    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=team_a).json()
    export = metrics["export"]
    (tmp_path / ARCHIVE).write_bytes(files[ARCHIVE])
    served = extract_artifact(tmp_path / ARCHIVE, tmp_path / "out")
    assert served.name == export["directory"] == "llama-hd64-w4kv4-vllm"
    notes = json.loads(files[NOTES])
    assert SERVED_FILES <= {p.name for p in served.iterdir()} == set(notes["files"])
    assert (served / NOTES).read_bytes() == files[NOTES]
    config = json.loads((served / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert notes["kv_cache_dtype"] == "int4_per_token_head"
    assert notes["serve"].startswith("vllm serve OUT ") and "--kv-cache-dtype int4_per_token_head" in notes["serve"]
    assert notes["source"]["quantization_config"]["wkvquant_config"]["target"] == "vllm"
    (tmp_path / "model.tar").write_bytes(files["model.tar"])
    with tarfile.open(tmp_path / "model.tar") as tar:  # the export was written from this artifact's weights
        [weights] = [m for m in tar.getmembers() if m.name.endswith("/model.safetensors")]
        digest = hashlib.sha256(tar.extractfile(weights).read()).hexdigest()
    assert notes["source"]["model.safetensors_sha256"] == digest

    assert metrics["eval"]["engine"] == {"target": "vllm", "cache_type": "int4_per_token_head"}
    assert set(metrics["eval"]["ppl"]) == {"fp", "w", "wkv"}
    assert set(metrics["eval"]["baselines"]["rtn"]) == {"w", "wkv"}
    assert (export["format"], export["file"], export["notes"]) == ("vllm", ARCHIVE, NOTES)
    assert (export["serve"], export["kv_cache_dtype"]) == (notes["serve"], notes["kv_cache_dtype"])
    assert (export["size"], export["sha256"]) == (artifacts[ARCHIVE]["size"], artifacts[ARCHIVE]["sha256"])

    reserved = job["estimate"]["breakdown"]["storage"]
    assert reserved["export"] >= artifacts[ARCHIVE]["size"] + artifacts[NOTES]["size"]
    with service.session() as session:
        team = session.scalar(select(Team).where(Team.name == "a"))
        assert usage_service.stored_bytes(session, team.id) > sum(a["size"] for a in artifacts.values())

    assert client.delete(f"/v1/jobs/{job_id}", headers=team_a).status_code == 204
    assert count(service, Artifact) == 0
    assert stored_files(service, f"jobs/{job_id}") == []
    assert client.get(artifacts[ARCHIVE]["download_url"], headers=team_a).status_code == 410


OTHER_WIDTHS = {  # id: (config, vLLM's KV cache dtype)
    "w8-auto-cache": ({"w_bits": 8, "kv_bits": 16}, "auto"),
    "kv-only": ({"w_bits": 16, "kv_bits": 4}, "int4_per_token_head"),  # unquantized weights, the smoothing folded
}


@pytest.mark.parametrize("case", OTHER_WIDTHS)
def test_vllm_jobs_of_other_widths_ship_their_serve_command(client, service, team_a, case):
    config, cache = OTHER_WIDTHS[case]
    job_id = client.post("/v1/jobs", json=body(**config), headers=team_a).json()["id"]
    run_one(service)
    job = client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert job["status"] == "succeeded", job
    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=team_a).json()
    export = metrics["export"]
    assert metrics["eval"]["engine"] == {"target": "vllm", "cache_type": cache}
    assert export["directory"] == f"llama-hd64-w{config['w_bits']}kv{config['kv_bits']}-vllm"
    assert (export["kv_cache_dtype"], export["serve"]) == (cache, serve_command("OUT", cache == INT4))
    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=team_a).json()}
    assert job["estimate"]["breakdown"]["storage"]["export"] >= artifacts[ARCHIVE]["size"] + artifacts[NOTES]["size"]


def test_a_failing_vllm_export_fails_the_job_readably_and_leaves_nothing(client, service, team_a, monkeypatch):
    import worker.runner

    def half_written(fmt):
        def export(artifact_dir, out_dir):
            Path(out_dir).mkdir(parents=True)
            (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
            raise ConfigError("MistralForCausalLM has no attention biases for the folded V smoothing")
        return SimpleNamespace(export=export)

    monkeypatch.setattr(worker.runner, "exporter", half_written)
    job_id = client.post("/v1/jobs", json=VLLM_JOB, headers=team_a).json()["id"]
    run_one(service)
    job = client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert job["status"] == "failed"
    assert job["error"] == ("the vllm export of the quantized model failed: MistralForCausalLM has no attention "
                            "biases for the folded V smoothing")
    assert count(service, Artifact) == 0
    assert not [p for p in stored_files(service) if "model" in p.name or p.name.endswith(NOTES)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wkvq_submit_with_the_vllm_target(live_server, service, tmp_path):
    env = service_env("sqlite://", tmp_path) | {"WKVQ_URL": live_server, "WKVQ_API_KEY": team_key(service, "a")}
    submit = [sys.executable, "-m", "wkvq_client", "submit", "--calib", "builtin:tinystories", "--nsamples", "4",
              "--epochs", "1", "--target", "vllm"]
    result = subprocess.run([*submit, GGUF_MODEL, "--kv-cache-type", "int4_per_token_head", "--json"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["target"], config["kv_cache_type"]) == ("vllm", "int4_per_token_head")
    refused = subprocess.run([*submit, GGUF_MODEL, "--kv-cache-type", "q4_0"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "config.kv_cache_type" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_vllm_job_through_real_processes_and_the_client_commands(served_pool, tmp_path):
    """Real processes and HTTP: `wkvq submit --target vllm --wait`, `wkvq download --name model-vllm.tar --extract`
    (sha256 checked by the client), the serve command's directory, `wkvq delete`."""
    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wkvq_client", *args], env=served_pool, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    submitted = client("submit", GGUF_MODEL, "--calib", "builtin:tinystories", "--target", "vllm", "--nsamples", "4",
                       "--seqlen", "64", "--epochs", "1", "--crr-k", "2", "--wait", "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded" and job["config"]["target"] == "vllm"
    downloaded = client("download", job["id"], str(tmp_path / "out"), "--name", ARCHIVE, "--extract")
    assert downloaded.returncode == 0 and "verified" in downloaded.stdout, downloaded.stdout + downloaded.stderr
    served = tmp_path / "out" / "llama-hd64-w4kv4-vllm"
    assert f"unpacked to {served}" in downloaded.stdout.replace("\n", "")
    assert SERVED_FILES <= {p.name for p in served.iterdir()}
    notes = json.loads((served / NOTES).read_text())
    assert "--kv-cache-dtype int4_per_token_head" in notes["serve"]
    stored = tmp_path / "store" / "jobs" / job["id"]
    assert [p.read_bytes() for p in stored.rglob(f"*{ARCHIVE}")] == [(tmp_path / "out" / ARCHIVE).read_bytes()]
    assert client("delete", job["id"]).returncode == 0
    assert not list(stored.rglob("*model*"))
