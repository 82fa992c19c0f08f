"""Fault injection against the real services: worker processes killed or frozen, Redis restarted, Postgres cut
off, the artifact store refusing writes. Each test checks the end state in the database and the store."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import fsspec
import httpx
import pytest
from fsspec.implementations.local import LocalFileSystem
from redis import Redis
from sqlalchemy import create_engine, func, insert, select, text

from api.core.context import ServiceContext
from api.core.migrate import upgrade
from api.main import create_app
from api.models import Artifact, BlockCheckpoint, Job, JobEvent
from api.teams.service import team_service
from tests.conftest import fresh_pg_database
from worker.runner import JobRunner

from .conftest import TINY_JOB, service_settings
from .processes import Process, RedisServer, admin_key, service_env, start_server, start_worker
from .proxy import TcpProxy
from .test_e2e import SLOW_JOB, client, job_state, wait_for, wait_status

pytestmark = pytest.mark.slow

N_BLOCKS = 5
# how long a wait for a job's progress may take before the test gives up: only a hang-catcher, never a
# synchronisation. Under CPU load (the suite beside other work) a block of SLOW_JOB took 33 s: 180 s was too short.
PATIENCE = 900


def db_events(db_url: str, job_id: str) -> list[JobEvent]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
    finally:
        engine.dispose()


def db_count(engine, model, *where) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(model).where(*where))


def artifact_sha(api: httpx.Client, job_id: str) -> str:
    (artifact,) = api.get(f"/v1/jobs/{job_id}/artifacts").raise_for_status().json()
    body = api.get(artifact["download_url"]).raise_for_status().content
    assert hashlib.sha256(body).hexdigest() == artifact["sha256"]
    return artifact["sha256"]


def assert_never_ran_twice_at_once(events: list[JobEvent]) -> None:
    """Between two `started` events of a job there is always a hand-back (requeued, retried, ended)."""
    running = False
    for event in events:
        if event.kind == "started":
            assert not running, f"started again while running (event {event.id})"
            running = True
        elif event.kind in ("requeued", "retried", "succeeded", "failed", "cancelled"):
            running = False
    assert sum(e.kind == "succeeded" for e in events) == 1


@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory) -> str:
    """The artifact of an uninterrupted in-process run of SLOW_JOB."""
    tmp = tmp_path_factory.mktemp("reference")
    settings = service_settings(f"sqlite:///{tmp}/wkvq.db", str(tmp / "store"))
    upgrade(settings.DATABASE_URL)
    ctx = ServiceContext.from_settings(settings)
    with ctx.session() as session:
        team_service.create_team(session, name="ref")
        key = team_service.create_key(session, team_name="ref").key
    from fastapi.testclient import TestClient

    with TestClient(create_app(ctx)) as api:
        headers = {"Authorization": f"Bearer {key}"}
        job_id = api.post("/v1/jobs", json=SLOW_JOB, headers=headers).json()["id"]
        JobRunner(ctx, "reference").run(job_id)
        (artifact,) = api.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()
    ctx.close()
    return artifact["sha256"]


@pytest.fixture
def pg_pool(tmp_path):
    """Postgres, an API process (reaper included, no in-process worker) and a key; workers are the test's."""
    with fresh_pg_database() as db_url:
        env = service_env(db_url, tmp_path / "store")
        server, base = start_server(env, tmp_path, "--workers", "0")
        try:
            yield env, client(base, admin_key(env, tmp_path, "team-a")), db_url
        finally:
            server.stop()


