"""ArtifactStore on `file://` and on `s3://` (s3fs against a moto server on loopback), and one job end to end on s3."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from fastapi.testclient import TestClient

from api.core.context import ServiceContext
from api.core.migrate import upgrade
from api.core.storage import CHUNK, ArtifactStore, StorageError
from api.main import create_app
from api.models import Artifact, BlockCheckpoint, Job
from api.teams.service import team_service
from tests.service.conftest import TINY_JOB, service_settings
from tests.service.processes import free_port
from worker.runner import ARTIFACT_NAME, JobRunner

BUCKET = "wkvq-test"
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """A moto server (server mode, a subprocess on loopback) with one bucket; killed at the end of the session."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {proc.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint}")
                time.sleep(0.1)
        _boto(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _boto(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                        region_name="us-east-1")


def _s3_options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "key": "test", "secret": "test", "client_kwargs": {"region_name": "us-east-1"}}


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    """A fresh, empty store: a tmp dir, or a fresh prefix of the moto bucket."""
    if request.param == "file":
        return ArtifactStore(f"file://{tmp_path}/store")
    endpoint = request.getfixturevalue("s3_endpoint")
    return ArtifactStore(f"s3://{BUCKET}/{uuid.uuid4().hex}", _s3_options(endpoint))


def _objects(store: ArtifactStore) -> list[str]:
    """Every object (file) under the store's root, as keys relative to it."""
    store.fs.invalidate_cache()
    root = store.root.rstrip("/") + "/"
    return sorted(p.removeprefix(root) for p in store.fs.find(store.root))


