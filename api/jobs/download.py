"""Artifact download (GET and HEAD): the stored object checked before the status line, RFC 9110 conditionals and
a single Range, the file's sha256 in the headers.

Before any status line is sent, the stored object must exist with the recorded size, and its sha256 must have
matched the recorded one at least once (`Artifact.verified_at`). An object that does not is marked
`Artifact.unavailable` and answers 410 from then on; a missing one answers 410 without being marked (it may be
restored), an unreachable store 503. A whole body is hashed while it streams and its last chunk is held back until
the hash matches: bytes changed after verification cut the connection, so no client gets a complete wrong body.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from datetime import timezone
from email.utils import format_datetime
from typing import Iterator

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import update

from ..core.context import ServiceContext
from ..core.db import utcnow
from ..core.errors import Gone, ServiceError
from ..core.storage import StorageError
from ..models import Artifact

log = logging.getLogger(__name__)

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$", re.IGNORECASE)  # a range unit is case-insensitive
ENTITY_TAG = re.compile(r'(W/)?"([^"]*)"')
POSITION_DIGITS = 18  # a byte position with more significant digits lies past any stored object


class PreconditionFailed(ServiceError):
    status_code = 412


class RangeNotSatisfiable(Exception):
    pass


class CorruptedStream(Exception):
    """The streamed bytes do not match the recorded sha256: the response is cut before its last chunk."""


def _position(digits: str) -> int:
    """A byte position as sent (leading zeros allowed); one too long for int() to parse counts as 10**18, past the
    end of every object."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= POSITION_DIGITS else 10**POSITION_DIGITS


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of one valid, satisfiable range; None for the whole file: no Range, an invalid one
    (RFC 9110 says to ignore it), several ranges or another unit. Raises RangeNotSatisfiable."""
    match = RANGE.match(header.strip()) if header else None
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None  # "bytes=-": invalid
        length = _position(last)
        if not length or not size:
            raise RangeNotSatisfiable()
        return max(size - length, 0), size - 1
    start = _position(first)
    end = _position(last) if last else size - 1
    if last and end < start:
        return None  # invalid, not unsatisfiable
    if start >= size:
        raise RangeNotSatisfiable()
    return start, min(end, size - 1)


def _etag_listed(header: str, sha256: str, *, weak: bool) -> bool:
    """Whether an If-Match / If-None-Match value names the artifact: `*`, or one of its entity tags by weak
    comparison (W/ ignored) or strong comparison (a W/ tag never matches)."""
    if header.strip() == "*":
        return True
    return any(tag == sha256 and (weak or not is_weak) for is_weak, tag in ENTITY_TAG.findall(header))


def _describe(artifact: Artifact) -> str:
    return f"artifact {artifact.name} of job {artifact.job_id}"


def _mark_unavailable(ctx: ServiceContext, artifact: Artifact, reason: str) -> None:
    """Records why the stored object cannot be served (the first reason stays), in a short session of its own."""
    log.warning("%s is unavailable: %s", _describe(artifact), reason)
    with ctx.session() as session:
        session.execute(update(Artifact).where(Artifact.id == artifact.id, Artifact.unavailable.is_(None))
                        .values(unavailable=reason))
        session.commit()


def _mark_verified(ctx: ServiceContext, artifact: Artifact) -> None:
    with ctx.session() as session:
        session.execute(update(Artifact).where(Artifact.id == artifact.id).values(verified_at=utcnow()))
        session.commit()


def _check_stored(ctx: ServiceContext, artifact: Artifact) -> None:
    """Raises Gone (410) unless the stored object has the recorded size and its sha256 has matched once (hashed
    now if it never has); StorageError (503) when the store cannot be read."""
    if artifact.unavailable:
        raise Gone(f"{_describe(artifact)} is unavailable: {artifact.unavailable}")
    try:
        size = ctx.store.size(artifact.uri)
        unverified = size == artifact.size and artifact.verified_at is None
        actual = ctx.store.sha256(artifact.uri) if unverified else None
    except FileNotFoundError:
        raise Gone(f"{_describe(artifact)} is no longer in the store") from None
    except OSError as exc:
        raise StorageError(f"reading {artifact.uri} failed: {type(exc).__name__}: {exc}") from exc
    if size != artifact.size:
        problem = f"the stored object has {size} bytes, {artifact.size} were recorded"
    elif actual is not None and actual != artifact.sha256:
        problem = f"the stored object's sha256 is {actual}, {artifact.sha256} was recorded"
    else:
        if actual is not None:
            _mark_verified(ctx, artifact)
        return
    _mark_unavailable(ctx, artifact, problem)
    raise Gone(f"{_describe(artifact)} is unavailable: {problem}")


def _hashed(ctx: ServiceContext, artifact: Artifact, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The whole object's `chunks`, each sent once the next one is read; the last one only if the bytes match the
    recorded size and sha256. Otherwise the artifact is marked unavailable and the stream raises CorruptedStream."""
    digest, size, held = hashlib.sha256(), 0, None
    for chunk in chunks:
        if held is not None:
            yield held
        digest.update(chunk)
        size += len(chunk)
        held = chunk
    if size != artifact.size or digest.hexdigest() != artifact.sha256:
        reason = (f"the stored bytes changed after verification: {size} bytes with sha256 {digest.hexdigest()} "
                  f"were read, {artifact.size} bytes with sha256 {artifact.sha256} were recorded")
        _mark_unavailable(ctx, artifact, reason)
        raise CorruptedStream(f"{_describe(artifact)}: {reason}")
    if held is not None:
        yield held


def ranged_download(ctx: ServiceContext, artifact: Artifact, request: Request) -> Response:
    """The answer to a GET or HEAD of `artifact`: 410 or 503 (raised) when the store cannot serve it, else 412 or
    304 for If-Match / If-None-Match, else 206 or 416 for a Range (If-Range: only with the current ETag), else 200.
    No database connection is held: `artifact` is detached and each write has its own short session."""
    _check_stored(ctx, artifact)
    etag = f'"{artifact.sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Last-Modified": format_datetime(artifact.created_at.astimezone(timezone.utc), usegmt=True),
        "X-Content-SHA256": artifact.sha256,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
    }
    if_match = request.headers.get("if-match")
    if if_match is not None and not _etag_listed(if_match, artifact.sha256, weak=False):
        raise PreconditionFailed(f"If-Match does not name the current ETag {etag} of {_describe(artifact)}")
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _etag_listed(if_none_match, artifact.sha256, weak=True):
        return Response(status_code=304, headers=headers)  # GET and HEAD only: no other method is routed here

    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != etag:  # another ETag, a weak one or a date: the whole file
        range_header = None
    try:
        span = _byte_range(range_header, artifact.size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers=headers | {"Content-Range": f"bytes */{artifact.size}"})
    start, end = span or (0, artifact.size - 1)
    length = end - start + 1
    headers["Content-Length"] = str(length)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=artifact.media_type)
    body = ctx.store.iter_range(artifact.uri, start, length)
    if span is None:
        body = _hashed(ctx, artifact, body)
    return StreamingResponse(body, status_code=status, media_type=artifact.media_type, headers=headers)
