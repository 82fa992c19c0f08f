"""API load on loopback: job status and job list reads under 100 concurrent clients, next to `/healthz`, and the
submit -> start latency of the local and the Celery dispatcher. Every part is bounded in time.

    python benchmarks/api_load.py                          # all of it; appends to benchmarks/RESULTS.md
    python benchmarks/api_load.py --duration 5 --no-write  # a quick look
    python benchmarks/api_load.py --max-load 1.2           # first wait (up to 20 min) for a quiet machine

Reads: a throwaway Postgres database (WKVQ_TEST_POSTGRES, default the local trust-auth server) is migrated and
filled through the SQLAlchemy models with `--jobs` jobs of one team in mixed statuses, most of them with the events
a real run writes (block start/end, per-epoch loss), so that a status read computes ETA, last loss and epoch from
real rows; then ANALYZEd, as autovacuum would. `wkvq serve --processes N` (for each N of `--processes`) runs as a
real process in Celery mode with a private redis-server and no worker, so that nothing changes the table while it
is read. The load generator is a separate process (this file, subcommand `load`): `--clients` asyncio tasks, each
on its own keep-alive HTTP/1.1 connection, sending its next request as soon as the previous one has answered
(closed loop: the server saturated, this gives throughput) or on a fixed schedule (paced: each client polls every
`--poll-interval` s, as `wkvq_client.wait` does; latency is then counted from the scheduled send time, so a
stalled server cannot hide its queue). Each row runs `--warmup` s unrecorded, then `--duration` s recorded; a
request counts when it starts and ends inside the recorded window; what is still in flight at the end is
cancelled, and the next row waits until /healthz answers quickly again. The closed-loop rows run in `--rounds`
rounds (healthz, status, list; again): the status/healthz throughput ratio is taken within a round, and the checks
use the median round, so that a burst of other users' work on the shared machine moves one round, not the verdict.

The connections are plain asyncio streams, not httpx: one `httpx.AsyncClient` with 100 connections costs about
7 ms of client CPU per request here (httpcore's pool rescans every connection for every waiting request), so on
2 cores it would measure itself. `--client httpx` runs it anyway, for comparison.

Submit -> start: a fresh database each; `wkvq serve` with WKVQ_DISPATCHER=local (in-process worker), then `wkvq
serve` with WKVQ_DISPATCHER=celery plus a `wkvq worker` process and a private redis-server. `--submissions` tiny
jobs are submitted one at a time; the latency is the job's `started_at` (set by the worker when it claims the job)
minus the wall-clock time at which POST /v1/jobs returned (and at which it was sent), and each job is awaited to
its end before the next is submitted. Service settings are the shipped defaults (poll 1 s, lease 60 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from provenance import ROOT, code_version

sys.path.insert(0, str(ROOT))

from tests.service.processes import (  # noqa: E402
    RedisServer, service_env, start_server, start_worker)

PG_ADMIN_URL = os.environ.get("WKVQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
CALIB_TEXT = ROOT / "wkvq_core" / "assets" / "tinystories" / "calib.txt"
START_TEXT_CHARS = 3000
TINY_JOB = {
    "model": {"source": "local", "name": "stories260k"},
    "calibration": {"source": "builtin", "name": "tinystories"},
    "config": {"group_size": -1, "nsamples": 4, "seqlen": 64, "epochs": 0, "crr_k": 1},
}
# shipped defaults, not the tests' fast settings (service_env sets those)
DEFAULT_TIMING = ("WKVQ_LEASE_SECONDS", "WKVQ_HEARTBEAT_SECONDS", "WKVQ_REAPER_SECONDS", "WKVQ_POLL_SECONDS")
MEASURED_CODE = ("api", "worker", "benchmarks/api_load.py")  # what a run's code version covers
TARGET_STATUS_P99_MS = 50.0
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_START_S = {"local": 1.0, "celery": 2.0}
VERSIONED = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "psycopg", "pydantic", "celery", "kombu", "redis",
             "httpx")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- throwaway database

@contextlib.contextmanager
def fresh_database():
    """An empty Postgres database with a unique name (its SQLAlchemy URL), dropped afterwards (as tests/conftest.py)."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10)
    params = conninfo_to_dict(PG_ADMIN_URL)
    name = f"wkvq_bench_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        password = f":{params['password']}" if params.get("password") else ""
        yield (f"postgresql+psycopg://{params.get('user', 'postgres')}{password}@{params.get('host', '127.0.0.1')}:"
               f"{params.get('port', '5432')}/{name}")
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.close()


