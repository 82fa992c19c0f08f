"""Service errors carry their HTTP status; one handler in `api.main` turns them into responses."""

from __future__ import annotations

from typing import Sequence


class ServiceError(Exception):
    status_code = 400
    headers: dict[str, str] | None = None  # of the response

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ServiceError):
    status_code = 404


class Gone(NotFound):
    """Deleted: known, but removed for good."""

    status_code = 410


class Conflict(ServiceError):
    status_code = 409


class Unauthorized(ServiceError):
    status_code = 401


class Unavailable(ServiceError):
    status_code = 503


class PayloadTooLarge(ServiceError):
    status_code = 413


class TooManyRequests(ServiceError):
    """A 429 with a Retry-After header of `retry_after` seconds."""

    status_code = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.headers = {"Retry-After": str(retry_after)}


class InvalidField(ServiceError):
    """A 422 shaped like FastAPI's validation errors: `loc` names the field, `message` the reason."""

    status_code = 422

    def __init__(self, loc: Sequence[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = list(loc)
