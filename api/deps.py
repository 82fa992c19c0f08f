"""Request dependencies as `Annotated` aliases."""

from __future__ import annotations

import contextlib
from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .core.context import ServiceContext
from .models import Team
from .teams.service import team_service

bearer = HTTPBearer(auto_error=False, description="a team API key: `Authorization: Bearer wkvq_...`")


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    session = ctx.session()
    try:
        yield session
    finally:
        with contextlib.suppress(DBAPIError):  # the database went away: the response (503) is already out
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_team(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Team:
    return team_service.authenticate(session, credentials.credentials if credentials else None)


CurrentTeam = Annotated[Team, Depends(get_team)]
