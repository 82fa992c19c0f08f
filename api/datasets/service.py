"""Uploaded calibration texts: checked (size, UTF-8, length), stored, then recorded."""

from __future__ import annotations

from pathlib import PurePath

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..core.config import Settings
from ..core.db import new_id
from ..core.errors import Conflict, InvalidField, NotFound, PayloadTooLarge
from ..core.storage import ArtifactStore
from ..models import Dataset, Job, JobStatus, Team
from ..teams.usage import usage_service

LOC = ("body", "file")


def _safe_filename(name: str | None) -> str:
    base = PurePath((name or "upload.txt").replace("\\", "/")).name
    kept = "".join(c for c in base if c.isalnum() or c in "._- ").lstrip(". ")  # no "..", no hidden names
    return kept[:200] or "upload.txt"


class DatasetService:
    def create(self, session: Session, store: ArtifactStore, settings: Settings, *, team: Team, filename: str | None,
               data: bytes) -> Dataset:
        if len(data) > settings.MAX_UPLOAD_BYTES:
            raise PayloadTooLarge(f"upload is larger than {settings.MAX_UPLOAD_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidField(LOC, f"not UTF-8 text (invalid byte at offset {exc.start})") from None
        if len(text.strip()) < settings.MIN_UPLOAD_CHARS:
            raise InvalidField(LOC, f"calibration text too short: {len(text.strip())} characters, "
                                    f"at least {settings.MIN_UPLOAD_CHARS} needed")
        usage_service.check_upload(session, settings, team=team, size=len(data), lock=False)  # before it is stored
        dataset_id = new_id()
        stored = store.put_bytes(data, f"datasets/{team.id}/{dataset_id}.txt")
        try:  # again, with the row in one transaction: concurrent uploads are checked one after another
            usage_service.check_upload(session, settings, team=team, size=stored.size)
            row = Dataset(id=dataset_id, team_id=team.id, filename=_safe_filename(filename), uri=stored.uri,
                          sha256=stored.sha256, size=stored.size, chars=len(text))
            session.add(row)
            session.commit()
        except BaseException:
            session.rollback()
            store.delete(stored.uri)
            raise
        return row

    def get(self, session: Session, *, team: Team, dataset_id: str) -> Dataset:
        row = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.team_id == team.id))
        if row is None:
            raise NotFound(f"dataset {dataset_id} not found")
        return row

    def delete(self, session: Session, store: ArtifactStore, *, team: Team, dataset_id: str) -> None:
        dataset = self.get(session, team=team, dataset_id=dataset_id)
        active = session.execute(select(Job.id, Job.spec).where(
            Job.team_id == team.id, Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))).all()
        users = [job_id for job_id, spec in active
                 if dataset_id in ((spec.get(role) or {}).get("dataset_id") for role in ("calibration", "evaluation"))]
        if users:
            raise Conflict(f"dataset {dataset_id} is used by {len(users)} queued or running job(s) "
                           f"({', '.join(users[:3])}); cancel or delete them first")
        store.delete(dataset.uri)
        session.delete(dataset)
        session.commit()

    def list(self, session: Session, *, team: Team) -> list[Dataset]:
        return list(session.scalars(select(Dataset).where(Dataset.team_id == team.id).order_by(Dataset.created_at.desc())))


dataset_service = DatasetService()