def prepare_database(url: str, n_jobs: int, seed: int = 0) -> tuple[str, list[str], dict[str, int], int]:
    """Migrates, creates team `bench` and a key, inserts the jobs and their events. Returns (key, job ids,
    jobs per status, number of events)."""
    from sqlalchemy import insert

    from api.core.context import ServiceContext
    from api.core.migrate import upgrade
    from api.core.config import Settings
    from api.jobs.schemas import JobCreate
    from api.models import Job, JobEvent, JobStatus
    from api.teams.service import team_service

    upgrade(url)
    ctx = ServiceContext.from_settings(Settings(_env_file=None, DATABASE_URL=url))
    rng = random.Random(seed)
    spec = JobCreate.model_validate(TINY_JOB | {"config": TINY_JOB["config"] | {"epochs": 2}}).model_dump(
        mode="json", exclude={"gpu_class", "priority"})
    mix = ([JobStatus.SUCCEEDED] * 60 + [JobStatus.QUEUED] * 10 + [JobStatus.RUNNING] * 10 + [JobStatus.FAILED] * 15
           + [JobStatus.CANCELLED] * 5)
    now = dt.datetime.now(dt.timezone.utc)
    n_blocks, epochs = 5, 2
    jobs, events, counts = [], [], {}
    for i in range(n_jobs):
        status = rng.choice(mix)
        counts[status.value] = counts.get(status.value, 0) + 1
        job_id = uuid.uuid4().hex
        created = now - dt.timedelta(seconds=(n_jobs - i) * 60 + rng.random())
        started = created + dt.timedelta(seconds=5) if status not in (JobStatus.QUEUED, JobStatus.CANCELLED) else None
        done_blocks = {JobStatus.SUCCEEDED: n_blocks, JobStatus.RUNNING: rng.randint(0, n_blocks - 1),
                       JobStatus.FAILED: rng.randint(0, n_blocks - 1)}.get(status, 0)
        running = status == JobStatus.RUNNING
        jobs.append(dict(
            id=job_id, team_id=None, status=status.value, spec=spec, gpu_class="default", priority=0,
            attempts=0 if started is None else 1, max_attempts=3, cancel_requested=False,
            lease_owner="bench-host:1:default:gpu0" if running else None,
            lease_token=uuid.uuid4().hex if running else None,
            # far in the future: the server's reaper must not requeue these while they are read
            lease_expires_at=now + dt.timedelta(days=1) if running else None,
            heartbeat_at=now if running else None, current_block=done_blocks,
            total_blocks=n_blocks if started is not None else None,
            error="internal error: RuntimeError: out of memory" if status == JobStatus.FAILED else None,
            idempotency_key=None, request_hash=hashlib.sha256(job_id.encode()).hexdigest(), started_at=started,
            finished_at=(created + dt.timedelta(seconds=60) if status.terminal else None),
            created_at=created, updated_at=now))
        t = created
        events.append(dict(job_id=job_id, created_at=t, kind="queued", message="queued on default"))
        if status == JobStatus.CANCELLED:
            events.append(dict(job_id=job_id, created_at=t, kind="cancelled", message="cancelled before it started"))
        if started is None:
            continue
        events.append(dict(job_id=job_id, created_at=started, kind="started", message="attempt 1 on bench"))
        for block in range(min(done_blocks + 1, n_blocks)):
            events.append(dict(job_id=job_id, created_at=t, kind="block_start", block=block, n_blocks=n_blocks))
            finished_block = block < done_blocks
            for epoch in range(1, epochs + 1 if finished_block else rng.randint(0, epochs) + 1):
                events.append(dict(job_id=job_id, created_at=t, kind="epoch_end", block=block, n_blocks=n_blocks,
                                   epoch=epoch, epochs=epochs, loss=rng.uniform(0.01, 0.2)))
            if finished_block:
                events.append(dict(job_id=job_id, created_at=t, kind="block_end", block=block, n_blocks=n_blocks,
                                   seconds=rng.uniform(2, 4)))
        if status.terminal:
            events.append(dict(job_id=job_id, created_at=t, kind=status.value, message=f"bench: {status.value}"))
    with ctx.session() as session:
        team = team_service.create_team(session, name="bench")
        key = team_service.create_key(session, team_name="bench").key
        for job in jobs:
            job["team_id"] = team.id
        session.execute(insert(Job), jobs)
        session.execute(insert(JobEvent), events)
        session.commit()
    # what autovacuum does to a table that grew: without statistics Postgres plans "last event of this job" as a
    # backward scan of the events' primary key (0.2 ms instead of 0.006 ms per job on this data)
    with ctx.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    ctx.close()
    return key, [j["id"] for j in jobs], counts, len(events)


