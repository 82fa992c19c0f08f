"""Teams and their API keys. A key is `wkvq_<prefix>_<secret>`; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Row, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..core.db import utcnow
from ..core.errors import Conflict, InvalidField, NotFound, Unauthorized
from ..models import ApiKey, Team

KEY_PREFIX = "wkvq"
TEAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # printed by the admin CLI and the dashboard: no markup
KEY_ID = re.compile(r"[0-9a-f]{1,32}")  # what create_key puts between the underscores (hex), so nothing else is queried
# run on every request: built once (building and cache-keying a statement costs more CPU than running it)
_KEY_AND_TEAM = (select(ApiKey, Team).join(Team, Team.id == ApiKey.team_id)
                 .where(ApiKey.prefix == bindparam("prefix")))


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str | None) -> str:
    """The prefix by which a key is looked up; 401 for a malformed key."""
    parts = (key or "").split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not KEY_ID.fullmatch(parts[1]):
        raise Unauthorized("missing or malformed API key (expected 'Authorization: Bearer wkvq_...')")
    return parts[1]


def check_key(key: str, found: ApiKey | Row | None) -> None:
    """401 unless `found` (the row looked up by the key's prefix, with `key_hash` and `revoked_at`) is this key and
    is not revoked. The hash comparison is constant-time."""
    if found is None or not hmac.compare_digest(found.key_hash, _hash(key)):
        raise Unauthorized("invalid API key")
    if found.revoked_at is not None:
        raise Unauthorized("API key revoked")


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once, never stored
    prefix: str
    team: str


class TeamService:
    def create_team(self, session: Session, *, name: str) -> Team:
        if not TEAM_NAME.fullmatch(name):
            raise InvalidField(("name",), f"team name {name!r} is not valid: 1 to 100 letters, digits, '.', '_' or "
                                          "'-', starting with a letter or digit")
        team = Team(name=name)
        session.add(team)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise Conflict(f"team {name!r} already exists") from None
        return team

    def get_team(self, session: Session, *, name: str) -> Team:
        team = session.scalar(select(Team).where(Team.name == name))
        if team is None:
            raise NotFound(f"no team named {name!r}")
        return team

    def configure(self, session: Session, *, name: str, weight: float | None = None, max_running: int | None = None,
                  storage_quota_bytes: int | None = None, max_queued: int | None = None,
                  max_submissions_per_minute: int | None = None) -> Team:
        """Sets the given fair-share, quota and submission-limit settings of a team (None: unchanged); a max_running
        of 0 clears it (no cap), a storage_quota_bytes, max_queued or max_submissions_per_minute of 0 the team's own
        value (the service default applies)."""
        team = self.get_team(session, name=name)
        if weight is not None:
            if not 0 < weight < float("inf"):
                raise InvalidField(("weight",), "must be greater than 0 (and finite)")
            team.weight = weight
        for field, value in (("max_running", max_running), ("storage_quota_bytes", storage_quota_bytes),
                             ("max_queued", max_queued), ("max_submissions_per_minute", max_submissions_per_minute)):
            if value is not None:
                if value < 0:
                    raise InvalidField((field,), "must be 0 (none) or more")
                setattr(team, field, value or None)
        session.commit()
        return team

    def list_teams(self, session: Session) -> list[Team]:
        return list(session.scalars(select(Team).order_by(Team.name)))

    def create_key(self, session: Session, *, team_name: str, name: str = "") -> IssuedKey:
        team = self.get_team(session, name=team_name)
        prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = f"{KEY_PREFIX}_{prefix}_{secret}"
        session.add(ApiKey(team_id=team.id, prefix=prefix, key_hash=_hash(key), name=name))
        session.commit()
        return IssuedKey(key, prefix, team.name)

    def revoke_key(self, session: Session, *, prefix: str) -> None:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is None:
            raise NotFound(f"no API key with prefix {prefix!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.commit()

    def list_keys(self, session: Session) -> list[tuple[ApiKey, Team]]:
        return list(session.execute(select(ApiKey, Team).join(Team).order_by(Team.name, ApiKey.created_at)).tuples())

    def authenticate(self, session: Session, key: str | None) -> Team:
        """The team of a valid, unrevoked key; 401 otherwise."""
        found = session.execute(_KEY_AND_TEAM, {"prefix": key_prefix(key)}).first()
        check_key(key, found.ApiKey if found else None)
        return found.Team


team_service = TeamService()