class HeldWrites:
    """Fault injection in Postgres: a trigger makes every UPDATE of the job's row, once its `current_block` has
    reached `block`, wait for an advisory lock that this object holds until `release()`. The worker's transaction
    that ended the block commits; its next write (heartbeat, event, stage, publishing) waits, uncommitted."""

    LOCK = 240011

    def __init__(self, db_url: str, job_id: str, block: int) -> None:
        self.engine = create_engine(db_url, isolation_level="AUTOCOMMIT")
        self.holder = self.engine.connect()
        self.holder.execute(text(f"SELECT pg_advisory_lock({self.LOCK})"))
        self.holder.execute(text(
            "CREATE FUNCTION hold_job_writes() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_xact_lock_shared({self.LOCK}); RETURN NEW; END $$"))
        self.holder.execute(text(
            "CREATE TRIGGER hold_job_writes BEFORE UPDATE ON jobs FOR EACH ROW "
            f"WHEN (OLD.id = '{job_id}' AND OLD.current_block >= {int(block)}) EXECUTE FUNCTION hold_job_writes()"))

    def waiting(self) -> bool:
        return bool(self.holder.scalar(text(
            "SELECT count(*) FROM pg_locks JOIN pg_database ON pg_database.oid = pg_locks.database "
            f"WHERE datname = current_database() AND locktype = 'advisory' AND objid = {self.LOCK} AND NOT granted")))

    def release(self) -> None:
        """The held write goes on, to find its client killed: it is rolled back, never committed."""
        self.holder.execute(text(f"SELECT pg_advisory_unlock({self.LOCK})"))
        self.holder.execute(text("DROP TRIGGER hold_job_writes ON jobs"))
        self.holder.execute(text("DROP FUNCTION hold_job_writes()"))
        self.holder.close()
        self.engine.dispose()


def worker_pid(job: dict) -> int:
    return int(job["worker"].split(":")[1])  # host:pid:label


class TestWorkerKilled:
    @pytest.mark.parametrize("moment", ["mid_block", "after_last_block"])
    def test_kill_9_resumes_from_checkpoints_to_the_same_artifact(self, pg_pool, tmp_path, reference_sha, moment):
        env, api, db_url = pg_pool
        first = start_worker(env, tmp_path, "first")
        job_id = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
        if moment == "mid_block":  # block 2 has finished an epoch and is still training
            wait_for(lambda: any(e.kind == "epoch_end" and e.block == 2 for e in db_events(db_url, job_id)),
                     PATIENCE, "an epoch of block 2")
        else:  # every block calibrated; the worker is evaluating or packing the artifact
            # what is left after the last block takes well under a second, less than a poll on a loaded machine:
            # the database holds the worker's first write after it (no timing), and it is killed there
            hold = HeldWrites(db_url, job_id, N_BLOCKS)
            wait_for(lambda: hold.waiting(), PATIENCE, "the worker's first write after the last block")
        first.kill9()
        if moment == "after_last_block":
            hold.release()
        finished = job_state(api, job_id)["current_block"]
        assert job_state(api, job_id)["status"] == "running"

        second = start_worker(env, tmp_path, "second")
        try:
            done = wait_status(api, job_id, "succeeded", PATIENCE)
        finally:
            second.stop()
        events = db_events(db_url, job_id)
        restarted = max(i for i, e in enumerate(events) if e.kind == "started")
        after = events[restarted:]
        assert [e.block for e in after if e.kind == "block_resumed"] == list(range(finished))
        assert [e.block for e in after if e.kind == "block_start"] == list(range(finished, N_BLOCKS))
        assert done["attempts"] == 2 and "requeued" in [e.kind for e in events]
        assert_never_ran_twice_at_once(events)
        assert artifact_sha(api, job_id) == reference_sha


class TestLeaseExpiry:
    def test_frozen_worker_loses_the_job_and_cannot_write_after_waking(self, pg_pool, tmp_path, reference_sha):
        env, api, db_url = pg_pool
        workers = {w.popen.pid: w for w in (start_worker(env, tmp_path, "a"), start_worker(env, tmp_path, "b"))}
        try:
            job_id = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
            running = wait_for(lambda: (j := job_state(api, job_id))["current_block"] >= 1 and j, PATIENCE, "block 0")
            frozen = workers[worker_pid(running)]
            os.kill(frozen.popen.pid, signal.SIGSTOP)  # past its lease: the reaper hands the job on
            try:
                taken = wait_for(lambda: (j := job_state(api, job_id))["worker"] not in (None, running["worker"])
                                 and j["status"] == "running" and j, PATIENCE, "another worker to take the job")
            finally:
                os.kill(frozen.popen.pid, signal.SIGCONT)
            assert taken["attempts"] == 2
            wait_status(api, job_id, "succeeded", PATIENCE)
            wait_for(lambda: "lease" in frozen.output(), PATIENCE, "the woken worker to notice its lost lease")
        finally:
            for w in workers.values():
                w.stop()
        events = db_events(db_url, job_id)
        assert_never_ran_twice_at_once(events)
        takeover = max(i for i, e in enumerate(events) if e.kind == "started")
        ended = [e.block for e in events[takeover:] if e.kind in ("block_end", "block_resumed")]
        assert sorted(ended) == list(range(N_BLOCKS)), "each block ended once under the new owner, nothing stale"
        assert artifact_sha(api, job_id) == reference_sha
        engine = create_engine(db_url)
        with engine.connect() as conn:
            uris = list(conn.scalars(select(BlockCheckpoint.uri).where(BlockCheckpoint.job_id == job_id)))
            owner_token = conn.scalar(select(Job.lease_token).where(Job.id == job_id))
        engine.dispose()
        assert len(uris) == N_BLOCKS and owner_token is None  # released on success


