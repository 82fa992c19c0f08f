from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from ..core.db import Base, Timestamped, UTCDateTime, new_id


class Artifact(Timestamped, Base):
    """A downloadable output of a job: the quantized model as one tar file, and its target's export with its notes
    json (a llamacpp job: model.gguf; a vllm job: model-vllm.tar, the export's directory as one tar)."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    media_type: Mapped[str] = mapped_column(String(100))
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # stored bytes matched sha256
    unavailable: Mapped[str | None] = mapped_column(Text, nullable=True)  # why the stored object cannot be served
