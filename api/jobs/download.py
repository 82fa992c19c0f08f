"""Artifact download with a single HTTP Range (RFC 9110) and the file's sha256 in the headers."""

from __future__ import annotations

import base64
import re

from fastapi import Response
from fastapi.responses import StreamingResponse

from ..core.storage import ArtifactStore
from ..models import Artifact

RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for one satisfiable range, None for the whole file, "unsatisfiable" otherwise."""
    if header is None:
        return None
    match = RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: answer with the whole file
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:
        length = int(last)
        return (max(size - length, 0), size - 1) if length and size else "unsatisfiable"
    start, end = int(first), int(last) if last else size - 1
    if start >= size or (last and end < start):
        return "unsatisfiable"
    return start, min(end, size - 1)


def ranged_download(store: ArtifactStore, artifact: Artifact, range_header: str | None) -> Response:
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{artifact.sha256}"',
        "X-Content-SHA256": artifact.sha256,
        "Repr-Digest": f"sha-256=:{base64.b64encode(bytes.fromhex(artifact.sha256)).decode()}:",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
    }
    span = _byte_range(range_header, artifact.size)
    if span == "unsatisfiable":
        return Response(status_code=416, headers=headers | {"Content-Range": f"bytes */{artifact.size}"})
    start, end = span or (0, artifact.size - 1)
    length = end - start + 1
    headers["Content-Length"] = str(length)
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{artifact.size}"
    return StreamingResponse(store.iter_range(artifact.uri, start, length), status_code=status,
                             media_type=artifact.media_type, headers=headers)
