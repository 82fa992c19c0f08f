"""Dashboard sign-ins: an API key is exchanged once for an opaque random token, kept in the browser's cookie; the
database holds only its sha256, with the team, the key and an expiry. Signing out revokes the token, and a revoked
key ends its sessions, so a copied cookie stops working with either."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from ..core.db import utcnow
from ..core.errors import Unauthorized
from ..models import ApiKey, DashboardSession, Team
from ..teams.service import check_key, key_prefix

SESSION_SECONDS = 7 * 24 * 3600


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def start_session(session: Session, key: str) -> str:
    """A new session token for a valid, unrevoked API key (401 otherwise); expired sessions are dropped."""
    found = session.scalar(select(ApiKey).where(ApiKey.prefix == key_prefix(key)))
    check_key(key, found)
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at < now))
    session.add(DashboardSession(token_hash=_hash(token), team_id=found.team_id, api_key_id=found.id,
                                 expires_at=now + timedelta(seconds=SESSION_SECONDS)))
    session.commit()
    return token


def session_team(session: Session, token: str | None) -> Team:
    """The team of a live session: not expired, not signed out, its key not revoked; 401 otherwise."""
    if not token:
        raise Unauthorized("not signed in")
    team = session.scalar(
        select(Team).join(DashboardSession, DashboardSession.team_id == Team.id)
        .join(ApiKey, ApiKey.id == DashboardSession.api_key_id)
        .where(DashboardSession.token_hash == _hash(token), DashboardSession.revoked_at.is_(None),
               DashboardSession.expires_at > utcnow(), ApiKey.revoked_at.is_(None)))
    if team is None:
        raise Unauthorized("signed out, expired, or its API key was revoked")
    return team


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(update(DashboardSession).where(DashboardSession.token_hash == _hash(token),
                                                       DashboardSession.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
        session.commit()
