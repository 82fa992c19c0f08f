"""`wkvq admin` and `wkvq worker` as an operator runs them: real processes on a SQLite database."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import create_engine, insert, select

from api.models import Team, Worker

from .processes import service_env, start_worker, wkvq


@pytest.fixture
def env(tmp_path):
    return service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store", COLUMNS="200")  # tables unwrapped


@pytest.mark.parametrize("name", ["[/bad]", "", "red\x1b[31mteam", "a b", "x" * 101])
def test_create_team_refuses_names_outside_the_pattern(env, tmp_path, name):
    result = wkvq(env, "admin", "create-team", name, cwd=tmp_path)
    assert result.returncode == 2 and "is not valid" in result.stdout, result.stdout + result.stderr
    assert "\x1b" not in result.stdout and "Traceback" not in result.stderr
    listed = wkvq(env, "admin", "list-teams", cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr


def test_names_stored_before_the_check_are_listed_escaped(env, tmp_path):
    assert wkvq(env, "admin", "create-team", "ok-team", cwd=tmp_path).returncode == 0
    engine = create_engine(env["WKVQ_DATABASE_URL"])
    with engine.begin() as conn:  # as an older version let them in
        conn.execute(insert(Team).values(id="1" * 32, name="[/bad]"))
        conn.execute(insert(Team).values(id="2" * 32, name="red\x1b[31mteam"))
    engine.dispose()
    for command in (["list-teams"], ["set-team", "[/bad]", "--weight", "2"], ["create-key", "red\x1b[31mteam"],
                    ["list-keys"]):
        result = wkvq(env, "admin", *command, "--data-dir", str(tmp_path), cwd=tmp_path)
        assert result.returncode == 0, (command, result.stdout + result.stderr)
        assert "\x1b" not in result.stdout, command
    listed = wkvq(env, "admin", "list-teams", cwd=tmp_path).stdout
    assert "[/bad]" in listed and "red\\x1b[31mteam" in listed and "ok-team" in listed


@pytest.mark.parametrize("option, value", [("--storage-quota-gb", "1e30"), ("--storage-quota-gb", "inf"),
                                           ("--storage-quota-gb", "nan"), ("--storage-quota-gb", "-1"),
                                           ("--max-running", "100000000000"), ("--max-running", "-1")])
def test_set_team_numbers_out_of_range_give_a_readable_error(env, tmp_path, option, value):
    assert wkvq(env, "admin", "create-team", "a", cwd=tmp_path).returncode == 0
    result = wkvq(env, "admin", "set-team", "a", option, value, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert option in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def worker_ids(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Worker.id)))


def test_a_cpu_worker_is_named_cpu(env, tmp_path):
    assert wkvq(env, "migrate", cwd=tmp_path).returncode == 0
    worker = start_worker(env, tmp_path, "cpu")
    engine = create_engine(env["WKVQ_DATABASE_URL"])
    try:
        deadline = time.monotonic() + 120
        while not (ids := worker_ids(engine)):
            assert worker.popen.poll() is None and time.monotonic() < deadline, worker.output()
            time.sleep(0.2)
    finally:
        worker.stop()
        engine.dispose()
    assert len(ids) == 1 and ids[0].endswith(":default:cpu"), ids