# --------------------------------------------------------------------------------------------- load generator

@dataclass
class Recorded:
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: dict[str, int] = field(default_factory=dict)
    late_starts: int = 0  # paced: requests sent later than scheduled (the client was still waiting)
    completed: int = 0  # every answered request, warm-up included (for CPU per request)


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams: GET, read the status line, the headers and a
    Content-Length body. About 0.1 ms of client CPU per request, against several ms for httpx.AsyncClient with 100
    connections (httpcore's pool rescans every connection for every queued request: O(connections x waiting))."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        self.host, port = base.split("://", 1)[1].rstrip("/").rsplit(":", 1)
        self.port = int(port)
        self.head = "".join(f"{k}: {v}\r\n" for k, v in ({"Host": f"{self.host}:{self.port}"} | headers).items())
        self.reader = self.writer = None

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
            head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(head[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            body = await self.reader.readexactly(int(fields["content-length"]))
            if fields.get("connection", "").lower() == "close":
                await self.close()
            return status, body
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


class HttpxConnections:
    """The same interface over one shared httpx.AsyncClient (connection limit = clients), for comparison."""

    def __init__(self, base: str, headers: dict[str, str], clients: int) -> None:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        self.client = httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=60)

    async def get(self, path: str) -> tuple[int, bytes]:
        response = await self.client.get(path)
        return response.status_code, response.content

    async def close(self) -> None:
        await self.client.aclose()


async def _load(base: str, key: str, target: str, job_ids: list[str], clients: int, warmup: float, duration: float,
                interval: float | None, seed: int, implementation: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if implementation == "httpx":
        shared = HttpxConnections(base, headers, clients)
        connections = [shared] * clients
    else:
        connections = [RawConnection(base, headers) for _ in range(clients)]
    rec = Recorded()
    loop = asyncio.get_running_loop()
    cpu_start = time.process_time()
    # open the connections before anything is timed
    await asyncio.gather(*(c.get("/healthz") for c in connections))
    t_start = loop.time()
    t0, t1 = t_start + warmup, t_start + warmup + duration

    def path(rng: random.Random) -> str:
        if target == "status":
            return f"/v1/jobs/{rng.choice(job_ids)}"
        if target == "list":
            return "/v1/jobs?limit=20"
        return "/healthz"

    async def one(connection, rng: random.Random, scheduled: float | None) -> None:
        sent = loop.time()
        start = sent if scheduled is None else scheduled
        try:
            status, body = await connection.get(path(rng))
            outcome = None if status == 200 else f"HTTP {status}"
            if outcome is None:
                json.loads(body)  # the client parses what it gets, as a real one does
        except (OSError, asyncio.IncompleteReadError, httpx.HTTPError, ValueError, KeyError) as exc:
            outcome = type(exc).__name__
        end = loop.time()
        rec.completed += 1
        if start >= t0 and end <= t1:
            if outcome is None:
                rec.latencies.append(end - start)
            else:
                rec.errors[outcome] = rec.errors.get(outcome, 0) + 1
            if scheduled is not None and sent - scheduled > 0.001:
                rec.late_starts += 1

    async def closed(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while loop.time() < t1:
            await one(connections[i], rng, None)

    async def paced(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        scheduled = t_start + rng.random() * interval  # clients spread evenly over one interval
        while scheduled < t1:
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await one(connections[i], rng, scheduled)
            scheduled += interval

    tasks = [asyncio.create_task((paced if interval else closed)(i)) for i in range(clients)]
    # bounded in time: what is still in flight at the end of the window would not count anyway
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, t1 - loop.time()) + 0.1)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cpu = time.process_time() - cpu_start
    for connection in set(connections):
        await connection.close()
    lat = sorted(rec.latencies)
    return {
        "target": target, "mode": "paced" if interval else "closed", "clients": clients, "duration": duration,
        "interval": interval, "count": len(lat), "errors": rec.errors, "late_starts": rec.late_starts,
        "completed": rec.completed + clients,
        "throughput": len(lat) / duration, "client": implementation, "client_cpu_s": cpu,
        "p50_ms": 1000 * percentile(lat, 50), "p90_ms": 1000 * percentile(lat, 90),
        "p99_ms": 1000 * percentile(lat, 99), "max_ms": 1000 * lat[-1] if lat else float("nan"),
        "mean_ms": 1000 * statistics.fmean(lat) if lat else float("nan"),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="api_load.py load", description="the load generator process")
    parser.add_argument("--base", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--target", choices=("healthz", "status", "list"), required=True)
    parser.add_argument("--job-ids", required=True, help="a file with one job id per line")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=None, help="paced: seconds between a client's requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw")
    a = parser.parse_args(argv)
    ids = Path(a.job_ids).read_text().split()
    result = asyncio.run(_load(a.base, a.key, a.target, ids, a.clients, a.warmup, a.duration, a.interval, a.seed,
                               a.client))
    print(json.dumps(result))


def settle(base: str, limit: float = 60.0) -> None:
    """Waits until the server has worked off the requests the previous row left in flight (cancelled on the client
    side, still queued in the server): /healthz, which needs a thread-pool slot too, answers quickly twice."""
    t, fast = time.monotonic(), 0
    with httpx.Client(base_url=base, timeout=limit) as client:
        while fast < 2 and time.monotonic() - t < limit:
            t_req = time.perf_counter()
            client.get("/healthz")
            fast = fast + 1 if time.perf_counter() - t_req < 0.05 else 0
            time.sleep(0.2)
    if time.monotonic() - t > 1:
        log(f"  (server settled in {time.monotonic() - t:.1f} s)")


def run_load(base: str, key: str, ids_file: Path, target: str, args: argparse.Namespace,
             interval: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "load", "--base", base, "--key", key, "--target", target, "--job-ids",
           str(ids_file), "--clients", str(args.clients), "--warmup", str(args.warmup), "--duration",
           str(args.duration), "--seed", str(args.seed), "--client", args.client]
    if interval:
        cmd += ["--interval", str(interval)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.warmup + args.duration + 120)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr}")
    result = json.loads(done.stdout)
    log(f"  {result['mode']:6} {target:7}: {result['throughput']:7.1f} req/s  p50 {result['p50_ms']:7.1f} ms  "
        f"p99 {result['p99_ms']:7.1f} ms  errors {result['errors'] or 0}  client CPU {result['client_cpu_s']:.1f} s")
    return result


# --------------------------------------------------------------------------------------------- the scenarios

def _cpu_ticks(pids: list[int]) -> int:
    """utime + stime (+ waited-for children) of these processes, in clock ticks; gone ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])
    return total


def _group(pgid: int) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()]


def _postgres() -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout.split()]


def read_scenarios(args: argparse.Namespace, workdir: Path) -> dict:
    with fresh_database() as url:
        t = time.monotonic()
        key, ids, counts, n_events = prepare_database(url, args.jobs, args.seed)
        log(f"database: {len(ids)} jobs {counts}, {n_events} events ({time.monotonic() - t:.1f} s)")
        ids_file = workdir / "job_ids.txt"
        ids_file.write_text("\n".join(ids))
        redis = RedisServer(workdir)
        env = {k: v for k, v in service_env(url, workdir / "store").items() if k not in DEFAULT_TIMING}
        env |= {"WKVQ_DISPATCHER": "celery", "WKVQ_BROKER_URL": redis.url}
        results = {"counts": counts, "events": n_events, "runs": {}}
        try:
            for processes in args.processes:
                log(f"reads, `wkvq serve --processes {processes}`")
                extra = ["--processes", str(processes)] if processes != 1 else []  # (older serves lack the flag)
                server, base = start_server(env, workdir, "--no-migrate", *extra)
                run = results["runs"][processes] = {"closed": [], "paced": []}  # per mode, rounds of rows
                try:
                    ticks = os.sysconf("SC_CLK_TCK")
                    for mode, interval, rounds in (("closed", None, args.rounds), ("paced", args.poll_interval, 1)):
                        for _ in range(rounds if interval or mode == "closed" else 0):
                            rows = {}
                            for target in ("healthz", "status", "list"):
                                settle(base)
                                serve_pids, pg_pids = _group(server.popen.pid), _postgres()
                                cpu0 = _cpu_ticks(serve_pids), _cpu_ticks(pg_pids)
                                r = rows[target] = run_load(base, key, ids_file, target, args, interval)
                                cpu1 = _cpu_ticks(serve_pids), _cpu_ticks(pg_pids)
                                r["server_cpu_ms"] = 1000 * (cpu1[0] - cpu0[0]) / ticks / max(r["completed"], 1)
                                r["postgres_cpu_ms"] = 1000 * (cpu1[1] - cpu0[1]) / ticks / max(r["completed"], 1)
                            run[mode].append(rows)
                finally:
                    server.stop()
        finally:
            redis.stop()
    return results


def submit_to_start(dispatcher: str, args: argparse.Namespace, workdir: Path) -> dict:
    from api.core.migrate import upgrade
    from api.core.config import Settings
    from api.core.context import ServiceContext
    from api.teams.service import team_service

    workdir = workdir / dispatcher
    workdir.mkdir()
    redis = worker = server = None
    with fresh_database() as url:
        upgrade(url)
        ctx = ServiceContext.from_settings(Settings(_env_file=None, DATABASE_URL=url))
        with ctx.session() as session:
            team_service.create_team(session, name="bench")
            key = team_service.create_key(session, team_name="bench").key
        ctx.close()
        env = {k: v for k, v in service_env(url, workdir / "store").items() if k not in DEFAULT_TIMING}
        try:
            if dispatcher == "celery":
                redis = RedisServer(workdir)
                env |= {"WKVQ_DISPATCHER": "celery", "WKVQ_BROKER_URL": redis.url}
                worker = start_worker(env, workdir, "bench")
                deadline = time.monotonic() + 120
                while "ready." not in worker.output():
                    assert worker.popen.poll() is None and time.monotonic() < deadline, worker.output()
                    time.sleep(0.2)
            server, base = start_server(env, workdir, "--no-migrate")
            return _submissions(base, key, args.submissions, dispatcher)
        finally:
            for process in (server, worker, redis):
                if process is not None:
                    process.stop()


def _submissions(base: str, key: str, n: int, dispatcher: str) -> dict:
    delays, from_sent, post_ms, run_s = [], [], [], []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30) as api:
        # a short uploaded text for calibration and evaluation keeps each job to a few seconds
        text = CALIB_TEXT.read_text()[:START_TEXT_CHARS]
        dataset = api.post("/v1/datasets", files={"file": ("bench.txt", text.encode())}).raise_for_status().json()
        data = {"source": "upload", "dataset_id": dataset["id"]}
        job_spec = TINY_JOB | {"calibration": data, "evaluation": data}
        for i in range(n + 1):  # the first one warms the worker up (imports, model files) and is not counted
            t_post = time.perf_counter()
            sent = dt.datetime.now(dt.timezone.utc)
            response = api.post("/v1/jobs", json=job_spec).raise_for_status()
            returned = dt.datetime.now(dt.timezone.utc)
            post_ms.append(1000 * (time.perf_counter() - t_post))
            job_id = response.json()["id"]
            deadline = time.monotonic() + 30
            while True:
                job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
                if job["started_at"] is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dispatcher}: job {job_id} not started after 30 s: {job}")
                time.sleep(0.01)
            started = dt.datetime.fromisoformat(job["started_at"])
            delay = (started - returned).total_seconds()
            deadline = time.monotonic() + 300
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{dispatcher}: job {job_id} did not finish: {job}")
                time.sleep(0.1)
                job = api.get(f"/v1/jobs/{job_id}").raise_for_status().json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"{dispatcher}: job {job_id} {job['status']}: {job['error']}")
            finished = dt.datetime.fromisoformat(job["finished_at"]) - dt.datetime.fromisoformat(job["started_at"])
            log(f"  {dispatcher} #{i}: submit->start {1000 * delay:7.1f} ms (POST {post_ms[-1]:.0f} ms, "
                f"run {finished.total_seconds():.1f} s){'  [warm-up, not counted]' if i == 0 else ''}")
            if i:
                delays.append(delay)
                from_sent.append((started - sent).total_seconds())
                run_s.append(finished.total_seconds())
    s = sorted(delays)
    return {"n": len(s), "median_ms": 1000 * statistics.median(s), "max_ms": 1000 * s[-1], "min_ms": 1000 * s[0],
            "mean_ms": 1000 * statistics.fmean(s), "post_median_ms": statistics.median(post_ms[1:]),
            "sent_median_ms": 1000 * statistics.median(from_sent), "sent_max_ms": 1000 * max(from_sent),
            "run_median_s": statistics.median(run_s)}


# --------------------------------------------------------------------------------------------- report

def wait_for_quiet(max_load: float, max_wait: float) -> None:
    deadline = time.monotonic() + max_wait
    while True:
        load1 = os.getloadavg()[0]
        if load1 < max_load:
            log(f"load average {load1:.2f} < {max_load}: starting")
            return
        if time.monotonic() > deadline:
            log(f"load average still {load1:.2f} after {max_wait:.0f} s: starting anyway")
            return
        log(f"load average {load1:.2f} >= {max_load}: waiting 30 s")
        time.sleep(30)


def versions() -> str:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    pg = subprocess.run(["psql", PG_ADMIN_URL, "-Atc", "show server_version"], capture_output=True, text=True)
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()
    return ", ".join([f"Python {platform.python_version()}", *(f"{n} {version(n)}" for n in VERSIONED),
                      f"PostgreSQL {pg.stdout.strip() or '?'}",
                      f"redis-server {next((w[2:] for w in redis if w.startswith('v=')), '?')}"])


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


ENDPOINTS = {"healthz": "`GET /healthz`", "status": "`GET /v1/jobs/{id}`", "list": "`GET /v1/jobs?limit=20`"}


def report(args: argparse.Namespace, reads: dict | None, starts: dict, started: dt.datetime, runtime: float,
           loads: tuple) -> str:
    lines = [f"## API load run {started:%Y-%m-%d %H:%M} UTC", "",
             f"- command: `{shlex.join(['python', 'benchmarks/api_load.py', *sys.argv[1:]])}`",
             f"- date (UTC): {started:%Y-%m-%d %H:%M}; total runtime {runtime / 60:.1f} min; code {code_version(*MEASURED_CODE)}",
             f"- {versions()}",
             f"- machine: {os.cpu_count()} CPU cores shared with other users' jobs; load average (1 min) "
             f"{loads[0]:.2f} before the run, {loads[1]:.2f} after it"
             + (f" (the run waited for < {args.max_load:g})" if args.max_load else ""),
             ]
    checks = []
    if reads:
        lines += [
            f"- reads: `wkvq serve --processes N` (WKVQ_DISPATCHER=celery, private redis-server, no worker, shipped "
            f"defaults otherwise) on a throwaway Postgres database with {args.jobs} jobs of one team "
            f"({', '.join(f'{n} {s}' for s, n in sorted(reads['counts'].items()))}) and {reads['events']:,} job "
            f"events, ANALYZEd after the bulk insert; a status read asks for a random job of the {args.jobs}",
            f"- load generator: its own process, {args.clients} clients on {args.clients} keep-alive connections "
            f"({'asyncio streams' if args.client == 'raw' else 'one httpx.AsyncClient'}); per row {args.warmup:g} s "
            f"warm-up, then {args.duration:g} s recorded; latency = request sent (paced: scheduled) to JSON parsed, "
            f"on the client; **closed** = each client sends its next request as soon as the previous one answered "
            f"(the server saturated), **paced** = each client sends one request every {args.poll_interval:g} s "
            f"(offered {args.clients / args.poll_interval:.0f} req/s)",
            "- CPU ms/req: CPU time of the `serve` processes, and of all Postgres server processes (other users' "
            "queries included), during the row, divided by the requests answered",
            "", "| API processes | load | endpoint | requests/s | p50 ms | p90 ms | p99 ms | max ms | errors "
                "| serve CPU ms/req | Postgres CPU ms/req |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for processes, run in reads["runs"].items():
            for mode, rounds in run.items():
                for k, (target, r) in ((k, row) for k, rows in enumerate(rounds, 1) for row in rows.items()):
                    load = f"closed, round {k}" if mode == "closed" else f"paced {args.poll_interval:g} s"
                    lines.append(
                        f"| {processes} | {load} | {ENDPOINTS[target]} | {fmt(r['throughput'])} | {fmt(r['p50_ms'])} | "
                        f"{fmt(r['p90_ms'])} | {fmt(r['p99_ms'])} | {fmt(r['max_ms'])} | {sum(r['errors'].values())} | "
                        f"{fmt(r['server_cpu_ms'], 2)} | {fmt(r['postgres_cpu_ms'], 2)} |")
        lines.append("")
        for processes, run in reads["runs"].items():
            where = f"{processes} API process{'es' if processes > 1 else ''}"
            for paced in run["paced"]:
                p99 = paced["status"]["p99_ms"]
                checks.append(f"{'PASS' if p99 < TARGET_STATUS_P99_MS else 'FAIL'}: status p99 {p99:.1f} ms < "
                              f"{TARGET_STATUS_P99_MS:.0f} ms with {args.clients} clients polling every "
                              f"{args.poll_interval:g} s ({where})")
            closed = run["closed"]
            p99s = [rows["status"]["p99_ms"] for rows in closed]
            p99 = statistics.median(p99s)
            checks.append(f"{'PASS' if p99 < TARGET_STATUS_P99_MS else 'FAIL'}: status p99 {p99:.1f} ms < "
                          f"{TARGET_STATUS_P99_MS:.0f} ms with {args.clients} clients in a closed loop (median of "
                          f"{len(p99s)} rounds: {', '.join(f'{x:.1f}' for x in p99s)}; {where})")
            ratios = [rows["status"]["throughput"] / rows["healthz"]["throughput"] for rows in closed]
            ratio = statistics.median(ratios)
            checks.append(f"{'PASS' if ratio >= TARGET_THROUGHPUT_RATIO else 'FAIL'}: status throughput = "
                          f"{ratio:.2f} × `/healthz`'s in the same round, ≥ {TARGET_THROUGHPUT_RATIO:g}× (median "
                          f"of {len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)}; {where})")
    if starts:
        lines += [
            f"- submit -> start: the job's `started_at` minus the time POST /v1/jobs returned (negative: the worker "
            f"claimed the job before the response reached the client); \"from sent\": minus the time the POST was "
            f"sent. {args.submissions} tiny jobs (stories260k, nsamples 4, seqlen 64, epochs 0, crr_k 1, a "
            f"{START_TEXT_CHARS}-character uploaded text for calibration and evaluation), one at a time, each awaited "
            f"to its end, after one uncounted warm-up job; shipped default settings (WKVQ_POLL_SECONDS 1); local = "
            f"`wkvq serve` with its in-process worker; celery = `wkvq serve` + one `wkvq worker` process + a private "
            f"redis-server; a fresh database each",
            "", "| dispatcher | jobs | median ms | mean ms | min ms | max ms | from sent: median ms "
                "| from sent: max ms | POST median ms | job run median s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in starts.items():
            lines.append(f"| {name} | {r['n']} | {fmt(r['median_ms'])} | {fmt(r['mean_ms'])} | {fmt(r['min_ms'])} | "
                         f"{fmt(r['max_ms'])} | {fmt(r['sent_median_ms'])} | {fmt(r['sent_max_ms'])} | "
                         f"{fmt(r['post_median_ms'])} | {fmt(r['run_median_s'], 2)} |")
        lines.append("")
        for name, r in starts.items():
            limit = TARGET_START_S[name]
            checks.append(f"{'PASS' if r['sent_max_ms'] < 1000 * limit else 'FAIL'}: submit->start {name}: at most "
                          f"{r['max_ms']:.1f} ms after POST returned, {r['sent_max_ms']:.1f} ms after it was sent "
                          f"(median {r['sent_median_ms']:.1f} ms), < {limit:g} s")
    lines += [f"- {c}" for c in checks]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0, help="recorded seconds per load row")
    parser.add_argument("--rounds", type=int, default=3,
                        help="closed-loop rounds (healthz, status, list each); checks use the median round")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds before each load row")
    parser.add_argument("--poll-interval", type=float, default=1.0,
                        help="paced rows: seconds between a client's requests (0: no paced rows)")
    parser.add_argument("--processes", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2],
                        help="API processes of `wkvq serve` (--processes) for the reads, one set of rows each: 1,2")
    parser.add_argument("--client", choices=("raw", "httpx"), default="raw",
                        help="load generator's HTTP client: keep-alive asyncio streams, or one httpx.AsyncClient")
    parser.add_argument("--submissions", type=int, default=10)
    parser.add_argument("--skip", choices=("reads", "starts"), action="append", default=[])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-load", type=float, default=None,
                        help="first wait (polling every 30 s, up to --max-wait s) until the 1-min load average is "
                             "below this")
    parser.add_argument("--max-wait", type=float, default=1200.0)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", dest="results", action="store_const", const=None, help="do not append results")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv[:1] == ["load"]:
        load_main(argv[1:])
        return
    args = parse_args(argv)
    if args.max_load:
        wait_for_quiet(args.max_load, args.max_wait)
    started, t = dt.datetime.now(dt.timezone.utc), time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="wkvq-api-load-") as tmp:
        workdir = Path(tmp)
        reads = None
        if "reads" not in args.skip:
            log("reads")
            reads = read_scenarios(args, workdir)
        starts = {}
        if "starts" not in args.skip:
            for dispatcher in ("local", "celery"):
                log(f"submit -> start, {dispatcher}")
                starts[dispatcher] = submit_to_start(dispatcher, args, workdir)
    text = report(args, reads, starts, started, time.monotonic() - t, (load_before, os.getloadavg()[0]))
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)
        log(f"appended to {args.results}")


if __name__ == "__main__":
    main(sys.argv[1:])
