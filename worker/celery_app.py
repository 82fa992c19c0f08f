"""The Celery worker: one queue per GPU class, one job at a time per process, acknowledged only when done."""

from __future__ import annotations

from celery import Celery
from celery.signals import setup_logging

from api.core.config import Settings
from api.core.dispatch import RUN_TASK, celery_config

from .logging import celery_setup_logging
from .runner import JobRunner


def create_celery(settings: Settings, runner: JobRunner, gpu_classes: list[str]) -> Celery:
    app = Celery("wkvq")
    app.conf.update(celery_config(settings))
    # a connected receiver keeps Celery from installing handlers of its own: its lines go through ours
    setup_logging.connect(celery_setup_logging, weak=False, dispatch_uid="wkvq-logging")

    @app.task(name=RUN_TASK, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
    def run_calibration(job_id: str) -> None:
        """Only the id travels, as a wake-up: the rows say what runs next (a stale or duplicate message is a no-op)."""
        runner.run_next(gpu_classes, woken_by=job_id)

    return app
