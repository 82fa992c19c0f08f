"""Service fixtures: a migrated database (SQLite file or a throwaway Postgres database), the app, teams and keys."""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import pytest
import uvicorn
from fastapi.testclient import TestClient

from api.core.config import Settings
from api.core.context import ServiceContext
from api.core.errors import NotFound
from api.core.migrate import upgrade
from api.main import create_app
from api.teams.service import team_service
from tests.conftest import fresh_pg_database

from .processes import free_port

# A job small enough for the CPU: the shipped tiny model, 4 windows of 64 tokens, one epoch, 5 blocks.
TINY_JOB = {
    "model": {"source": "local", "name": "stories260k"},
    "calibration": {"source": "builtin", "name": "tinystories"},
    "config": {"group_size": -1, "nsamples": 4, "seqlen": 64, "epochs": 1, "crr_k": 2},
}


def service_settings(db_url: str, store: str, **overrides) -> Settings:
    values = dict(DATABASE_URL=db_url, STORAGE_URL=store, LEASE_SECONDS=6, HEARTBEAT_SECONDS=1, REAPER_SECONDS=1,
                  POLL_SECONDS=0.2, MIN_UPLOAD_CHARS=200, MAX_UPLOAD_BYTES=64 * 1024, DEVICE="cpu",
                  KEEP_CHECKPOINTS=True)  # resume tests read them after success
    return Settings(_env_file=None, **(values | overrides))


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory) -> Path:
    """A SQLite database file migrated once per session; each test's database starts as a copy."""
    path = tmp_path_factory.mktemp("migrated") / "wkvq.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def migrated_postgres() -> str:
    """A Postgres database migrated once per session (nothing stays connected): each test's database is a copy."""
    with fresh_pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A database of each kind, migrated to head (a copy: migrating each test's database cost ~0.5 s a test)."""
    if request.param == "sqlite":
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), tmp_path / "wkvq.db")
        yield f"sqlite:///{tmp_path}/wkvq.db"
        return
    with fresh_pg_database(template=request.getfixturevalue("migrated_postgres")) as url:
        yield url


@pytest.fixture
def settings(db_url, tmp_path) -> Settings:
    return service_settings(db_url, str(tmp_path / "store"))


@pytest.fixture
def service(settings) -> ServiceContext:
    upgrade(settings.DATABASE_URL)
    ctx = ServiceContext.from_settings(settings)
    yield ctx
    ctx.close()


@pytest.fixture
def client(service) -> TestClient:
    with TestClient(create_app(service)) as c:
        yield c


@contextmanager
def served(service: ServiceContext, host: str = "127.0.0.1") -> Iterator[str]:
    """The app of `service` served by uvicorn on a free port of `host`, in this process. Yields the base URL."""
    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def live_server(service) -> str:
    """The app of `service` served by uvicorn on a free loopback port, in this process: real HTTP, with the
    fixtures' database and store. Yields the base URL."""
    with served(service) as base:
        yield base


T = TypeVar("T")


def at_once(requests: list[Callable[[], T]]) -> list[T]:
    """Calls each of `requests` from its own thread, released together; their results, in order."""
    barrier, results = threading.Barrier(len(requests)), [None] * len(requests)

    def call(index: int, request: Callable[[], T]) -> None:
        barrier.wait()
        results[index] = request()

    threads = [threading.Thread(target=call, args=item) for item in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(not thread.is_alive() for thread in threads), "a request did not return within 120 s"
    return results


def team_key(ctx: ServiceContext, team: str) -> str:
    """A fresh API key of `team`, created (once) in `ctx`'s database."""
    with ctx.session() as session:
        try:
            team_service.get_team(session, name=team)
        except NotFound:
            team_service.create_team(session, name=team)
        return team_service.create_key(session, team_name=team).key


@pytest.fixture
def team_headers(service) -> Callable[[str], dict[str, str]]:
    """team_headers("a") creates team a (once) and returns Authorization headers with a fresh key."""
    return lambda name: {"Authorization": f"Bearer {team_key(service, name)}"}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (`item.rep_call`), so that a fixture can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
