from __future__ import annotations

import asyncio
import functools
from typing import Annotated, AsyncIterator

import anyio

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..deps import ApiKeyDep, ContextDep, CurrentTeam, SessionDep, released
from ..models import Job, JobStatus
from ..teams.service import team_service
from .download import ranged_download
from .schemas import ArtifactRead, JobCreate, JobEventRead, JobList, JobRead
from .service import job_service

router = APIRouter(prefix="/jobs", tags=["jobs"])


def owned_job(session: SessionDep, team: CurrentTeam, job_id: str) -> Job:
    """The team's job, looked up before a streaming response starts (a 404 cannot be sent once it has)."""
    return released(session, job_service.get(session, team=team, job_id=job_id))  # not held for the whole stream


@router.post("", response_model=JobRead, status_code=status.HTTP_201_CREATED,
             responses={200: {"model": JobRead, "description": "replayed: same Idempotency-Key and body"}})
def submit_job(ctx: ContextDep, session: SessionDep, team: CurrentTeam, body: JobCreate, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobRead:
    job, created = job_service.submit(ctx, session, team=team, body=body, idempotency_key=idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return released(session, job_service.read(session, job))


@router.get("", response_model=JobList)
async def list_jobs(ctx: ContextDep, key: ApiKeyDep, status: JobStatus | None = None,
                    gpu_class: Annotated[str | None, Query(max_length=64)] = None,
                    limit: Annotated[int, Query(ge=1, le=100)] = 20,
                    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> JobList:
    """Polled by dashboards: authentication and the page in one thread-pool hop."""
    def read() -> JobList:
        with ctx.read_session() as session:
            team = team_service.authenticate(session, key)
            jobs, count = job_service.list(session, team=team, status=status.value if status else None,
                                           gpu_class=gpu_class, limit=limit, offset=offset)
        return JobList(data=jobs, count=count)

    return await anyio.to_thread.run_sync(read, limiter=ctx.read_limiter)


@router.get("/{job_id}", response_model=JobRead)
async def get_job(ctx: ContextDep, key: ApiKeyDep, job_id: str) -> JobRead:
    """What clients poll: authentication and the read are one query, in one thread-pool hop."""
    read = functools.partial(job_service.status, ctx.read_engine, key=key, job_id=job_id)
    return await anyio.to_thread.run_sync(read, limiter=ctx.read_limiter)


@router.post("/{job_id}/cancel", response_model=JobRead)
def cancel_job(session: SessionDep, team: CurrentTeam, job_id: str) -> JobRead:
    return released(session, job_service.read(session, job_service.cancel(session, team=team, job_id=job_id)))


@router.post("/{job_id}/retry", response_model=JobRead)
def retry_job(ctx: ContextDep, session: SessionDep, team: CurrentTeam, job_id: str) -> JobRead:
    return released(session, job_service.read(session, job_service.retry(ctx, session, team=team, job_id=job_id)))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"description": "text/event-stream of JobEventRead; ends when the job has ended"}})
async def job_events(ctx: ContextDep, job: Annotated[Job, Depends(owned_job)],
                     last_event_id: Annotated[int, Header(ge=0, le=2**62)] = 0) -> AsyncIterator[ServerSentEvent]:
    after, poll = last_event_id, ctx.settings.POLL_SECONDS

    def fetch():
        with ctx.session() as s:
            return job_service.events(s, job_id=job.id, after=after), JobStatus(s.get(type(job), job.id).status)

    while True:
        events, state = await run_in_threadpool(fetch)
        for event in events:
            after = event.id
            yield ServerSentEvent(data=JobEventRead.model_validate(event).model_dump(mode="json"), event=event.kind,
                                  id=str(event.id))
        if not events and state.terminal:
            yield ServerSentEvent(data={"status": state.value}, event="end")
            return
        if not events:
            await asyncio.sleep(poll)


@router.get("/{job_id}/metrics")
def job_metrics(session: SessionDep, team: CurrentTeam, job_id: str) -> dict:
    return released(session, job_service.metrics(session, team=team, job_id=job_id))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactRead])
def job_artifacts(request: Request, session: SessionDep, team: CurrentTeam, job_id: str) -> list[ArtifactRead]:
    return released(session, [
        ArtifactRead(name=a.name, size=a.size, sha256=a.sha256, media_type=a.media_type,
                     download_url=str(request.url_for("download_artifact", job_id=job_id, name=a.name)))
        for a in job_service.artifacts(session, team=team, job_id=job_id)])


@router.get("/{job_id}/artifacts/{name}", response_class=Response,
            responses={200: {"content": {"application/x-tar": {}}}, 206: {"description": "partial content (Range)"},
                       416: {"description": "range not satisfiable"}})
def download_artifact(ctx: ContextDep, session: SessionDep, team: CurrentTeam, job_id: str, name: str,
                      range: Annotated[str | None, Header()] = None) -> Response:
    artifact = released(session, job_service.artifact(session, team=team, job_id=job_id, name=name))
    return ranged_download(ctx.store, artifact, range)  # streamed from the store: no database connection held
