"""The client (wkvq_client) and the user commands against a live `wkvq serve` over real HTTP.

One server for the module (SQLite, local store, in-process worker); its team key comes from the admin CLI. The
user commands run as subprocesses: once through the full `wkvq` app (the merge in worker/cli.py), otherwise as
`python -m wkvq_client` (the same Typer app without the library's torch start-up, ~8 s a process on a busy
2-core machine). To stay near a minute the `wkvq` processes overlap: the server starts beside `admin create-team`
/ `create-key`, and the tiny job's `wkvq submit --wait` runs beside the tests placed before the ones that read it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from api.core.migrate import upgrade
from api.datasets.schemas import DatasetRead
from api.jobs.schemas import ArtifactRead, JobEventRead, JobList, JobRead
from wkvq_client import ClientError, StreamEnd, WKVQClient, load_config
from wkvq_client.config import ConfigError

from .processes import REPO, admin_key, service_env, start_server, wkvq

CALIB_TXT = REPO / "wkvq_core" / "assets" / "tinystories" / "calib.txt"
TINY_ARGS = ("stories260k", "--calib", "builtin:tinystories", "--group-size", "-1", "--nsamples", "4", "--seqlen", "64",
             "--epochs", "1", "--crr-k", "2")  # conftest.TINY_JOB as options


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    env = service_env(f"sqlite:///{tmp}/wkvq.db", tmp / "store")
    (tmp / "xdg").mkdir()  # an empty config home: a developer's own ~/.config/wkvq must not leak in
    upgrade(env["WKVQ_DATABASE_URL"])  # first, so that the server and the admin commands need not migrate at once
    with ThreadPoolExecutor(1) as pool:
        issued = pool.submit(admin_key, env, tmp, "team-a")  # `wkvq admin create-team` + `create-key`
        server, base = start_server(env, tmp, "--no-migrate")
        try:
            key = issued.result()
        except BaseException:
            server.stop()
            raise
    client_env = env | {"WKVQ_URL": base, "WKVQ_API_KEY": key, "XDG_CONFIG_HOME": str(tmp / "xdg"),
                       "COLUMNS": "200"}  # tables unwrapped, whatever the terminal running the tests
    with open(tmp / "tiny.out", "w") as stdout, open(tmp / "tiny.err", "w") as stderr:
        tiny = subprocess.Popen([sys.executable, "-m", "worker.cli", "submit", *TINY_ARGS, "--wait", "--json"],
                                env=client_env, cwd=tmp, stdout=stdout, stderr=stderr)
    try:
        yield SimpleNamespace(tmp=tmp, env=env, client_env=client_env, base=base, key=key, server=server, tiny=tiny)
    finally:
        if tiny.poll() is None:
            tiny.kill()
            tiny.wait()
        server.stop()


@pytest.fixture(scope="module")
def api(svc):
    with WKVQClient(svc.base, svc.key) as client:
        yield client


@pytest.fixture(scope="module")
def tiny_job(svc) -> SimpleNamespace:
    """The finished job of `wkvq submit ... --wait --json` (through the full `wkvq` app, started by `svc`)."""
    returncode = svc.tiny.wait(timeout=300)
    result = subprocess.CompletedProcess(svc.tiny.args, returncode, (svc.tmp / "tiny.out").read_text(),
                                         (svc.tmp / "tiny.err").read_text())
    if not result.stdout.strip():
        pytest.fail(f"wkvq submit --wait printed no job (exit {returncode}):\n{result.stderr}")
    job = JobRead.model_validate_json(result.stdout)
    return SimpleNamespace(result=result, job=job, id=job.id)


def cli(svc, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wkvq_client", *args], env=svc.client_env if env is None else env,
                          cwd=svc.tmp, capture_output=True, text=True, timeout=timeout)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# ---------------------------------------------------------------------- while the tiny job runs


def _issue_key(svc, team: str) -> str:
    """A key made in-process (the module's key came from the CLI's `create-team` / `create-key`)."""
    from api.core.config import Settings
    from api.core.context import ServiceContext
    from api.teams.service import team_service

    ctx = ServiceContext.from_settings(Settings(_env_file=None, DATABASE_URL=svc.env["WKVQ_DATABASE_URL"],
                                                STORAGE_URL=svc.env["WKVQ_STORAGE_URL"]))
    try:
        with ctx.session() as session:
            team_service.create_team(session, name=team)
            return team_service.create_key(session, team_name=team, name="to revoke").key
    finally:
        ctx.close()


def test_admin_cli_keys(svc, api):
    # the module's key was printed by `wkvq admin create-key` (after `create-team`) and is accepted
    assert svc.key.startswith("wkvq_") and isinstance(api.list(), JobList)
    key = _issue_key(svc, "team-b")  # another team's key to revoke
    prefix = key.split("_")[1]
    env_b = svc.client_env | {"WKVQ_API_KEY": key}
    assert JobList.model_validate_json(ok(cli(svc, "jobs", "--json", env=env_b)).stdout).count == 0  # own jobs only
    assert f"key {prefix} revoked" in ok(wkvq(svc.env, "admin", "revoke-key", prefix, cwd=svc.tmp)).stdout
    revoked = cli(svc, "jobs", env=env_b)
    assert revoked.returncode == 2 and "API key revoked (HTTP 401)" in revoked.stderr
    listing = ok(wkvq(svc.env | {"COLUMNS": "200"}, "admin", "list-keys", cwd=svc.tmp)).stdout
    rows = {line.split("│")[2].strip(): line.split("│") for line in listing.splitlines() if line.count("│") >= 5}
    assert rows[prefix][1].strip() == "team-b" and rows[prefix][5].strip(), listing  # revoked at ...
    assert rows[svc.key.split("_")[1]][1].strip() == "team-a" and not rows[svc.key.split("_")[1]][5].strip()


def test_key_from_config_file_and_missing_key(svc, tmp_path):
    bare = {k: v for k, v in svc.client_env.items() if k not in ("WKVQ_URL", "WKVQ_API_KEY")}
    bare["XDG_CONFIG_HOME"] = str(tmp_path)
    result = cli(svc, "jobs", env=bare)
    assert result.returncode == 2 and "error: no API key" in result.stderr and "WKVQ_API_KEY" in result.stderr

    (tmp_path / "wkvq").mkdir()  # the default place: $XDG_CONFIG_HOME/wkvq/config.toml
    (tmp_path / "wkvq" / "config.toml").write_text(f'url = "{svc.base}"\napi_key = "{svc.key}"\n')
    assert isinstance(JobList.model_validate_json(ok(cli(svc, "jobs", "--json", env=bare)).stdout), JobList)
    explicit = tmp_path / "other.toml"
    explicit.write_text(f'url = "{svc.base}"\napi_key = "{svc.key}"\n')
    ok(cli(svc, "jobs", env=bare | {"WKVQ_CONFIG": str(explicit)}))
    wrong = cli(svc, "jobs", env=bare | {"WKVQ_API_KEY": "wkvq_000000000000_nope"})  # the environment wins
    assert wrong.returncode == 2 and "invalid API key (HTTP 401)" in wrong.stderr
    missing = cli(svc, "jobs", env=bare | {"WKVQ_CONFIG": str(tmp_path / "missing.toml")})
    assert missing.returncode == 2 and "missing.toml: no such file" in missing.stderr

    assert load_config({"WKVQ_CONFIG": str(explicit), "WKVQ_URL": "http://h:1"}).url == "http://h:1"
    (tmp_path / "bad.toml").write_text('apikey = "x"\n')
    with pytest.raises(ConfigError, match="unknown key"):
        load_config({"WKVQ_CONFIG": str(tmp_path / "bad.toml")})


def test_bad_specs_print_the_field_and_exit_2(svc):
    cases = [
        (("stories260k", "--calib", "builtin:tinystories", "--group-size", "7"), "config.group_size"),
        (("stories260k", "--calib", "builtin:tinystories", "--w-bits", "9"), "config.w_bits"),
        (("stories260k", "--calib", "builtin:nope"), "calibration.builtin.name"),
        (("nope", "--calib", "builtin:tinystories"), "model.name: unknown model 'nope'"),
        (("stories260k", "--calib", "tinystories"), "--calib 'tinystories': expected builtin:NAME"),
        (("stories260k", "--calib", "builtin:tinystories", "--eval", "hf:wikitext"), "--eval 'hf:wikitext'"),
        (("stories260k", "--calib", "upload:/no/such/file.txt"), "is not a file"),
        (("meta-llama/Llama-2-7b-hf", "--calib", "builtin:tinystories"), "add --hf"),
    ]
    for args, field in cases:
        result = cli(svc, "submit", *args)
        assert result.returncode == 2 and "error:" in result.stderr and field in result.stderr, (args, result.stderr)
    missing = cli(svc, "status", "0" * 32)
    assert missing.returncode == 2 and "not found (HTTP 404)" in missing.stderr


def test_upload_command_and_dataset_spec(svc, api):
    dataset = DatasetRead.model_validate_json(ok(cli(svc, "upload", str(CALIB_TXT), "--json")).stdout)
    assert dataset.filename == "calib.txt" and dataset.id in [d.id for d in api.datasets()]
    assert dataset.id in ok(cli(svc, "datasets")).stdout
    result = cli(svc, "submit", "stories260k", "--calib", f"dataset:{dataset.id}", "--seqlen", "99999")
    assert result.returncode == 2 and "error:" in result.stderr and "config.seqlen" in result.stderr


def test_upload_calibration_cancel_and_retry(svc, api):
    # big enough (~3 s a block) that a cancel of the running job always lands before its last block
    result = ok(cli(svc, "submit", "stories260k", "--calib", f"upload:{CALIB_TXT}", "--group-size", "-1",
                    "--nsamples", "32", "--seqlen", "128", "--epochs", "6", "--crr-k", "2", "--json"))
    job = JobRead.model_validate_json(result.stdout)
    assert "uploaded" in result.stderr and job.calibration["source"] == "upload"

    cancelled = ok(cli(svc, "cancel", job.id)).stdout  # queued behind the tiny job: at once; running: next block
    assert "cancelled" in cancelled or "cancel requested" in cancelled, cancelled
    assert api.wait(job.id, timeout=120).status == "cancelled"
    assert f"job {job.id} queued" in ok(cli(svc, "retry", job.id)).stdout
    watched = ok(cli(svc, "watch", job.id))  # live: follows the stream until the retried job ends
    assert "5/5" in watched.stdout and f"job {job.id} succeeded" in watched.stdout, watched.stdout
    assert api.metrics(job.id)["artifact"]["sha256"] == api.artifacts(job.id)[0].sha256
    again = cli(svc, "retry", job.id)
    assert again.returncode == 2 and "only failed or cancelled jobs can be retried (HTTP 409)" in again.stderr


def test_delete_commands(svc, api):
    dataset = DatasetRead.model_validate_json(ok(cli(svc, "upload", str(CALIB_TXT), "--json")).stdout)
    job = api.submit({"model": {"source": "local", "name": "stories260k"}, "config": {"group_size": -1, "seqlen": 64},
                      "calibration": {"source": "upload", "dataset_id": dataset.id}})
    refused = cli(svc, "delete-dataset", dataset.id)
    assert refused.returncode == 2 and "queued or running job" in refused.stderr
    deleted = ok(cli(svc, "delete", job.id)).stdout
    assert f"job {job.id} deleted" in deleted or "deleted once it has stopped" in deleted
    with pytest.raises(ClientError, match="was deleted"):
        api.get(job.id)
    deadline = time.monotonic() + 60  # a running job first stops (at its next cancel check)
    while (result := cli(svc, "delete-dataset", dataset.id)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert f"dataset {dataset.id} deleted" in ok(result).stdout
    assert dataset.id not in [d.id for d in api.datasets()]


def test_python_api_errors(api):
    with pytest.raises(ClientError) as err:
        api.get("0" * 32)
    assert err.value.status == 404 and err.value.detail == f"job {'0' * 32} not found"
    with pytest.raises(ClientError) as err:
        api.submit({"model": {"source": "local", "name": "stories260k"},
                    "calibration": {"source": "builtin", "name": "tinystories"}, "config": {"kv_bits": 1}})
    assert err.value.status == 422 and err.value.errors[0]["loc"] == ["body", "config", "kv_bits"]
    assert str(err.value).startswith("config.kv_bits: kv_bits must be between 2 and 8")
    assert str(err.value).endswith("(HTTP 422)")
    with pytest.raises(ClientError) as err, WKVQClient(api.base_url, "wkvq_000000000000_nope") as stranger:
        stranger.list()
    assert err.value.status == 401
    with pytest.raises(ClientError, match="cannot reach"), WKVQClient("http://127.0.0.1:9", "k") as nowhere:
        nowhere.get("x")


def test_download_restarts_when_the_server_ignores_range(tmp_path):
    data = bytes(range(256)) * 40
    sha = hashlib.sha256(data).hexdigest()
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return httpx.Response(200, json=[{"name": "model.tar", "size": len(data), "sha256": sha,
                                              "media_type": "application/x-tar", "download_url": "unused"}])
        ranges.append(request.headers.get("range"))
        return httpx.Response(200, content=data, headers={"x-content-sha256": sha})  # Range ignored: 200

    (tmp_path / "model.tar.part").write_bytes(data[:3000])
    with WKVQClient("http://wkvq.test", "k", transport=httpx.MockTransport(handler)) as c:
        result = c.download("j1", tmp_path)
    assert ranges == ["bytes=3000-"] and (result.resumed_from, result.received) == (0, len(data))
    assert (tmp_path / "model.tar").read_bytes() == data

    def corrupt(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/artifacts"):
            return handler(request)
        return httpx.Response(200, content=data[:-1] + b"\0", headers={"x-content-sha256": sha})

    with WKVQClient("http://wkvq.test", "k", transport=httpx.MockTransport(corrupt)) as c, \
            pytest.raises(ClientError, match="sha256 mismatch"):
        c.download("j1", tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []  # neither the file nor a .part


def test_spec_parsing():
    from wkvq_client.cli import data_spec, model_spec

    no_upload = lambda path: pytest.fail("no upload expected")  # noqa: E731
    assert data_spec("hf:wikitext:wikitext-2-raw-v1:train", "--calib", no_upload) == {
        "source": "hf", "name": "wikitext", "config": "wikitext-2-raw-v1", "split": "train"}
    assert data_spec("hf:c4:validation", "--calib", no_upload) == {"source": "hf", "name": "c4", "split": "validation"}
    assert data_spec("hf:wikitext:wikitext-2-raw-v1:test:page", "--eval", no_upload)["field"] == "page"
    assert data_spec("dataset:" + "a" * 32, "--calib", no_upload) == {"source": "upload", "dataset_id": "a" * 32}
    assert model_spec("meta-llama/Llama-2-7b-hf@main", hf=True) == {
        "source": "hf", "id": "meta-llama/Llama-2-7b-hf", "revision": "main"}
    assert model_spec("stories260k", hf=False) == {"source": "local", "name": "stories260k"}


def test_importing_the_client_loads_neither_torch_nor_fastapi():
    code = "import sys, wkvq_client, wkvq_client.cli; print('torch' in sys.modules, 'fastapi' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.stdout.split() == ["False", "False"], result.stdout + result.stderr


# ---------------------------------------------------------------------- the tiny job, submitted through `wkvq`


def test_submit_wait_through_the_wkvq_app(tiny_job):
    result = ok(tiny_job.result)
    assert tiny_job.job.status == "succeeded" and tiny_job.job.current_block == tiny_job.job.total_blocks == 5
    assert tiny_job.job.config["group_size"] == -1 and tiny_job.job.config["crr_k"] == 2
    assert f"job {tiny_job.id} submitted" in result.stderr and "5/5" in result.stderr  # progress off stdout


def test_status_and_jobs(svc, tiny_job):
    job = JobRead.model_validate_json(ok(cli(svc, "status", tiny_job.id, "--json")).stdout)
    assert job.status == "succeeded" and job.epoch == 1 and job.last_loss is not None
    page = JobList.model_validate_json(ok(cli(svc, "jobs", "--json", "--status", "succeeded", "--limit", "5")).stdout)
    assert tiny_job.id in [j.id for j in page.data] and page.count >= 1
    panel = ok(cli(svc, "status", tiny_job.id)).stdout
    for text in ("succeeded", "5/5 (100%)", "epoch", "1/1", "last loss", "worker", "local-0"):
        assert text in panel, panel
    table = ok(cli(svc, "jobs")).stdout
    assert tiny_job.id in table and "succeeded" in table, table  # the id is never shortened
    assert "no jobs" in ok(cli(svc, "jobs", "--status", "failed")).stdout


def test_watch_of_a_finished_job_replays_its_progress(svc, tiny_job):
    result = ok(cli(svc, "watch", tiny_job.id))
    assert "5/5" in result.stdout and f"job {tiny_job.id} succeeded" in result.stdout, result.stdout


def test_download_verifies_extracts_and_resumes_a_partial_file(svc, api, tiny_job):
    (artifact,) = api.artifacts(tiny_job.id)
    dest = svc.tmp / "cli-download"
    result = ok(cli(svc, "download", tiny_job.id, str(dest), "--extract"))
    tar = dest / "model.tar"
    assert f"sha256 {artifact.sha256} verified" in result.stdout and "resumed" not in result.stdout
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == artifact.sha256
    assert (dest / "stories260k-w4kv4" / "model.safetensors").is_file() and "unpacked to" in result.stdout

    half = artifact.size // 2  # an interrupted download: the first half in model.tar.part
    (dest / "model.tar.part").write_bytes(tar.read_bytes()[:half])
    tar.unlink()
    result = ok(cli(svc, "download", tiny_job.id, str(dest)))
    assert f"resumed at byte {half}" in result.stdout, result.stdout
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == artifact.sha256 and not (dest / "model.tar.part").exists()
    assert "already downloaded" in ok(cli(svc, "download", tiny_job.id, str(dest))).stdout


# ---------------------------------------------------------------------- Python API


def test_python_api_returns_typed_models(api, tiny_job):
    job = api.get(tiny_job.id)
    assert isinstance(job, JobRead) and job.status == "succeeded"
    page = api.list(status="succeeded", limit=100)
    assert isinstance(page, JobList) and tiny_job.id in [j.id for j in page.data]
    (artifact,) = api.artifacts(tiny_job.id)
    assert isinstance(artifact, ArtifactRead) and artifact.name == "model.tar"
    assert set(api.metrics(tiny_job.id)["eval"]["ppl"]) == {"fp", "w", "wkv"}
    assert api.wait(tiny_job.id, timeout=5).status == "succeeded"

    events = list(api.events(tiny_job.id))
    assert all(isinstance(e, JobEventRead) for e in events[:-1]) and events[-1] == StreamEnd(status="succeeded")
    assert events[0].kind == "queued" and [e.block for e in events if e.kind == "block_end"] == [0, 1, 2, 3, 4]
    later = list(api.events(tiny_job.id, last_event_id=events[3].id))
    assert [e.id for e in later[:-1]] == [e.id for e in events[4:-1]]


def test_python_download_resumes_with_a_range_request(api, tiny_job, tmp_path):
    (artifact,) = api.artifacts(tiny_job.id)
    first = api.download(tiny_job.id, tmp_path)
    assert (first.resumed_from, first.received, first.sha256) == (0, artifact.size, artifact.sha256)
    data = first.path.read_bytes()

    first.path.unlink()
    (tmp_path / "model.tar.part").write_bytes(data[:1000])
    seen: list[int] = []
    resumed = api.download(tiny_job.id, tmp_path, on_progress=lambda done, total: seen.append(done))
    assert (resumed.resumed_from, resumed.received) == (1000, artifact.size - 1000)  # only the rest was sent: 206
    assert seen[0] > 1000 and seen[-1] == artifact.size and resumed.path.read_bytes() == data

    resumed.path.unlink()  # a .part whose kept bytes are wrong: the check fails, one fresh download follows
    (tmp_path / "model.tar.part").write_bytes(b"x" * 1000)
    again = api.download(tiny_job.id, tmp_path)
    assert again.resumed_from == 0 and again.received == 2 * artifact.size - 1000 and again.path.read_bytes() == data


# ---------------------------------------------------------------------- reconnecting event stream (mock transport)


def _sse(event: JobEventRead | None, status: str = "succeeded") -> bytes:
    if event is None:
        return f'event: end\ndata: {json.dumps({"status": status})}\n\n'.encode()
    return f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n: ping\n\n".encode()


class _Body(httpx.SyncByteStream):
    def __init__(self, chunks: list[bytes], drop: bool) -> None:
        self.chunks, self.drop = chunks, drop

    def __iter__(self):
        yield from self.chunks
        if self.drop:
            raise httpx.ReadError("connection reset by peer")


def test_events_reconnect_with_last_event_id(api, tiny_job):
    real = [e for e in api.events(tiny_job.id) if isinstance(e, JobEventRead)]
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        after = int(request.headers.get("last-event-id", 0))
        rest = [e for e in real if e.id > after]
        first = len(requests) == 1  # the first connection drops after three events
        chunks = [_sse(e) for e in (rest[:3] if first else rest)] + ([] if first else [_sse(None)])
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Body(chunks, first))

    with WKVQClient("http://wkvq.test", "wkvq_a_b", transport=httpx.MockTransport(handler), retry_delay=0) as c:
        got = list(c.events("j1"))
    assert [e.id for e in got[:-1]] == [e.id for e in real] and got[-1].status == "succeeded"  # none lost, none twice
    assert "last-event-id" not in requests[0].headers
    assert requests[1].headers["last-event-id"] == str(real[2].id)
    assert requests[0].headers["authorization"] == "Bearer wkvq_a_b"
