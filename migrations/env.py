"""Alembic environment: the ORM metadata of `api.models`, on SQLite or Postgres.

The URL is `sqlalchemy.url` when set (alembic.ini or api.core.migrate), else `Settings().DATABASE_URL`.
A caller may pass an open connection in `config.attributes["connection"]` (tests, the service at startup).
"""

from __future__ import annotations

from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

import api.models
from api.core.config import Settings
from api.core.db import UTCDateTime

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = api.models.Base.metadata


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or Settings().DATABASE_URL


def render_item(type_, obj, autogen_context):
    """Render the UTCDateTime decorator as the plain column type it stores, so revisions don't import api code."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


OPTIONS = dict(target_metadata=target_metadata, render_as_batch=True, compare_type=True, render_item=render_item)


def run_migrations_offline() -> None:
    context.configure(url=database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"}, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection) -> None:
    context.configure(connection=connection, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = make_url(database_url())
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
