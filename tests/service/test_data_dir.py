"""One data directory for the service's state: `WKVQ_DATA_DIR` / `--data-dir` give the default database and store,
so that `wkvq admin` run from any directory reaches the database of the `wkvq serve` it is told about."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from api.core.config import Settings
from tests.conftest import fresh_pg_database

from .processes import service_env, start_server, wkvq


@pytest.fixture
def no_wkvq_env(monkeypatch):
    for name in [k for k in os.environ if k.startswith("WKVQ_")]:
        monkeypatch.delenv(name)


def data_dir_env(**extra: str) -> dict[str, str]:
    """The test service environment without WKVQ_DATABASE_URL / WKVQ_STORAGE_URL: both come from the data dir."""
    urls = ("WKVQ_DATABASE_URL", "WKVQ_STORAGE_URL")
    return {k: v for k, v in service_env("", Path()).items() if k not in urls} | extra


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


# ----------------------------------------------------------------------------------------------------- settings


def test_state_is_under_the_data_dir(no_wkvq_env, tmp_path, monkeypatch):
    settings = Settings(_env_file=None, DATA_DIR=tmp_path / "state")
    assert settings.DATABASE_URL == f"sqlite:///{tmp_path}/state/wkvq.db"
    assert settings.STORAGE_URL == f"file://{tmp_path}/state/store"

    monkeypatch.chdir(tmp_path)  # relative: to the working directory, made absolute at once
    assert Settings(_env_file=None).DATABASE_URL == f"sqlite:///{tmp_path}/wkvq-data/wkvq.db"
    monkeypatch.setenv("WKVQ_DATA_DIR", "srv")
    settings = Settings(_env_file=None)
    assert settings.DATA_DIR == tmp_path / "srv" and settings.STORAGE_URL == f"file://{tmp_path}/srv/store"
    assert Settings(_env_file=None, DATA_DIR=tmp_path / "opt").DATA_DIR == tmp_path / "opt"  # the option wins


def test_explicit_urls_win_over_the_data_dir(no_wkvq_env, tmp_path, monkeypatch):
    settings = Settings(_env_file=None, DATA_DIR=tmp_path, DATABASE_URL="postgresql://u@db:5432/wkvq",
                        STORAGE_URL="s3://bucket/prefix")
    assert settings.DATABASE_URL == "postgresql+psycopg://u@db:5432/wkvq" and settings.STORAGE_URL == "s3://bucket/prefix"
    monkeypatch.setenv("WKVQ_DATABASE_URL", f"sqlite:///{tmp_path}/elsewhere.db")
    settings = Settings(_env_file=None, DATA_DIR=tmp_path / "state")
    assert settings.DATABASE_URL == f"sqlite:///{tmp_path}/elsewhere.db"
    assert settings.STORAGE_URL == f"file://{tmp_path}/state/store"  # not set: still under the data dir


def test_database_display_masks_the_password(no_wkvq_env):
    settings = Settings(_env_file=None, DATABASE_URL="postgresql://wkvq:s3cr%40t@db:5432/wkvq")
    assert settings.database_display == "postgresql+psycopg://wkvq:***@db:5432/wkvq"


def test_a_bad_database_url_is_refused_without_showing_it(no_wkvq_env):
    with pytest.raises(ValueError) as refused:
        Settings(_env_file=None, DATABASE_URL="postgresql://wkvq:s3cret@db:port/wkvq")
    assert "not a database URL" in str(refused.value) and "s3cret" not in str(refused.value)


# ------------------------------------------------------------------------------------------------ the commands


def test_admin_from_another_directory_reaches_the_servers_database(tmp_path):
    """serve --data-dir X from one directory; admin with --data-dir X (or WKVQ_DATA_DIR=X) from two others."""
    state, a, b, c = (tmp_path / name for name in ("state", "a", "b", "c"))
    for cwd in (a, b, c):
        cwd.mkdir()
    env = data_dir_env()
    database_line = f"database: sqlite:///{state}/wkvq.db"
    server, base = start_server(env, c, "--data-dir", str(state))
    try:
        ok(wkvq(env, "admin", "create-team", "vision", "--data-dir", "../state", cwd=a))  # relative to a
        created = ok(wkvq(env, "admin", "create-key", "vision", "--data-dir", str(state), cwd=a))
        assert database_line in created.stderr.splitlines()
        key = created.stdout.strip()
        assert httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        listing = ok(wkvq(env | {"WKVQ_DATA_DIR": str(state), "COLUMNS": "200"}, "admin", "list-keys", cwd=b))
        assert database_line in listing.stderr.splitlines()
        assert key.split("_")[1] in listing.stdout and "vision" in listing.stdout
    finally:
        server.stop()
    assert database_line in server.output()  # serve logs the database it uses
    assert (state / "wkvq.db").is_file() and (state / "store").is_dir()
    assert not any((cwd / "wkvq-data").exists() for cwd in (a, b, c))


def test_admin_on_postgres_prints_the_database_without_its_password(tmp_path):
    with fresh_pg_database() as pg_url:
        url = make_url(pg_url)
        password = url.password or "s3cret"  # the local test server trusts any password
        env = data_dir_env(WKVQ_DATABASE_URL=url.set(password=password).render_as_string(hide_password=False))
        result = ok(wkvq(env, "admin", "list-keys", "--data-dir", str(tmp_path), cwd=tmp_path))
    assert f"database: {url.set(password=password).render_as_string(hide_password=True)}" in result.stderr
    assert password not in result.stdout + result.stderr
    assert not (tmp_path / "wkvq.db").exists()  # an explicit WKVQ_DATABASE_URL wins over --data-dir


def test_admin_with_an_unreachable_database_fails_cleanly(tmp_path):
    env = data_dir_env(WKVQ_DATABASE_URL="postgresql://wkvq:s3cret@127.0.0.1:1/wkvq")
    result = wkvq(env, "admin", "list-keys", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "s3cret" not in result.stdout + result.stderr
    assert "error: cannot open the database postgresql+psycopg://wkvq:***@127.0.0.1:1/wkvq" in result.stdout