class TestRedisRestart:
    def test_jobs_survive_a_broker_restart(self, tmp_path):
        redis = RedisServer(tmp_path)
        quick = SLOW_JOB | {"config": SLOW_JOB["config"] | {"epochs": 3}}
        with fresh_pg_database() as db_url:
            env = service_env(db_url, tmp_path / "store", WKVQ_DISPATCHER="celery", WKVQ_BROKER_URL=redis.url)
            server, base = start_server(env, tmp_path)
            api = client(base, admin_key(env, tmp_path, "team-a"))
            workers = [start_worker(env, tmp_path, name) for name in ("a", "b")]
            try:
                ids = [api.post("/v1/jobs", json=quick).raise_for_status().json()["id"] for _ in range(4)]
                wait_for(lambda: any(job_state(api, i)["current_block"] >= 1 for i in ids), PATIENCE, "a running job")
                redis.restart(down_seconds=2)  # the queued jobs' messages are gone with it
                for job_id in ids:
                    wait_status(api, job_id, "succeeded", PATIENCE)
            finally:
                for w in workers:
                    w.stop()
                server.stop()
                redis.stop()
            for job_id in ids:
                assert_never_ran_twice_at_once(db_events(db_url, job_id))


class TestWakeUps:
    def test_queued_jobs_are_woken_once_and_a_lost_message_still_runs(self, tmp_path):
        """The reported storm: the reaper re-sent a wake-up and a log line for every queued job every lease period.
        Here 200 jobs wait with no worker over several reaper rounds (each seen to end: it purges a tick event
        the test adds to a deleted job); then every message is lost, and one wake-up brings a worker to them."""
        redis = RedisServer(tmp_path)
        broker = Redis(port=redis.port)
        with fresh_pg_database() as db_url:
            env = service_env(db_url, tmp_path / "store", WKVQ_DISPATCHER="celery", WKVQ_BROKER_URL=redis.url,
                              WKVQ_TEAM_MAX_QUEUED="1000", WKVQ_TEAM_SUBMISSIONS_PER_MINUTE="1000")
            server, base = start_server(env, tmp_path, "--workers", "0")
            api = client(base, admin_key(env, tmp_path, "team-a"))
            engine = create_engine(db_url)
            tomb = api.post("/v1/jobs", json=TINY_JOB).raise_for_status().json()["id"]
            assert api.delete(f"/v1/jobs/{tomb}").status_code == 204

            def reaper_rounds(n: int, at_least_seconds: float = 0.0) -> None:
                """Returns after `n` more reaper rounds, and more while `at_least_seconds` have not passed (the
                old reaper re-sent a queued job's wake-up once it had waited a lease)."""
                start, rounds = time.monotonic(), 0
                while rounds < n or time.monotonic() - start < at_least_seconds:
                    with engine.begin() as conn:
                        conn.execute(insert(JobEvent).values(job_id=tomb, kind="tick"))
                    wait_for(lambda: not db_count(engine, JobEvent, JobEvent.job_id == tomb), PATIENCE,
                             "a reaper round")
                    rounds += 1

            worker = None
            try:
                for _ in range(200):
                    api.post("/v1/jobs", json=TINY_JOB).raise_for_status()
                queue = "default"  # the GPU class's queue
                reaper_rounds(1)
                sent, lines = broker.llen(queue), len(server.output().splitlines())
                reaper_rounds(3, at_least_seconds=2 * 6)  # past two leases (WKVQ_LEASE_SECONDS)
                assert sent == 201  # one wake-up per submission, the deleted job's included
                assert (broker.llen(queue), len(server.output().splitlines())) == (sent, lines)

                broker.flushall()  # every message lost
                reaper_rounds(2)
                lines = len(server.output().splitlines())
                reaper_rounds(3, at_least_seconds=2 * 6)
                assert broker.llen(queue) == 1 and len(server.output().splitlines()) == lines
                assert "200 job(s) queued and no wake-up" in server.output()

                worker = start_worker(env, tmp_path, "a")
                wait_for(lambda: db_count(engine, Job, Job.status == "succeeded"), PATIENCE,
                         "a job whose message was lost")
            finally:
                if worker is not None:
                    worker.stop()
                server.stop()
                redis.stop()
                engine.dispose()


