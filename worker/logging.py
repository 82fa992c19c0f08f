"""Process logging for `wkvq serve` and `wkvq worker`: every line says which job and which worker it is about.

`log_context(job_id=..., worker_id=...)` sets context variables that a handler filter copies onto every record,
whatever logger emitted it (ours, wkvq_core, Celery, SQLAlchemy). Context variables are per thread (and per
asyncio task): `JobRunner.execute` sets them for the job's thread, the heartbeat thread sets its own.

    WKVQ_LOG_FORMAT=text  2026-01-01 12:00:00,000 INFO [job=3f9a... worker=host:42:gpu-a100:gpu0] worker.runner: ...
    WKVQ_LOG_FORMAT=json  {"time": "...", "level": "INFO", "job_id": "3f9a...", "worker_id": "...", "logger": "...",
                           "message": "...", "thread": "..."}
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s [job=%(job_id)s worker=%(worker_id)s] %(name)s: %(message)s"
NONE = "-"
HANDLER_NAME = "wkvq"
# Loggers that some libraries configure with handlers of their own and propagate=False; they must reach ours.
PROPAGATING = ("celery", "celery.task", "celery.redirected", "celery.worker", "celery.app.trace", "kombu",
               "uvicorn", "uvicorn.error", "uvicorn.access")

job_id_var: ContextVar[str | None] = ContextVar("wkvq_job_id", default=None)
worker_id_var: ContextVar[str | None] = ContextVar("wkvq_worker_id", default=None)
_process_worker_id: str | None = None  # the default when a thread has not set one (a worker process has one id)


@contextmanager
def log_context(*, job_id: str | None = None, worker_id: str | None = None) -> Iterator[None]:
    """Within this block (this thread), log records carry these ids; unset ones keep their outer value."""
    tokens = []
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    if worker_id is not None:
        tokens.append((worker_id_var, worker_id_var.set(worker_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds `job_id` and `worker_id` ("-" when none) to every record passing the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get() or NONE
        if getattr(record, "worker_id", None) is None:
            record.worker_id = worker_id_var.get() or _process_worker_id or NONE
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, job_id, worker_id, logger, message[, exc_info]."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "job_id": getattr(record, "job_id", NONE),
            "worker_id": getattr(record, "worker_id", NONE),
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    json_lines = str(getattr(log_format, "value", log_format)) == "json"
    return JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)


def make_handler(log_format: str, stream: Any = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(HANDLER_NAME)
    handler.addFilter(ContextFilter())
    handler.setFormatter(make_formatter(log_format))
    return handler


def configure_logging(log_format: str = "text", *, worker_id: str | None = None, level: int = logging.INFO,
                      stream: Any = None) -> logging.Handler:
    """One handler on the root logger (replacing a previous one of ours); library loggers propagate to it."""
    global _process_worker_id
    if worker_id is not None:
        _process_worker_id = worker_id
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = make_handler(log_format, stream)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings.warn (torch, transformers) as records too, not bare stderr lines
    _hugging_face_through_root()
    for name in PROPAGATING:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if h.get_name() == HANDLER_NAME]
        logger.propagate = True
    return handler


def _hugging_face_through_root() -> None:
    """transformers and datasets log through a handler of their own and draw tqdm bars on stderr: in a service
    process their records go to our handler instead and the bars are off (a log line is a line)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "datasets"):
        try:
            lib = importlib.import_module(f"{name}.utils.logging")
        except ImportError:
            continue
        for switch in ("disable_default_handler", "enable_propagation", "disable_progress_bar"):
            if hasattr(lib, switch):
                getattr(lib, switch)()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:
        return
    disable_progress_bars()


def celery_setup_logging(**_kwargs: Any) -> None:
    """Receiver of Celery's `setup_logging` signal: with a receiver connected, Celery leaves logging alone (no
    handlers of its own, task logger not cut off from the root), so its lines go through our handler."""
    for name in PROPAGATING:
        logging.getLogger(name).propagate = True
