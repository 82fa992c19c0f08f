"""Jobs for a deployment target (config.target): what the target's engine cannot run is refused at submit naming the
field (SQLite and Postgres), and a llamacpp job ships a GGUF beside the packed artifact, downloadable with its sha256
checked, counted in the team's storage and removed with the job. Jobs run in-process by the worker's JobRunner."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import gguf
import pytest
from sqlalchemy import select
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from api.jobs.schemas import TARGET_CACHE_TYPES, QuantConfig
from api.models import Artifact, Job, JobEvent, Team
from api.teams.usage import usage_service
from tests.conftest import TINY_MODEL, fresh_pg_database
from tests.service.conftest import service_settings, team_key
from tests.service.test_api import assert_invalid, count, stored_files
from worker.runner import JobRunner, job_config
from wkvq_core.errors import ConfigError
from wkvq_core.export import NOTES
from wkvq_core.targets import TARGETS
from wkvq_core.targets.llamacpp import KV_TYPES
from wkvq_core.targets.vllm import KV_CACHE_DTYPES

from .processes import REPO, RedisServer, admin_key, service_env, start_server, start_worker

GGUF_MODEL = "llama-hd64"  # head_dim 64, linear inputs 128 and 256: every group size the GGUF takes
HD16_MODEL = "llama-hd16"  # head_dim 16: llama.cpp's 32-channel KV blocks do not fit a head (config.json only)
I172_MODEL = "llama-i172"  # head_dim 64, intermediate size 172 as stories260k's: per-row groups only (config.json)
LLAMACPP_JOB = {
    "model": {"source": "local", "name": GGUF_MODEL},
    "calibration": {"source": "builtin", "name": "tinystories"},
    "config": {"target": "llamacpp", "nsamples": 4, "seqlen": 64, "epochs": 1, "crr_k": 2, "eval_tokens": 2048},
}
LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=512, max_position_embeddings=512)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A random LLaMA the GGUF export accepts (as benchmarks/llamacpp_agreement.py builds it), stories260k, and the
    config.json of two models it does not."""
    root = tmp_path_factory.mktemp("models")
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=64, vocab_size=512, max_position_embeddings=512,
                                 initializer_range=0.1)).save_pretrained(root / GGUF_MODEL)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(root / GGUF_MODEL)
    shutil.copytree(TINY_MODEL, root / "stories260k")
    for name, dims in ((HD16_MODEL, {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}),
                       (I172_MODEL, {"hidden_size": 128, "intermediate_size": 172, "num_attention_heads": 2})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(LLAMA | dims | {"num_hidden_layers": 2}))
    return root


@pytest.fixture
def settings(db_url, tmp_path, models_dir):
    return service_settings(db_url, str(tmp_path / "store"), MODELS_DIR=models_dir)


@pytest.fixture
def team_a(team_headers) -> dict[str, str]:
    return team_headers("a")


def body(model: str = GGUF_MODEL, **config: Any) -> dict[str, Any]:
    return LLAMACPP_JOB | {"model": {"source": "local", "name": model}, "config": LLAMACPP_JOB["config"] | config}


def run_one(service) -> None:
    runner = JobRunner(service, "test-worker")
    lease = runner.claim_next(["default"])
    assert lease is not None
    runner.execute(lease)


BAD_TARGET_JOBS = {
    # id: (body, field, message fragment)
    "stories260k-head_dim-8": (body("stories260k"), "target", "head_dim divisible by 32; this model's is 8"),
    "stories260k-fp-weights": (body("stories260k", w_bits=16), "target", "this model's is 8"),
    "stories260k-fp-cache-per-row-172": (body("stories260k", kv_bits=16), "group_size",
                                         "group_size -1 (one group per row) needs the model's intermediate_size (172)"),
    "stories260k-group-32": (body("stories260k", group_size=32), "group_size", "does not divide"),
    "per-row-172": (body(I172_MODEL), "group_size", "intermediate_size (172) to be a multiple of 32"),
    "head_dim-16": (body(HD16_MODEL), "target", "this model's is 16"),
    "kv_group_size-16": (body(kv_group_size=16), "kv_group_size", "blocks of 32"),
    "w_bits-3": (body(w_bits=3), "w_bits", "w_bits 3"),
    "group_size-16": (body(group_size=16), "group_size", "multiple of 32"),
    "kv_bits-3": (body(kv_bits=3), "kv_bits", "kv_bits 3"),
    "cache-type-of-other-bits": (body(kv_cache_type="q8_0"), "kv_cache_type", "kv_bits is 4"),
    "cache-type-on-runtime": (body(target="runtime", kv_cache_type="q4_0"), "kv_cache_type", "runtime"),
    "unknown-cache-type": (body(kv_cache_type="q5_0"), "kv_cache_type", "'q4_0'"),
    "unknown-target": (body(target="sglang"), "target", "'vllm'"),
}


@pytest.mark.parametrize("case", BAD_TARGET_JOBS)
def test_what_the_target_cannot_run_is_refused_naming_the_field(client, service, team_a, case):
    job, field, message = BAD_TARGET_JOBS[case]
    assert_invalid(client.post("/v1/jobs", json=job, headers=team_a), ("config", field), message)
    assert count(service, Job) == 0
    assert stored_files(service) == []


