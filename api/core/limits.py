"""Limits before work: a request body over its route's limit is refused (413) by its declared Content-Length before
any of it is read, or by counting the bytes as they arrive when there is none; validation errors never echo large
inputs back, nor numbers JSON cannot hold."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # part headers, boundaries and the other form fields around an uploaded file
ECHOED_INPUT_BYTES = 200  # a 422 shows an invalid input up to this size (as JSON), and only its type beyond


class BodyLimits:
    """`max_body` for every request, `max_upload` (plus multipart overhead) for the routes in `upload_paths`
    (exact paths, any method). Starlette's own limiter does the counting: the first read of a body declared too
    large raises, so nothing of it is received."""

    def __init__(self, app: ASGIApp, max_body: int, max_upload: int, upload_paths: frozenset[str]) -> None:
        self.app, self.max_body, self.upload_paths = app, max_body, upload_paths
        self.max_upload = max_upload + MULTIPART_OVERHEAD_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_upload if scope["path"] in self.upload_paths else self.max_body
        await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)


def _short(error: dict[str, Any]) -> dict[str, Any]:
    if "input" not in error:
        return error
    try:
        shown = json.dumps(jsonable_encoder(error["input"]), default=str, allow_nan=False)
    except ValueError:  # NaN or ±Infinity (Python's json reads them, and 1e400 as inf): no JSON number holds it
        omitted = f"{type(error['input']).__name__} holding NaN or Infinity, which JSON cannot represent"
    else:
        if len(shown) <= ECHOED_INPUT_BYTES:
            return error
        omitted = f"{type(error['input']).__name__} of {len(shown)} bytes as JSON"
    return {k: v for k, v in error.items() if k not in ("input", "ctx")} | {"input_omitted": omitted}


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 body (`detail`: a list of errors), with inputs over ECHOED_INPUT_BYTES or holding NaN or
    Infinity left out."""
    return JSONResponse({"detail": jsonable_encoder([_short(e) for e in exc.errors()])}, status_code=422)
