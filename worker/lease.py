"""A worker's claim on a job, and the fence every later write goes through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from api.jobs import states


class LeaseLost(Exception):
    """Another worker owns the job now; this one must stop without writing."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    token: str
    owner: str


def fence(session: Session, lease: Lease, *conditions: ColumnElement[bool], **values: Any) -> bool:
    """In the caller's transaction: update the job only while this lease still holds it (False otherwise), and only
    where `conditions` hold too. On Postgres the row stays locked until commit, so whatever else the transaction
    writes is fenced too."""
    return states.fenced(session, lease.job_id, lease.token, *conditions, **values)
