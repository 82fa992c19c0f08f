"""`WKVQClient`: typed methods over the service's REST API (/v1), returning the API's own pydantic models."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping
from urllib.parse import quote, urljoin

import httpx
from pydantic import BaseModel

from api.datasets.schemas import DatasetRead
from api.jobs.schemas import ArtifactRead, JobCreate, JobEventRead, JobList, JobRead

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TRANSIENT_STATUS = frozenset({502, 503, 504})
CHUNK = 1 << 20
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class ClientError(Exception):
    """An HTTP error answered by the service (`status`), or a client-side failure (`status` None): unreachable
    server, lost event stream, checksum mismatch. `detail` is FastAPI's detail made readable; for a 422 each
    problem reads `field.path: message` and the raw list is in `errors`."""

    def __init__(self, status: int | None, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(status, detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []

    def __str__(self) -> str:
        return f"{self.detail} (HTTP {self.status})" if self.status is not None else self.detail


class StreamEnd(BaseModel):
    """The last item of `WKVQClient.events()`: the job has ended with `status`."""

    kind: Literal["end"] = "end"
    status: str


@dataclass(frozen=True)
class DownloadResult:
    path: Path  # the verified file
    sha256: str
    size: int
    resumed_from: int  # bytes already in <name>.part that were kept (0: a fresh download)
    received: int  # bytes transferred by this call


def _loc(loc: Iterable[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def _msg(item: dict[str, Any]) -> str:
    msg = str(item.get("msg", item))
    return msg.removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError


def error_from_response(response: httpx.Response) -> ClientError:
    """A ClientError from an error response (its body must have been read)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        items = [d for d in detail if isinstance(d, dict)]
        text = "; ".join(f"{_loc(d.get('loc', ()))}: {_msg(d)}" for d in items) or json.dumps(detail)
        return ClientError(response.status_code, text, items)
    if detail is None:
        detail = response.text.strip()[:500] or response.reason_phrase
    return ClientError(response.status_code, str(detail))


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    response.read()
    raise error_from_response(response)


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str, str | None]]:
    """(event, data, last event id) for each dispatched message of a text/event-stream (WHATWG rules: comments
    and unknown fields ignored, multi-line data joined with newlines, the id persists until changed)."""
    event, data, last_id = "", [], None
    for line in lines:
        if not line:
            if data:
                yield event or "message", "\n".join(data), last_id
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value