class TestDatabaseOutage:
    def test_api_answers_503_and_the_job_completes_after_recovery(self, tmp_path):
        with fresh_pg_database() as direct_url:
            upgrade(direct_url)
            host_port = direct_url.split("@", 1)[1].split("/", 1)[0]
            proxy = TcpProxy("127.0.0.1", int(host_port.split(":")[1]))
            via_proxy = direct_url.replace(host_port, f"127.0.0.1:{proxy.port}")
            env = service_env(via_proxy, tmp_path / "store")
            server, base = start_server(env, tmp_path, "--no-migrate")
            api = client(base, admin_key(env, tmp_path, "team-a"))
            try:
                job_id = api.post("/v1/jobs", json=SLOW_JOB).raise_for_status().json()["id"]
                wait_for(lambda: job_state(api, job_id)["current_block"] >= 1, PATIENCE, "block 0")
                proxy.cut()
                response = api.get(f"/v1/jobs/{job_id}")
                assert response.status_code == 503 and "database unavailable" in response.text
                assert httpx.get(f"{base}/readyz", timeout=10).status_code == 503
                # back once the worker has felt the outage: a fixed outage of half a lease left too little of the
                # lease for the first heartbeat after it on a loaded machine
                wait_for(lambda: any(line in server.output() for line in ("database unavailable during",
                                                                          "heartbeat failed")),
                         PATIENCE, "the worker to meet the outage")
                proxy.restore()
                done = wait_status(api, job_id, "succeeded", PATIENCE)
            finally:
                server.stop()
                proxy.close()
            assert done["attempts"] == 1  # the worker rode out the outage without losing its lease
            log = server.output()
            assert "database unavailable during" in log or "heartbeat failed" in log, log[-3000:]
            assert_never_ran_twice_at_once(db_events(direct_url, job_id))


class FaultyFileSystem(LocalFileSystem):
    """Local files, except that writing a `.tar` fails like a full disk while `full` is set."""

    protocol = ("faultyfile",)
    full = threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str) and path.startswith("faultyfile://"):
            path = path[len("faultyfile://"):]
        return super()._strip_protocol(path)

    def put_file(self, lpath, rpath, *args, **kwargs):
        if self.full.is_set() and ".tar" in str(rpath):
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().put_file(lpath, rpath, *args, **kwargs)


