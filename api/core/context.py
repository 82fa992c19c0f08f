"""Process resources built once from settings: database engine and sessions, artifact store, dispatcher."""

from __future__ import annotations

from dataclasses import dataclass, field

from anyio import CapacityLimiter
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .db import make_engine, make_sessionmaker
from .dispatch import JobDispatcher, make_dispatcher
from .storage import ArtifactStore


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker
    store: ArtifactStore
    dispatcher: JobDispatcher = field(repr=False)
    read_engine: Engine = field(init=False, repr=False)
    read_sessions: sessionmaker = field(init=False, repr=False)
    read_limiter: CapacityLimiter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.read_engine = self.engine.execution_options(isolation_level="AUTOCOMMIT")  # the same pool
        self.read_sessions = make_sessionmaker(self.read_engine)
        self.read_limiter = CapacityLimiter(self.settings.READ_THREADS)

    @classmethod
    def from_settings(cls, settings: Settings, dispatcher: JobDispatcher | None = None) -> ServiceContext:
        engine = make_engine(settings.DATABASE_URL, settings.DB_POOL_SIZE, settings.DB_MAX_OVERFLOW)
        return cls(settings, engine, make_sessionmaker(engine), ArtifactStore(settings.STORAGE_URL, settings.STORAGE_OPTIONS),
                   dispatcher or make_dispatcher(settings))

    def session(self) -> Session:
        return self.sessions()

    def read_session(self) -> Session:
        """A session for reads only, on `read_engine` (autocommit). At Postgres' READ COMMITTED every statement takes
        its own snapshot anyway, so a transaction gives a read nothing; it costs a BEGIN and a ROLLBACK round trip
        per connection checkout."""
        return self.read_sessions()

    def close(self) -> None:
        self.engine.dispose()