def sse_events(http: httpx.Client, url: str, last_event_id: int | str | None = None,
               read_timeout: float | None = None) -> Iterator[tuple[str, dict]]:
    """(event, JSON data) pairs of one text/event-stream connection; ClientError for an HTTP error status.
    A dropped connection raises httpx.TransportError (WKVQClient.events() reconnects)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = str(last_event_id)
    timeout = httpx.Timeout(http.timeout.connect or 10, read=read_timeout)
    with http.stream("GET", url, headers=headers, timeout=timeout) as response:
        _check(response)
        for event, data, _ in parse_sse(response.iter_lines()):
            yield event, json.loads(data)


def _sha256_prefix(path: Path, length: int) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = length
        while remaining > 0:
            chunk = f.read(min(CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WKVQClient:
    """A team's view of the service. Every method raises ClientError on an HTTP error or an unreachable server.

    `base_url` is the server (http://host:8000; a trailing /v1 is accepted); `api_key` a team key (wkvq_...)."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0, *, stream_retries: int = 5,
                 retry_delay: float = 1.0, transport: httpx.BaseTransport | None = None) -> None:
        base = base_url.rstrip("/")
        self.base_url = base.removesuffix("/v1")
        self.stream_retries = stream_retries
        self.retry_delay = retry_delay
        self._http = httpx.Client(base_url=f"{self.base_url}/v1", timeout=httpx.Timeout(timeout, connect=10),
                                  headers={"Authorization": f"Bearer {api_key}", "User-Agent": "wkvq-client/1"},
                                  transport=transport)

    def __enter__(self) -> WKVQClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        return ClientError(None, f"cannot reach the service at {self.base_url}: {exc or type(exc).__name__}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return _check(response)

    # ------------------------------------------------------------------ jobs

    def submit(self, body: Mapping[str, Any] | JobCreate, idempotency_key: str | None = None) -> JobRead:
        """POST /v1/jobs. With an Idempotency-Key, the same key and body return the first job."""
        payload = body.model_dump(mode="json") if isinstance(body, JobCreate) else dict(body)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobRead.model_validate(self._request("POST", "/jobs", json=payload, headers=headers).json())

    def get(self, job_id: str) -> JobRead:
        return JobRead.model_validate(self._request("GET", f"/jobs/{quote(job_id, safe='')}").json())

    def list(self, status: str | None = None, gpu_class: str | None = None, limit: int = 20,
             offset: int = 0) -> JobList:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if gpu_class:
            params["gpu_class"] = gpu_class
        return JobList.model_validate(self._request("GET", "/jobs", params=params).json())

    def cancel(self, job_id: str) -> JobRead:
        """A queued job is cancelled at once, a running one within seconds; 409 once it is publishing its artifact."""
        return JobRead.model_validate(self._request("POST", f"/jobs/{quote(job_id, safe='')}/cancel").json())

    def retry(self, job_id: str) -> JobRead:
        """Requeue a failed or cancelled job; it resumes from its last block checkpoint."""
        return JobRead.model_validate(self._request("POST", f"/jobs/{quote(job_id, safe='')}/retry").json())

    def delete(self, job_id: str) -> bool:
        """Deletes a job (cancelling it first): its artifact, checkpoints, metrics and events are removed. True when
        done, False while a running job is still stopping (it is purged when it has)."""
        return self._request("DELETE", f"/jobs/{quote(job_id, safe='')}").status_code == 204

    def delete_dataset(self, dataset_id: str) -> None:
        """Deletes an uploaded dataset; refused (409) while a queued or running job uses it."""
        self._request("DELETE", f"/datasets/{quote(dataset_id, safe='')}")

    def metrics(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/jobs/{quote(job_id, safe='')}/metrics").json()

    def artifacts(self, job_id: str) -> list[ArtifactRead]:
        rows = self._request("GET", f"/jobs/{quote(job_id, safe='')}/artifacts").json()
        # the server answers root-relative download URLs unless it knows its public URL
        return [ArtifactRead.model_validate(row | {"download_url": urljoin(f"{self.base_url}/", row["download_url"])})
                for row in rows]

    def events(self, job_id: str, last_event_id: int = 0) -> Iterator[JobEventRead | StreamEnd]:
        """The job's events after `last_event_id`, live until it ends; the last item is a StreamEnd.

        A dropped connection (or a 502/503/504) is reopened with Last-Event-ID, so no event is lost or repeated;
        after `stream_retries` failures in a row without an event in between, ClientError. A server that refuses
        the very first connection is a ClientError at once."""
        url, last, failures, received = f"/jobs/{quote(job_id, safe='')}/events", last_event_id, 0, False
        while True:
            try:
                for kind, data in sse_events(self._http, url, last, read_timeout=60):
                    failures, received = 0, True
                    if kind == "end":
                        yield StreamEnd.model_validate(data)
                        return
                    event = JobEventRead.model_validate(data)
                    last = event.id
                    yield event
                reason = "the server closed the stream before the job ended"
            except httpx.TransportError as exc:
                if isinstance(exc, httpx.ConnectError) and not received:
                    raise self._unreachable(exc) from exc
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except ClientError as exc:
                if exc.status not in TRANSIENT_STATUS:
                    raise
                reason = str(exc)
            failures += 1
            if failures > self.stream_retries:
                raise ClientError(None, f"event stream of job {job_id} lost after {failures} attempts: {reason}")
            time.sleep(self.retry_delay * min(failures, 5))

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> JobRead:
        """Poll until the job has ended (succeeded, failed or cancelled); TimeoutError after `timeout` seconds.
        An unreachable server or a 502/503/504 is retried until the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                job = self.get(job_id)
                if job.status in TERMINAL:
                    return job
                state = f"still {job.status}"
            except ClientError as exc:
                if exc.status is not None and exc.status not in TRANSIENT_STATUS:
                    raise
                state = str(exc)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} {state} after {timeout:g}s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # ------------------------------------------------------------------ datasets

    def upload_dataset(self, path: str | os.PathLike[str]) -> DatasetRead:
        """Upload a UTF-8 calibration text; its id goes into {"source": "upload", "dataset_id": ...}."""
        path = Path(path)
        with open(path, "rb") as f:
            response = self._request("POST", "/datasets", files={"file": (path.name, f, "text/plain")})
        return DatasetRead.model_validate(response.json())

    def datasets(self) -> list[DatasetRead]:
        return [DatasetRead.model_validate(row) for row in self._request("GET", "/datasets").json()]

    # ------------------------------------------------------------------ artifacts

    def download(self, job_id: str, dest_dir: str | os.PathLike[str], name: str = "model.tar",
                 on_progress: Callable[[int, int], None] | None = None, retries: int = 3) -> DownloadResult:
        """Download artifact `name` to `dest_dir/name`: streamed to `name.part` (an existing .part is resumed with
        a Range request; a server answering 200 instead of 206 restarts it), sha256 checked against the artifact
        listing and the X-Content-SHA256 header, then renamed into place. A dropped connection is resumed up to
        `retries` times. `on_progress(bytes_done, total)` is called per chunk."""
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ClientError(None, f"invalid artifact name {name!r}")
        listed = {a.name: a for a in self.artifacts(job_id)}
        if name not in listed:
            raise ClientError(404, f"job {job_id} has no artifact {name!r}"
                                   f"{'; it has ' + ', '.join(sorted(listed)) if listed else ' (yet)'}")
        artifact = listed[name]
        directory = Path(dest_dir)
        directory.mkdir(parents=True, exist_ok=True)
        target, part = directory / name, directory / f"{name}.part"
        if target.is_file() and target.stat().st_size == artifact.size \
                and _sha256_prefix(target, artifact.size).hexdigest() == artifact.sha256:
            return DownloadResult(target, artifact.sha256, artifact.size, resumed_from=artifact.size, received=0)

        url = f"/jobs/{quote(job_id, safe='')}/artifacts/{quote(name, safe='')}"
        resumed_from: int | None = None  # set by the first request: bytes of the .part kept
        received, failures, restarted = 0, 0, False
        while True:
            offset = part.stat().st_size if part.is_file() else 0
            if offset > artifact.size:
                part.unlink()
                offset = 0
            digest = _sha256_prefix(part, offset) if offset else hashlib.sha256()
            if offset < artifact.size:
                try:
                    fetched = self._fetch_into(url, part, offset, digest, artifact, on_progress)
                except httpx.TransportError as exc:
                    failures += 1
                    if failures > retries:
                        raise ClientError(None, f"download of {name} interrupted ({exc or type(exc).__name__}); "
                                                f"run it again to resume from {part}") from exc
                    if resumed_from is None:
                        resumed_from = offset
                    time.sleep(self.retry_delay * failures)
                    continue
                if fetched is None:  # 416: the .part does not fit the artifact and was removed
                    continue
                start, got, digest = fetched
                received += got
                if resumed_from is None:
                    resumed_from = start
            elif resumed_from is None:
                resumed_from = offset
            actual = digest.hexdigest()
            if actual != artifact.sha256:
                part.unlink(missing_ok=True)
                if resumed_from and not restarted:  # the kept prefix was bad: once more from byte 0
                    restarted, resumed_from = True, 0
                    continue
                raise ClientError(None, f"{name}: sha256 mismatch: got {actual}, expected {artifact.sha256}")
            os.replace(part, target)
            _fsync_dir(directory)
            return DownloadResult(target, actual, artifact.size, resumed_from=resumed_from, received=received)

    def _fetch_into(self, url: str, part: Path, offset: int, prefix: Any, artifact: ArtifactRead,
                    on_progress: Callable[[int, int], None] | None) -> tuple[int, int, Any] | None:
        """One GET, ranged from `offset` when > 0, written into `part`: (first byte written, bytes received,
        sha256 of the whole .part), or None after a 416 (the .part is then removed). `prefix` is the sha256 of
        the .part's first `offset` bytes; it is extended when the server answers 206."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        timeout = httpx.Timeout(self._http.timeout.connect, read=120)
        with self._http.stream("GET", url, headers=headers, timeout=timeout) as response:
            if response.status_code == 416:
                part.unlink(missing_ok=True)
                return None
            _check(response)
            header_sha = response.headers.get("x-content-sha256")
            if header_sha and header_sha != artifact.sha256:
                raise ClientError(None, f"{artifact.name}: the server's X-Content-SHA256 {header_sha} differs from "
                                        f"the listed sha256 {artifact.sha256}")
            if response.status_code == 206:
                match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
                if match is None or int(match.group(1)) != offset:
                    raise ClientError(206, f"unexpected Content-Range {response.headers.get('content-range')!r} "
                                           f"for a request from byte {offset}")
                start, mode, digest = offset, "ab", prefix
            else:  # 200: the whole file (the server or a proxy ignored the Range)
                start, mode, digest = 0, "wb", hashlib.sha256()
            received, done = 0, start
            with open(part, mode) as f:
                for chunk in response.iter_bytes(CHUNK):
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, artifact.size)
                f.flush()
                os.fsync(f.fileno())
            return start, received, digest