def test_schema_cache_types_are_the_targets():
    # the schema lists them without importing torch
    assert set(TARGET_CACHE_TYPES["llamacpp"]) == set(KV_TYPES)
    assert set(TARGET_CACHE_TYPES["vllm"]) == set(KV_CACHE_DTYPES)
    assert set(TARGET_CACHE_TYPES) == {name for name, target in TARGETS.items() if target.cache_type is not None}


def test_old_job_rows_without_a_target_run_as_runtime():
    config = QuantConfig().model_dump()
    stored_before_targets = {k: v for k, v in config.items() if k not in ("target", "kv_cache_type")}
    assert job_config({"config": stored_before_targets}) == job_config({"config": config})
    assert job_config({"config": stored_before_targets}).target == "runtime"
    llamacpp = job_config({"config": config | {"target": "llamacpp", "kv_cache_type": "q4_1"}})
    assert (llamacpp.target, llamacpp.kv.cache_type) == ("llamacpp", "q4_1")
    assert not llamacpp.kv.sink_tokens and not llamacpp.kv.k_pre_rope  # the method's options llama.cpp cannot run


def test_api_processes_load_torch_only_once_a_job_is_submitted(tmp_path):
    """wkvq_core.targets imports torch (~360 MB): the API imports it on first use, so that processes serving reads
    stay small."""
    code = "import sys, api.main; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=service_env("sqlite://", tmp_path), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr


def download(client, headers, artifact: dict[str, Any]) -> bytes:
    response = client.get(artifact["download_url"], headers=headers)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"] == response.headers["x-content-sha256"]
    assert len(response.content) == artifact["size"]
    return response.content


def test_llamacpp_job_ships_a_gguf_that_is_verified_counted_and_deleted(client, service, team_a, tmp_path):
    created = client.post("/v1/jobs", json=LLAMACPP_JOB, headers=team_a)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["config"]["group_size"] == 128  # the model's default, a multiple of 32
    run_one(service)
    job = client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert (job["status"], job["stage"], job["error"]) == ("succeeded", "done", None), job
    with service.session() as session:
        stages = [e.message for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                                             JobEvent.kind == "stage"))]
    assert stages[-2:] == ["exporting", "publishing"]

    artifacts = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=team_a).json()}
    assert set(artifacts) == {"model.tar", "model.gguf", NOTES}
    assert artifacts["model.gguf"]["media_type"] == "application/octet-stream"
    assert artifacts[NOTES]["media_type"] == "application/json"
    assert artifacts["model.gguf"]["download_url"].endswith(f"/v1/jobs/{job_id}/artifacts/model.gguf")
    files = {name: download(client, team_a, a) for name, a in artifacts.items()}

    (tmp_path / "model.gguf").write_bytes(files["model.gguf"])
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["wkvquant.recommended_cache_type_k"].contents() == "q4_0"
    notes = json.loads(files[NOTES])
    assert notes["recommended_cache_type"] == {"k": "q4_0", "v": "q4_0"}
    assert notes["source"]["quantization_config"]["wkvquant_config"]["target"] == "llamacpp"
    (tmp_path / "model.tar").write_bytes(files["model.tar"])
    with tarfile.open(tmp_path / "model.tar") as tar:  # the GGUF was written from this artifact's weights
        [weights] = [m for m in tar.getmembers() if m.name.endswith("/model.safetensors")]
        digest = hashlib.sha256(tar.extractfile(weights).read()).hexdigest()
    assert notes["source"]["model.safetensors_sha256"] == digest

    metrics = client.get(f"/v1/jobs/{job_id}/metrics", headers=team_a).json()
    assert metrics["eval"]["engine"] == {"target": "llamacpp", "cache_type": "q4_0"}
    assert set(metrics["eval"]["ppl"]) == {"fp", "w", "wkv"} and set(metrics["eval"]["baselines"]["rtn"]) == {"w", "wkv"}
    export = metrics["export"]
    assert (export["format"], export["file"], export["notes"]) == ("gguf", "model.gguf", NOTES)
    assert (export["size"], export["sha256"]) == (artifacts["model.gguf"]["size"], artifacts["model.gguf"]["sha256"])
    assert export["recommended_cache_type"] == notes["recommended_cache_type"]
    assert metrics["artifact"]["sha256"] == artifacts["model.tar"]["sha256"]

    reserved = job["estimate"]["breakdown"]["storage"]
    assert reserved["export"] >= artifacts["model.gguf"]["size"] + artifacts[NOTES]["size"]
    with service.session() as session:
        team = session.scalar(select(Team).where(Team.name == "a"))
        stored = usage_service.stored_bytes(session, team.id)
        checkpoints = stored - sum(a["size"] for a in artifacts.values())
        assert checkpoints > 0 and stored_files(service, f"jobs/{job_id}")  # checkpoints kept (KEEP_CHECKPOINTS)

    assert client.delete(f"/v1/jobs/{job_id}", headers=team_a).status_code == 204
    assert count(service, Artifact) == 0
    assert stored_files(service, f"jobs/{job_id}") == []
    assert client.get(artifacts["model.gguf"]["download_url"], headers=team_a).status_code == 410


