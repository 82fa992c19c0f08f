"""Real service processes for end-to-end tests: `wkvq serve`, `wkvq worker`, a private redis-server."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[2]


def _port_candidates() -> Iterator[int]:
    """Ports below the kernel's ephemeral range, where no outgoing connection or bind(0) takes one between
    `free_port()` and the server's bind; each pytest-xdist worker draws from its own slice, from a random start (two
    test runs on one machine rarely meet)."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        ephemeral_low = 32768  # Linux's default
    ports = range(10000, ephemeral_low)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    mine = ports[worker * len(ports) // workers:(worker + 1) * len(ports) // workers]
    start = random.randrange(len(mine))
    return itertools.cycle(itertools.chain(mine[start:], mine[:start]))


_ports = _port_candidates()


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that nothing listens on, not handed out before by this process (unless it wrapped around)."""
    for port in itertools.islice(_ports, 1000):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise AssertionError("no free loopback port in 1000 tries")


def service_env(db_url: str, store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WKVQ_")}
    return env | {
        "WKVQ_DATABASE_URL": db_url, "WKVQ_STORAGE_URL": str(store), "WKVQ_LEASE_SECONDS": "6",
        "WKVQ_HEARTBEAT_SECONDS": "1", "WKVQ_REAPER_SECONDS": "1", "WKVQ_POLL_SECONDS": "0.2", "WKVQ_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
        "WKVQ_KEEP_CHECKPOINTS": "true",  # resume tests read them after success
    } | extra


def wkvq(env: dict[str, str], *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def admin_key(env: dict[str, str], cwd: Path, team: str) -> str:
    wkvq(env, "admin", "create-team", team, cwd=cwd)  # may already exist
    result = wkvq(env, "admin", "create-key", team, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


class Process:
    """A child process with its output in a log file, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with open(log, "ab") as f:
            self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()


def start_server(env: dict[str, str], cwd: Path, *extra: str) -> tuple[Process, str]:
    port = free_port()
    server = Process([sys.executable, "-m", "worker.cli", "serve", "--port", str(port), *extra], env, cwd,
                     cwd / f"serve-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.popen.poll() is None, server.output()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"server not ready:\n{server.output()}")


def start_worker(env: dict[str, str], cwd: Path, name: str, *extra: str) -> Process:
    return Process([sys.executable, "-m", "worker.cli", "worker", *extra], env, cwd, cwd / f"worker-{name}.log")


class RedisServer:
    """A redis-server owned by the test, on a free port, keeping nothing on disk; `restart()` keeps the port."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        self.start()

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.popen = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(self.workdir)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(timeout=10)

    def restart(self, down_seconds: float) -> None:
        """Stop (losing every queued message: nothing is kept on disk), stay down a while, start again."""
        self.stop()
        time.sleep(down_seconds)
        self.start()
