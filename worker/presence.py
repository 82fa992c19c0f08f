"""Workers announce themselves (a row per process, refreshed every heartbeat) for the queue view and /metrics."""

from __future__ import annotations

import logging
import socket
import threading

from api.core.context import ServiceContext
from api.core.db import utcnow
from api.models import Worker

from .runner import JobRunner

log = logging.getLogger(__name__)


class PresenceThread(threading.Thread):
    def __init__(self, ctx: ServiceContext, runner: JobRunner, gpu_classes: list[str], device: str,
                 stop: threading.Event) -> None:
        super().__init__(name=f"presence-{runner.worker_id}", daemon=True)
        self.ctx, self.runner, self.gpu_classes, self.device, self.stop = ctx, runner, gpu_classes, device, stop

    def announce(self) -> None:
        with self.ctx.session() as session:
            row = session.get(Worker, self.runner.worker_id)
            if row is None:
                row = Worker(id=self.runner.worker_id, hostname=socket.gethostname(), gpu_classes=self.gpu_classes,
                             device=self.device)
                session.add(row)
            row.last_seen_at, row.current_job_id = utcnow(), self.runner.current_job
            session.commit()

    def run(self) -> None:
        while True:
            try:
                self.announce()
            except Exception as exc:  # keep announcing after a database outage
                log.warning("presence of %s: %s", self.runner.worker_id, exc)
            if self.stop.wait(self.ctx.settings.HEARTBEAT_SECONDS):
                return