def test_a_failing_export_fails_the_job_readably_and_publishes_nothing(client, service, team_a, monkeypatch):
    import worker.runner

    def broken(fmt):
        def export(artifact_dir, out_dir):
            raise ConfigError("model.layers.0.mlp.down_proj: per-row groups of 172 input channels are not a multiple "
                              "of Q4_1's 32-weight blocks")
        return SimpleNamespace(export=export)

    monkeypatch.setattr(worker.runner, "exporter", broken)
    job_id = client.post("/v1/jobs", json=LLAMACPP_JOB, headers=team_a).json()["id"]
    run_one(service)
    job = client.get(f"/v1/jobs/{job_id}", headers=team_a).json()
    assert job["status"] == "failed"
    assert job["error"] == ("the gguf export of the quantized model failed: model.layers.0.mlp.down_proj: per-row "
                            "groups of 172 input channels are not a multiple of Q4_1's 32-weight blocks")
    assert count(service, Artifact) == 0
    assert not [p for p in stored_files(service) if "model." in p.name or p.name.endswith(NOTES)]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_wkvq_submit_with_a_target_and_cache_type(live_server, service, tmp_path):
    env = service_env("sqlite://", tmp_path) | {"WKVQ_URL": live_server, "WKVQ_API_KEY": team_key(service, "a")}
    submit = [sys.executable, "-m", "wkvq_client", "submit", "--calib", "builtin:tinystories", "--nsamples", "4",
              "--epochs", "1", "--target", "llamacpp"]
    result = subprocess.run([*submit, GGUF_MODEL, "--kv-cache-type", "q4_1", "--json"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    config = json.loads(result.stdout)["config"]
    assert (config["target"], config["kv_cache_type"]) == ("llamacpp", "q4_1")
    refused = subprocess.run([*submit, "stories260k"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "config.target" in refused.stderr and "head_dim" in refused.stderr, refused.stderr
    status = subprocess.run([sys.executable, "-m", "wkvq_client", "status", json.loads(result.stdout)["id"]],
                            env=env | {"COLUMNS": "200"}, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "llamacpp (q4_1 cache), W4 KV4" in status.stdout, status.stdout


@pytest.fixture(params=["embedded", "celery"])
def served_pool(request, models_dir, tmp_path) -> Iterator[dict[str, str]]:
    """`wkvq serve` with the models directory: embedded (SQLite, its in-process worker), or the GPU-pool layout
    (Postgres, a private Redis, a `wkvq worker` Celery process). Yields the environment of the client commands."""
    with ExitStack() as stack:
        if request.param == "embedded":
            env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store", WKVQ_MODELS_DIR=str(models_dir))
        else:
            redis = RedisServer(tmp_path)
            stack.callback(redis.stop)
            env = service_env(stack.enter_context(fresh_pg_database()), tmp_path / "store", WKVQ_DISPATCHER="celery",
                              WKVQ_BROKER_URL=redis.url, WKVQ_MODELS_DIR=str(models_dir))
        server, base = start_server(env, tmp_path)
        stack.callback(server.stop)
        if request.param == "celery":
            stack.callback(start_worker(env, tmp_path, "w").stop)
        (tmp_path / "xdg").mkdir()
        yield env | {"WKVQ_URL": base, "WKVQ_API_KEY": admin_key(env, tmp_path, "team-a"),
                     "XDG_CONFIG_HOME": str(tmp_path / "xdg"), "COLUMNS": "200"}


@pytest.mark.slow
def test_llamacpp_job_through_real_processes_and_the_client_commands(served_pool, tmp_path):
    """Real processes and HTTP: `wkvq submit --target llamacpp --wait`, `wkvq download --name model.gguf` (sha256
    checked by the client, and here again), `wkvq delete`."""
    def client(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wkvq_client", *args], env=served_pool, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    submitted = client("submit", GGUF_MODEL, "--calib", "builtin:tinystories", "--target", "llamacpp",
                       "--kv-cache-type", "q4_1", "--nsamples", "4", "--seqlen", "64", "--epochs", "1", "--crr-k", "2",
                       "--wait", "--json")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "succeeded" and job["config"]["kv_cache_type"] == "q4_1"
    downloaded = client("download", job["id"], str(tmp_path / "out"), "--name", "model.gguf")
    assert downloaded.returncode == 0 and "verified" in downloaded.stdout, downloaded.stdout + downloaded.stderr
    gguf_path = tmp_path / "out" / "model.gguf"
    assert hashlib.sha256(gguf_path.read_bytes()).hexdigest() in downloaded.stdout
    reader = gguf.GGUFReader(gguf_path)
    assert reader.fields["wkvquant.recommended_cache_type_k"].contents() == "q4_1"  # the cache it was calibrated for
    stored = tmp_path / "store" / "jobs" / job["id"]
    assert [p.read_bytes() for p in stored.rglob("*model.gguf")] == [gguf_path.read_bytes()]
    assert client("delete", job["id"]).returncode == 0
    assert not list(stored.rglob("*model.*"))
