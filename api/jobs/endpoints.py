from __future__ import annotations

import functools
from typing import Annotated, AsyncIterator

import anyio

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ..core.errors import InvalidField
from ..deps import AuthenticatedFirst, ApiKeyDep, ContextDep, CurrentTeam, SessionDep, released
from ..models import Job, JobStatus
from ..teams.service import team_service
from .download import ranged_download
from .model_source import hub_configs
from .schemas import ArtifactRead, HubModel, JobCreate, JobEventRead, JobList, JobRead
from .service import job_service
from .streams import Watch
from .urls import artifact_url

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=AuthenticatedFirst)


def owned_job(session: SessionDep, team: CurrentTeam, job_id: str) -> Job:
    """The team's job, looked up before a streaming response starts (a 404 cannot be sent once it has)."""
    return released(session, job_service.get(session, team=team, job_id=job_id))  # not held for the whole stream


@router.post("", response_model=JobRead, status_code=status.HTTP_201_CREATED,
             responses={200: {"model": JobRead, "description": "replayed: same Idempotency-Key and body"}})
async def submit_job(ctx: ContextDep, session: SessionDep, team: CurrentTeam, body: JobCreate, response: Response,
                     idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobRead:
    if idempotency_key is not None and not idempotency_key.strip():  # would otherwise be one key shared by all
        raise InvalidField(["header", "idempotency-key"], "Idempotency-Key must not be empty; omit the header instead")
    hub_config = await hub_configs.fetch(body.model) if isinstance(body.model, HubModel) else None

    def submit() -> tuple[bool, JobRead]:
        job, created = job_service.submit(ctx, session, team=team, body=body, idempotency_key=idempotency_key,
                                          hub_config=hub_config)
        return created, released(session, job_service.read(session, job))

    created, read = await run_in_threadpool(submit)
    if not created:
        response.status_code = status.HTTP_200_OK
    return read


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


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={202: {"description": "cancel requested: the job's objects are removed once it has stopped"},
                          409: {"description": "the job is publishing its artifact: delete it once it has succeeded"},
                          410: {"description": "already deleted"}})
def delete_job(ctx: ContextDep, session: SessionDep, team: CurrentTeam, job_id: str) -> Response:
    """Cancels the job if needed and removes its artifact, checkpoints, metrics and events; the row stays as a
    tombstone (GET answers 410)."""
    done = released(session, job_service.delete(session, ctx.store, team=team, job_id=job_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT if done else status.HTTP_202_ACCEPTED)


async def stream_slot(request: Request, key: ApiKeyDep,
                      job: Annotated[Job, Depends(owned_job)]) -> AsyncIterator[Watch]:
    """The stream's place among the open ones, held until its response has ended; 429 beyond the caps."""
    async with request.app.state.streams.watch(job.team_id, key, job.id) as watch:
        yield watch


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"description": "text/event-stream of JobEventRead; ends when the job has ended"},
                       429: {"description": "the team or key has its most streams open; Retry-After"}})
async def job_events(request: Request, watch: Annotated[Watch, Depends(stream_slot)],
                     last_event_id: Annotated[int, Header(ge=0, le=2**62)] = 0) -> AsyncIterator[ServerSentEvent]:
    """Woken by the process's stream poller (`streams.py`) when the job or the key changes: a key revoked while the
    stream is open ends it (`end`, unauthorized) within a poll round."""
    streams, after = request.app.state.streams, last_event_id
    while True:
        if watch.revoked:
            yield ServerSentEvent(data={"status": "unauthorized"}, event="end")
            return
        if watch.newest_event > after:
            events = await streams.events(watch.job_id, after)
            for event in events:
                after = event.id
                yield ServerSentEvent(data=JobEventRead.model_validate(event).model_dump(mode="json"),
                                      event=event.kind, id=str(event.id))
            if events:
                continue  # more than one read's worth may be waiting
        if watch.gone or (watch.status is not None and JobStatus(watch.status).terminal):
            yield ServerSentEvent(data={"status": "deleted" if watch.gone else watch.status}, event="end")
            return
        await watch.changed.wait()
        watch.changed.clear()


@router.get("/{job_id}/metrics")
def job_metrics(session: SessionDep, team: CurrentTeam, job_id: str) -> dict:
    return released(session, job_service.metrics(session, team=team, job_id=job_id))


@router.get("/{job_id}/artifacts", response_model=list[ArtifactRead])
def job_artifacts(request: Request, session: SessionDep, team: CurrentTeam, job_id: str) -> list[ArtifactRead]:
    return released(session, [
        ArtifactRead(name=a.name, size=a.size, sha256=a.sha256, media_type=a.media_type,
                     download_url=artifact_url(request, job_id, a.name),
                     available=a.unavailable is None, unavailable_reason=a.unavailable)
        for a in job_service.artifacts(session, team=team, job_id=job_id)])


DOWNLOAD_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"application/x-tar": {}, "application/octet-stream": {}, "application/json": {}},
          "description": "model.tar; for a target with an export also the export and its notes json "
                         "(llamacpp: model.gguf; vllm: model-vllm.tar, the directory to serve)"},
    206: {"description": "partial content (Range)"},
    304: {"description": "If-None-Match names the current ETag"},
    410: {"description": "the stored object is missing, truncated or altered"},
    412: {"description": "If-Match does not name the current ETag"}, 416: {"description": "range not satisfiable"},
    503: {"description": "artifact store unreachable; Retry-After"}}


@router.get("/{job_id}/artifacts/{name}", response_class=Response, responses=DOWNLOAD_RESPONSES)
@router.head("/{job_id}/artifacts/{name}", response_class=Response, responses=DOWNLOAD_RESPONSES, name="head_artifact")
def download_artifact(ctx: ContextDep, session: SessionDep, team: CurrentTeam, job_id: str, name: str,
                      request: Request) -> Response:
    """GET the artifact's bytes, or HEAD its headers only. RFC 9110 Range, If-Range, If-Match and If-None-Match."""
    artifact = released(session, job_service.artifact(session, team=team, job_id=job_id, name=name))
    return ranged_download(ctx, artifact, request)  # streamed from the store: no database connection held
