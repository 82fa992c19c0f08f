"""How a committed job reaches a worker. The database row is the truth; a dispatcher only wakes workers."""

from __future__ import annotations

import threading
from typing import Any, Protocol

from .config import DispatcherKind, Settings

RUN_TASK = "calibration.run"
# Celery's hard limit is a backstop above JOB_TIME_LIMIT_SECONDS, which the worker enforces itself (it fails the job
# at its next cancel check, keeping the checkpoints): time to reach that check and record the failure. (Celery
# enforces it only in pools that can interrupt a task, e.g. prefork; `wkvq worker` runs the solo pool.)
HARD_LIMIT_GRACE_SECONDS = 300


class JobDispatcher(Protocol):
    def enqueue(self, job_id: str, gpu_class: str) -> None: ...

    def ping(self) -> None:
        """Raises when the broker cannot be reached."""

    def waiting(self, gpu_class: str) -> int | None:
        """Wake-ups waiting in the broker's queue of `gpu_class`; None where workers poll the database instead."""


class LocalDispatcher:
    """Embedded mode: workers poll the database; `enqueue` only wakes the in-process ones early."""

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    def enqueue(self, job_id: str, gpu_class: str) -> None:
        self.wakeup.set()

    def ping(self) -> None:
        return None

    def waiting(self, gpu_class: str) -> int | None:
        return None


def hard_time_limit(settings: Settings) -> float:
    return settings.JOB_TIME_LIMIT_SECONDS + HARD_LIMIT_GRACE_SECONDS


def celery_config(settings: Settings) -> dict[str, Any]:
    """Shared by the API's sender and the workers: long GPU tasks, acknowledged only when done."""
    return {
        "broker_url": settings.BROKER_URL,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": hard_time_limit(settings) + 3600},
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "task_time_limit": hard_time_limit(settings),
        "task_default_queue": settings.GPU_CLASSES[0],
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
    }


class CeleryDispatcher:
    """Sends the job id by task name to the queue of its GPU class; the API never imports the worker or torch."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self.app = Celery("wkvq")
        self.app.conf.update(celery_config(settings))

    def enqueue(self, job_id: str, gpu_class: str) -> None:
        self.app.send_task(RUN_TASK, args=[job_id], queue=gpu_class)

    def ping(self) -> None:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def waiting(self, gpu_class: str) -> int | None:
        with self.app.connection_for_read() as conn:  # Redis: the LLEN of the queue's lists
            conn.ensure_connection(max_retries=1, timeout=2)
            return conn.default_channel.queue_declare(queue=gpu_class).message_count


def make_dispatcher(settings: Settings) -> JobDispatcher:
    return CeleryDispatcher(settings) if settings.DISPATCHER == DispatcherKind.CELERY else LocalDispatcher()
