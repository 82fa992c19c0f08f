"""Event streams that hold no thread while idle.

One poller per API process reads, every POLL_SECONDS and in one query each, the status and newest event id of every
job watched by an open stream, and whether each stream's key is still valid; it wakes (an asyncio event) the streams
whose job or key changed. A woken stream reads its new events on the streams' own threads, never on the request
thread pool. Open streams are capped per team and per key, counted in this API process: beyond a cap, 429."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio
from sqlalchemy import func, select

from ..core.context import ServiceContext
from ..core.errors import TooManyRequests, Unauthorized
from ..models import ApiKey, Job, JobEvent
from ..teams.service import check_key, key_prefix
from .service import job_service

log = logging.getLogger(__name__)

STREAM_THREADS = 2  # the poller and the streams' event reads: a few short queries, whatever the number of streams
RETRY_AFTER_SECONDS = 10


@dataclass(eq=False)
class Watch:
    """One open stream: what the poller last saw of its job and key. `changed` is set when any of it changes."""

    team_id: str
    key: str
    job_id: str
    status: str | None = None  # None: not polled yet
    newest_event: int = 0
    gone: bool = False  # the job's row is no more
    revoked: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class StreamHub:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.watches: set[Watch] = set()
        self.limiter = anyio.CapacityLimiter(STREAM_THREADS)
        self.poller: asyncio.Task | None = None

    @contextlib.asynccontextmanager
    async def watch(self, team_id: str, key: str, job_id: str) -> AsyncIterator[Watch]:
        """Registers a stream for as long as the block runs; TooManyRequests (429) beyond the caps."""
        settings = self.ctx.settings
        by_key = sum(w.key == key for w in self.watches)
        by_team = sum(w.team_id == team_id for w in self.watches)
        for holder, held, cap in (("this API key", by_key, settings.MAX_STREAMS_PER_KEY),
                                  ("your team", by_team, settings.MAX_STREAMS_PER_TEAM)):
            if held >= cap:
                raise TooManyRequests(f"{holder} has {cap} event streams open, the most this server allows; close "
                                      f"one, or poll GET /v1/jobs/{{id}}", retry_after=RETRY_AFTER_SECONDS)
        watch = Watch(team_id, key, job_id)
        self.watches.add(watch)
        loop = asyncio.get_running_loop()
        if self.poller is None or self.poller.done() or self.poller.get_loop() is not loop:
            self.poller = loop.create_task(self._poll())
        try:
            yield watch
        finally:
            self.watches.discard(watch)

    async def events(self, job_id: str, after: int) -> list[JobEvent]:
        def read() -> list[JobEvent]:
            with self.ctx.read_session() as session:
                return job_service.events(session, job_id=job_id, after=after)

        return await anyio.to_thread.run_sync(read, limiter=self.limiter)

    async def _poll(self) -> None:
        while self.watches:
            watches = list(self.watches)
            try:
                jobs, valid_keys = await anyio.to_thread.run_sync(self._read, watches, limiter=self.limiter)
            except Exception:  # the database is away: the streams wait, and the next round tries again
                log.warning("event stream poll failed", exc_info=True)
            else:
                for watch in watches:
                    status, newest = jobs.get(watch.job_id, (None, 0))
                    seen = (status, newest, status is None, watch.key not in valid_keys)
                    if seen != (watch.status, watch.newest_event, watch.gone, watch.revoked):
                        watch.status, watch.newest_event, watch.gone, watch.revoked = seen
                        watch.changed.set()
            await asyncio.sleep(self.ctx.settings.POLL_SECONDS)

    def _read(self, watches: list[Watch]) -> tuple[dict[str, tuple[str, int]], set[str]]:
        """{job id: (status, newest event id)} of the watched jobs, and the watching keys that are still valid."""
        job_ids = {w.job_id for w in watches}
        keys = {w.key for w in watches}
        with self.ctx.read_session() as session:
            jobs = session.execute(
                select(Job.id, Job.status, func.coalesce(func.max(JobEvent.id), 0))
                .outerjoin(JobEvent, JobEvent.job_id == Job.id).where(Job.id.in_(job_ids)).group_by(Job.id, Job.status))
            rows = {row.prefix: row for row in session.execute(
                select(ApiKey.prefix, ApiKey.key_hash, ApiKey.revoked_at)
                .where(ApiKey.prefix.in_({key_prefix(k) for k in keys})))}
            return {job_id: (status, newest) for job_id, status, newest in jobs}, {
                key for key in keys if _valid(key, rows.get(key_prefix(key)))}


def _valid(key: str, row) -> bool:
    try:
        check_key(key, row)
    except Unauthorized:
        return False
    return True