class TestArtifactStoreFull:
    @pytest.fixture(params=["sqlite"])
    def db_url(self, tmp_path):
        yield f"sqlite:///{tmp_path}/wkvq.db"

    @pytest.fixture
    def settings(self, db_url, tmp_path):
        fsspec.register_implementation("faultyfile", FaultyFileSystem, clobber=True)
        return service_settings(db_url, f"faultyfile://{tmp_path}/store")

    def test_write_failure_fails_the_job_readably_and_keeps_checkpoints(self, client, service, team_headers,
                                                                        tmp_path):
        headers = team_headers("a")
        job_id = client.post("/v1/jobs", json=TINY_JOB, headers=headers).json()["id"]
        FaultyFileSystem.full.set()
        try:
            JobRunner(service, "w1").run(job_id)
        finally:
            FaultyFileSystem.full.clear()
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert job["status"] == "failed"
        assert "artifact store write" in job["error"] and "No space left on device" in job["error"]
        store = Path(tmp_path / "store")
        assert len(list(store.rglob("block-*.safetensors"))) == N_BLOCKS  # the store is where the job wrote
        assert not [p for p in store.rglob("*") if ".tar" in p.name], "no partial artifact"
        assert client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json() == []
        with service.session() as session:
            assert session.scalar(select(func.count()).select_from(BlockCheckpoint)
                                  .where(BlockCheckpoint.job_id == job_id)) == N_BLOCKS
            assert session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 0

        assert client.post(f"/v1/jobs/{job_id}/retry", headers=headers).status_code == 200
        JobRunner(service, "w2").run(job_id)
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{job_id}/metrics", headers=headers).json()["run"]["resumed_blocks"] == N_BLOCKS


class TestConcurrentIdempotency:
    @pytest.mark.parametrize("database", ["sqlite", "postgres"])
    def test_fifty_concurrent_posts_with_one_key_make_one_job(self, tmp_path, database):
        with fresh_pg_database() if database == "postgres" else nullcontext(f"sqlite:///{tmp_path}/wkvq.db") as db_url:
            env = service_env(db_url, tmp_path / "store")
            server, base = start_server(env, tmp_path, "--workers", "0")
            key = admin_key(env, tmp_path, "team-a")
            barrier, responses = threading.Barrier(50), []

            def post() -> None:
                with client(base, key) as api:
                    barrier.wait()
                    responses.append(api.post("/v1/jobs", json=TINY_JOB, headers={"Idempotency-Key": "same"}))

            threads = [threading.Thread(target=post) for _ in range(50)]
            try:
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                jobs = client(base, key).get("/v1/jobs").json()
            finally:
                server.stop()
        assert sorted(r.status_code for r in responses) == [200] * 49 + [201]
        assert len({r.json()["id"] for r in responses}) == 1
        assert jobs["count"] == 1


class TestHostileUploads:
    def test_compressed_and_oversized_bodies_are_refused_not_expanded(self, client, team_headers):
        import gzip

        headers = team_headers("a")
        bomb = gzip.compress(b"a" * 50_000_000)  # 50 MB of text in ~50 KB: stored as bytes, never decompressed
        response = client.post("/v1/datasets", files={"file": ("calib.txt.gz", bomb)},
                               headers=headers | {"Content-Encoding": "gzip"})
        assert response.status_code == 422 and "UTF-8" in response.text
        huge = b"x" * (64 * 1024 + 1)
        assert client.post("/v1/datasets", files={"file": ("a.txt", huge)}, headers=headers).status_code == 413
        one_line = ("word " * 12000).encode()  # a single 60 KB line is still text
        accepted = client.post("/v1/datasets", files={"file": ("../../x.txt", one_line)}, headers=headers)
        assert accepted.status_code == 201 and accepted.json()["filename"] == "x.txt"


def test_key_check_is_constant_time(client, team_headers, monkeypatch):
    """The secret is compared with hmac.compare_digest (its time does not depend on where the hashes differ)."""
    import api.teams.service as teams

    calls = []
    real = teams.hmac.compare_digest
    monkeypatch.setattr(teams.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    headers = team_headers("a")
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    wrong = headers["Authorization"][:-4] + "xxxx"
    assert client.get("/v1/jobs", headers={"Authorization": wrong}).status_code == 401
    assert len(calls) == 2 and all(len(a) == len(b) == 64 for a, b in calls)


def test_process_helper_kill9_is_real(tmp_path):
    """`Process.kill9` sends SIGKILL to the whole process group (no cleanup handlers run)."""
    p = Process(["bash", "-c", "trap 'echo cleaned > marker' TERM; sleep 60"], dict(os.environ), tmp_path,
                tmp_path / "p.log")
    time.sleep(0.3)
    p.kill9()
    assert p.popen.returncode == -signal.SIGKILL and not (tmp_path / "marker").exists()
