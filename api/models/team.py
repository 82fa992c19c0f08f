from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Float, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from ..core.db import Base, Timestamped, UTCDateTime, new_id


class Team(Timestamped, Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # fair share of the pool (`worker.fair_share`): running jobs are shared in proportion to weight, at most
    # max_running at once (None: no cap); teams with equal shares take turns by last_claim_at
    weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    max_running: Mapped[int | None] = mapped_column(Integer, nullable=True)
    storage_quota_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # None: the service default
    # submission limits (`api.teams.usage`); None: the service default
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_submissions_per_minute: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_claim_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
