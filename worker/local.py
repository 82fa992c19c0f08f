"""The local dispatcher's worker: polls the database for queued jobs of its GPU classes (no broker)."""

from __future__ import annotations

import logging
import threading

from .runner import JobRunner

log = logging.getLogger(__name__)


class LocalWorker(threading.Thread):
    def __init__(self, runner: JobRunner, gpu_classes: list[str], stop: threading.Event,
                 wakeup: threading.Event | None = None) -> None:
        super().__init__(name=f"worker-{runner.worker_id}", daemon=True)
        self.runner, self.gpu_classes, self.stop = runner, gpu_classes, stop
        self.wakeup = wakeup or threading.Event()

    def run(self) -> None:
        poll = self.runner.ctx.settings.POLL_SECONDS
        while not self.stop.is_set():
            try:
                lease = self.runner.claim_next(self.gpu_classes)
            except Exception as exc:  # database briefly unavailable
                log.warning("worker %s: cannot poll for jobs: %s", self.runner.worker_id, exc)
                lease = None
            if lease is not None:
                self.runner.execute(lease)
                continue
            self.wakeup.wait(poll)
            self.wakeup.clear()
