from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from ..core.db import Base, UTCDateTime, utcnow


class Worker(Base):
    """A worker process announcing itself: online while `last_seen_at` is recent."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid:label
    hostname: Mapped[str] = mapped_column(String(200))
    gpu_classes: Mapped[list[Any]] = mapped_column(JSON)
    device: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    current_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
