from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, ForeignKey
from sqlalchemy.orm import Mapped, mapped_column

from ..core.db import Base, Timestamped


class JobMetrics(Timestamped, Base):
    """The metrics a finished job reported (perplexity per mode, KV bytes/token, calibration time and memory)."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
