"""Database writes from a worker survive a database outage shorter than the lease."""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

T = TypeVar("T")
log = logging.getLogger(__name__)


def with_db_retry(fn: Callable[[], T], *, deadline_seconds: float, what: str) -> T:
    """Call `fn` until it succeeds, retrying connection errors with backoff for up to `deadline_seconds`."""
    deadline, delay = time.monotonic() + deadline_seconds, 0.2
    while True:
        try:
            return fn()
        except DBAPIError as exc:
            if not (isinstance(exc, OperationalError) or exc.connection_invalidated):
                raise
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable during %s (%s); retrying in %.1fs", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
