"""The Alembic migrations build the schema of `api.models` on SQLite and PostgreSQL, and can be undone."""

from datetime import datetime, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import fresh_pg_database
from sqlalchemy import create_engine, inspect, pool, select

from api.core.db import Base, make_engine, make_sessionmaker
from api.core.migrate import alembic_config, downgrade, upgrade
from api.models import Job, JobEvent, Team

TABLES = {"teams", "api_keys", "datasets", "jobs", "artifacts", "block_checkpoints", "job_events", "job_metrics",
          "workers", "dashboard_sessions"}


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """An empty database of each kind (Postgres: a throwaway database, so `pg_url` stays empty for other tests)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        with fresh_pg_database() as url:
            yield url


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_single_head():
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_upgrade_downgrade_upgrade(db_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts are found through the package, not the working directory
    upgrade(db_url)
    assert _tables(db_url) == TABLES | {"alembic_version"}
    downgrade(db_url, "base")
    assert _tables(db_url) == {"alembic_version"}
    upgrade(db_url, "head")
    assert _tables(db_url) == TABLES | {"alembic_version"}


def test_models_match_migrations(db_url):
    upgrade(db_url)
    engine = create_engine(db_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_orm_round_trip_on_migrated_schema(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    try:
        Session = make_sessionmaker(engine)
        with Session.begin() as session:
            team = Team(name="t")
            session.add(team)
            session.flush()
            job = Job(team_id=team.id, spec={"bits": 4, "modes": ["w4", "kv4"]}, gpu_class="default",
                      max_attempts=3, request_hash="0" * 64)
            session.add(job)
            session.flush()
            session.add(JobEvent(job_id=job.id, kind="queued"))
            job_id = job.id
        with Session() as session:
            job = session.get(Job, job_id)
            assert job.spec == {"bits": 4, "modes": ["w4", "kv4"]}
            assert job.cancel_requested is False and job.status == "queued"
            assert job.created_at.tzinfo == timezone.utc
            assert abs(datetime.now(timezone.utc) - job.created_at).total_seconds() < 60
        with Session.begin() as session:  # ON DELETE CASCADE on both backends (SQLite: PRAGMA foreign_keys)
            session.delete(session.get(Team, team.id))
        with Session() as session:
            assert session.scalars(select(JobEvent)).all() == []
            assert session.get(Job, job_id) is None
    finally:
        engine.dispose()