DATA = hashlib.sha256(b"seed").digest() * ((2 * CHUNK + 12345) // 32)  # over two read chunks


def test_put_bytes_and_read(store):
    stored = store.put_bytes(DATA, "jobs/j1/blob.bin")
    assert stored.uri == f"{store.protocol}://{store.root}/jobs/j1/blob.bin"
    assert stored.sha256 == hashlib.sha256(DATA).hexdigest()
    assert stored.size == len(DATA)
    assert store.read_bytes(stored.uri) == DATA
    assert store.exists(stored.uri)
    assert _objects(store) == ["jobs/j1/blob.bin"]  # no temporary object left behind


def test_put_file_and_download(store, tmp_path):
    local = tmp_path / "in.bin"
    local.write_bytes(DATA)
    stored = store.put_file(str(local), "jobs/j2/model.tar")
    assert stored.uri.startswith(f"{store.protocol}://")
    assert (stored.sha256, stored.size) == (hashlib.sha256(DATA).hexdigest(), len(DATA))
    assert hashlib.sha256(store.read_bytes(stored.uri)).hexdigest() == stored.sha256
    out = tmp_path / "out.bin"
    store.download(stored.uri, str(out))
    assert out.read_bytes() == DATA
    assert _objects(store) == ["jobs/j2/model.tar"]


def test_overwrite_replaces_the_object(store):
    store.put_bytes(b"first version", "k/obj")
    stored = store.put_bytes(b"second", "k/obj")
    assert store.read_bytes(stored.uri) == b"second"
    assert stored.size == 6
    assert _objects(store) == ["k/obj"]


@pytest.mark.parametrize("start,length", [
    (0, len(DATA)),  # whole
    (CHUNK - 10, CHUNK + 20),  # middle, across a chunk boundary
    (1000, 5000),  # middle, inside one chunk
    (len(DATA) - 777, 777),  # tail
    (len(DATA) - 100, 10_000),  # past the end: the bytes that exist
    (len(DATA), 10),  # at the end: nothing
])
def test_iter_range(store, start, length):
    stored = store.put_bytes(DATA, "r/blob")
    chunks = list(store.iter_range(stored.uri, start, length))
    assert all(len(c) <= CHUNK for c in chunks)
    assert b"".join(chunks) == DATA[start:start + length]


def test_exists_and_delete(store):
    stored = store.put_bytes(b"x" * 10, "d/obj")
    other = store.put_bytes(b"y", "d/other")
    assert store.exists(stored.uri)
    store.delete(stored.uri)
    assert not store.exists(stored.uri)
    store.delete(stored.uri)  # deleting a missing object is no error
    with pytest.raises(FileNotFoundError):
        store.read_bytes(stored.uri)
    assert _objects(store) == ["d/other"]
    assert store.read_bytes(other.uri) == b"y"


def test_failed_put_file_leaves_nothing(store, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.put_file(str(tmp_path / "missing.bin"), "f/model.tar")
    assert _objects(store) == []


def test_failure_between_write_and_move_leaves_nothing(store, monkeypatch, tmp_path):
    """The temporary object was written, then moving it into place failed: it is removed, nothing is published."""
    store.put_bytes(b"old", "f/kept")

    def broken_mv(src, dst, **kwargs):
        assert store.fs.exists(src)  # the temporary object was written
        raise OSError("connection lost")

    monkeypatch.setattr(store.fs, "mv", broken_mv)
    with pytest.raises(StorageError, match="f/obj failed: OSError: connection lost"):
        store.put_bytes(b"new bytes", "f/obj")
    local = tmp_path / "in.bin"
    local.write_bytes(b"file bytes")
    with pytest.raises(StorageError, match="connection lost"):
        store.put_file(str(local), "f/kept")
    monkeypatch.undo()
    assert _objects(store) == ["f/kept"]
    assert store.read_bytes(store.uri("f/kept")) == b"old"


def test_uris_outside_the_root_are_refused(store, tmp_path):
    stored = store.put_bytes(b"inside", "a/obj")
    root = store.root.rstrip("/")
    parent = root.rsplit("/", 1)[0]
    outside = [
        f"{store.protocol}://{root}",  # the root itself
        f"{store.protocol}://{root}-sibling/a/obj",  # shares the root as a string prefix
        f"{store.protocol}://{parent}/elsewhere/obj",
        f"{store.protocol}://{root}/a/../../elsewhere/obj",  # climbs out
        f"{store.protocol}://{root}/../{root.rsplit('/', 1)[1]}-x/obj",
        ("s3" if store.protocol == "file" else "file") + f"://{root}/a/obj",  # another file system
        "/etc/passwd",
    ]
    for uri in outside:
        with pytest.raises(ValueError, match="outside the artifact store"):
            store.read_bytes(uri)
        with pytest.raises(ValueError):
            store.exists(uri)
        with pytest.raises(ValueError):
            store.delete(uri)
        with pytest.raises(ValueError):
            list(store.iter_range(uri, 0, 1))
        with pytest.raises(ValueError):
            store.download(uri, str(tmp_path / "out"))
    assert store.read_bytes(stored.uri) == b"inside"


def test_check_on_a_fresh_store(store):
    store.check()  # an empty root (on s3: a prefix with no object yet) is reachable
    store.put_bytes(b"x", "c/obj")
    store.check()


def test_check_fails_when_s3_is_unreachable():
    options = _s3_options(f"http://127.0.0.1:{free_port()}") | {
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}, "retries": 1}
    store = ArtifactStore(f"s3://{BUCKET}/unreachable", options)
    with pytest.raises(Exception):
        store.check()


# ---------------------------------------------------------------------------------------------- end to end on s3


def test_job_end_to_end_on_s3(s3_endpoint, tmp_path):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    settings = service_settings(f"sqlite:///{tmp_path}/wkvq.db", f"s3://{BUCKET}/{prefix}",
                                STORAGE_OPTIONS=_s3_options(s3_endpoint))
    upgrade(settings.DATABASE_URL)
    ctx = ServiceContext.from_settings(settings)
    try:
        with ctx.session() as session:
            team_service.create_team(session, name="s3team")
            key = team_service.create_key(session, team_name="s3team").key
        headers = {"Authorization": f"Bearer {key}"}
        with TestClient(create_app(ctx)) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.json()
            assert ready.json()["checks"]["storage"] == "ok"

            response = client.post("/v1/jobs", json=TINY_JOB, headers=headers)
            assert response.status_code == 201, response.text
            job_id = response.json()["id"]

            runner = JobRunner(ctx, "w")
            lease = runner.claim_next(["default"])
            assert lease is not None and lease.job_id == job_id
            runner.execute(lease)

            with ctx.session() as session:
                job = session.get(Job, job_id)
                assert job.status == "succeeded", job.error
                artifact = session.query(Artifact).filter_by(job_id=job_id, name=ARTIFACT_NAME).one()
                checkpoints = session.query(BlockCheckpoint).filter_by(job_id=job_id).order_by(
                    BlockCheckpoint.block_index).all()

            # What is in the bucket, read with boto3 rather than through the store.
            s3 = _boto(s3_endpoint)
            listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")
            keys = sorted(o["Key"] for o in listed.get("Contents", []))
            base = f"{prefix}/jobs/{job_id}"
            recorded = [artifact.uri, *(c.uri for c in checkpoints)]
            assert keys == sorted(uri.removeprefix(f"s3://{BUCKET}/") for uri in recorded)  # nothing else, no temporaries
            assert all(uri.startswith(f"s3://{BUCKET}/{base}/") for uri in recorded)

            def bucket_bytes(uri: str) -> bytes:
                assert uri.startswith(f"s3://{BUCKET}/{base}/")
                return s3.get_object(Bucket=BUCKET, Key=uri.removeprefix(f"s3://{BUCKET}/"))["Body"].read()

            assert [c.block_index for c in checkpoints] == list(range(5))
            for c in checkpoints:
                data = bucket_bytes(c.uri)
                assert (hashlib.sha256(data).hexdigest(), len(data)) == (c.sha256, c.size)
            tar = bucket_bytes(artifact.uri)
            assert (hashlib.sha256(tar).hexdigest(), len(tar)) == (artifact.sha256, artifact.size)
            assert len(tar) > 2000

            url = f"/v1/jobs/{job_id}/artifacts/{ARTIFACT_NAME}"
            whole = client.get(url, headers=headers)
            assert whole.status_code == 200
            assert whole.content == tar
            assert whole.headers["x-content-sha256"] == artifact.sha256
            assert int(whole.headers["content-length"]) == len(tar)

            part = client.get(url, headers=headers | {"Range": "bytes=100-1099"})
            assert part.status_code == 206
            assert part.content == tar[100:1100]
            assert part.headers["content-range"] == f"bytes 100-1099/{len(tar)}"

            tail = client.get(url, headers=headers | {"Range": "bytes=-500"})
            assert tail.status_code == 206
            assert tail.content == tar[-500:]

            beyond = client.get(url, headers=headers | {"Range": f"bytes={len(tar)}-"})
            assert beyond.status_code == 416
    finally:
        ctx.close()
