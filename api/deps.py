"""Request dependencies as `Annotated` aliases."""

from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from .core.context import ServiceContext
from .models import Team
from .teams.service import team_service

bearer = HTTPBearer(auto_error=False, description="a team API key: `Authorization: Bearer wkvq_...`")


def get_context(request: Request) -> ServiceContext:
    return request.app.state.ctx


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    with ctx.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_team(session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Team:
    return team_service.authenticate(session, credentials.credentials if credentials else None)


CurrentTeam = Annotated[Team, Depends(get_team)]
