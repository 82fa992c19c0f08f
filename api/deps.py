"""Request dependencies as `Annotated` aliases."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, AsyncIterator, TypeVar

from fastapi import Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from .core.context import ServiceContext
from .models import Team
from .teams.service import team_service

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # carry no body to read, change nothing
bearer = HTTPBearer(auto_error=False, description="a team API key: `Authorization: Bearer wkvq_...`")


async def get_context(request: Request) -> ServiceContext:  # async: no thread-pool hop for an attribute read
    return request.app.state.ctx


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def _close(session: Session) -> None:
    with contextlib.suppress(DBAPIError):  # the database went away: the response (503) is already out
        session.close()


async def get_session(request: Request, ctx: ContextDep) -> AsyncIterator[Session]:
    """The request's session: autocommit for GET and HEAD, which only read (`ServiceContext.read_session`).
    Async, so that creating it and closing it cost no thread-pool hop: neither does I/O once the request has
    `released` its connection; a session still in a transaction (an error on the way, a handler that did not
    release) is closed in a worker thread, since its ROLLBACK is a database round trip."""
    session = ctx.read_session() if request.method in ("GET", "HEAD") else ctx.session()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(_close, session)
        else:
            _close(session)


SessionDep = Annotated[Session, Depends(get_session)]
T = TypeVar("T")


def released(session: Session, result: T) -> T:
    """Ends the request's transaction, so that its pooled connection goes back to the pool, and returns `result`.

    FastAPI runs each sync dependency, the sync endpoint and the validation of its return value in separate
    thread-pool hops. A request must not keep a connection while it waits for its next thread: under load every
    pooled connection ends up held by requests queued for a thread while every thread waits for a connection, and
    the process stalls until the pool timeout (30 s) fails them. So authentication and each endpoint release the
    connection before handing back to the event loop (the next query of the request checks one out again). The
    session is closed, not committed: nothing is written here (writers commit themselves), and the ORM objects it
    loaded stay readable, detached.
    """
    session.close()
    return result


async def get_api_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str | None:
    """The bearer token as sent, not yet checked (`team_service.authenticate` or a query that checks it)."""
    return credentials.credentials if credentials else None


ApiKeyDep = Annotated[str | None, Depends(get_api_key)]


def get_team(session: SessionDep, key: ApiKeyDep) -> Team:
    return released(session, team_service.authenticate(session, key))


CurrentTeam = Annotated[Team, Depends(get_team)]


class AuthenticatedFirst(APIRoute):
    """A route whose requests that may carry a body (any method but GET, HEAD and OPTIONS) are authenticated before
    the body is read: an unauthenticated upload or JSON body is answered 401 without being received or parsed.
    The endpoint's own team dependency then authenticates again (one indexed query; writes are rare)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            if request.method not in SAFE_METHODS:
                credentials = await bearer(request)
                await run_in_threadpool(authenticate_key, request.app.state.ctx,
                                        credentials.credentials if credentials else None)
            return await handler(request)

        return route


def authenticate_key(ctx: ServiceContext, key: str | None) -> Team:
    """The team of `key` (401 otherwise), in a read session of its own: for checks made before a request's
    dependencies run."""
    with ctx.read_session() as session:
        return team_service.authenticate(session, key)
