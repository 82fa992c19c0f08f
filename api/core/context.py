"""Process resources built once from settings: database engine and sessions, artifact store, dispatcher."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    @classmethod
    def from_settings(cls, settings: Settings, dispatcher: JobDispatcher | None = None) -> ServiceContext:
        engine = make_engine(settings.DATABASE_URL)
        return cls(settings, engine, make_sessionmaker(engine), ArtifactStore(settings.STORAGE_URL, settings.STORAGE_OPTIONS),
                   dispatcher or make_dispatcher(settings))

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()
