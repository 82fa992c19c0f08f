"""Downloads tell the truth: a missing, truncated or altered artifact object answers 410 (or cuts the stream before
its last byte), an unreachable store 503, and RFC 9110 conditionals, Range and HEAD behave. Over real HTTP
(`live_server`), on SQLite and Postgres; artifacts are rows and objects written directly, without calibration."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import httpx
import pytest

from api.core.context import ServiceContext
from api.core.storage import CHUNK
from api.dashboard.web import COOKIE
from api.models import Artifact, Job
from api.teams.service import team_service

from .conftest import TINY_JOB

DATA = os.urandom(2 * CHUNK + 12345)  # three chunks: a cut stream has sent some bytes but not all
ROUTE = "/v1/jobs/{job_id}/artifacts/{name}"


@dataclass
class Stored:
    """A succeeded job of team a with one artifact, `model.tar`, holding DATA."""

    http: httpx.Client
    headers: dict[str, str]
    key: str
    job_id: str
    artifact_id: str
    uri: str

    @property
    def url(self) -> str:
        return f"/v1/jobs/{self.job_id}/artifacts/model.tar"

    @property
    def etag(self) -> str:
        return f'"{hashlib.sha256(DATA).hexdigest()}"'


@pytest.fixture
def stored(service: ServiceContext, team_headers: Callable[[str], dict[str, str]],
           live_server: str) -> Iterator[Stored]:
    headers = team_headers("a")
    with service.session() as session:
        team = team_service.get_team(session, name="a")
        job = Job(team_id=team.id, spec=TINY_JOB, gpu_class="default", max_attempts=3, request_hash="x",
                  status="succeeded")
        session.add(job)
        session.flush()
        obj = service.store.put_bytes(DATA, f"jobs/{job.id}/x-model.tar")
        artifact = Artifact(job_id=job.id, name="model.tar", uri=obj.uri, sha256=obj.sha256, size=obj.size,
                            media_type="application/x-tar")
        session.add(artifact)
        session.commit()
        job_id, artifact_id = job.id, artifact.id
    with httpx.Client(base_url=live_server, timeout=30) as http:
        yield Stored(http, headers, headers["Authorization"].removeprefix("Bearer "), job_id, artifact_id, obj.uri)


def overwrite(service: ServiceContext, stored: Stored, data: bytes) -> None:
    """Changes the object behind the server's back."""
    assert service.store.put_bytes(data, f"jobs/{stored.job_id}/x-model.tar").uri == stored.uri


def flipped(data: bytes, at: int = 0) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def row(service: ServiceContext, stored: Stored) -> Artifact:
    with service.session() as session:
        return session.get(Artifact, stored.artifact_id)


def listed(stored: Stored) -> dict:
    [artifact] = stored.http.get(f"/v1/jobs/{stored.job_id}/artifacts", headers=stored.headers).json()
    return artifact


def assert_gone(response: httpx.Response, *words: str) -> None:
    assert response.status_code == 410, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert all(word in detail for word in words), detail


# ------------------------------------------------------------------------------------------ the store lies


def test_missing_object_answers_410_and_stays_listed(service, stored):
    service.store.delete(stored.uri)
    assert_gone(stored.http.get(stored.url, headers=stored.headers),
                f"artifact model.tar of job {stored.job_id} is no longer in the store")
    assert stored.http.head(stored.url, headers=stored.headers).status_code == 410
    assert listed(stored)["available"] is True  # not marked: the object may be restored
    overwrite(service, stored, DATA)
    assert stored.http.get(stored.url, headers=stored.headers).content == DATA


def test_truncated_object_is_marked_unavailable(service, stored):
    overwrite(service, stored, DATA[:-1])
    assert_gone(stored.http.get(stored.url, headers=stored.headers), f"{len(DATA) - 1} bytes")
    artifact = listed(stored)
    assert artifact["available"] is False and f"{len(DATA) - 1} bytes" in artifact["unavailable_reason"]
    assert row(service, stored).unavailable == artifact["unavailable_reason"]
    overwrite(service, stored, DATA)  # marked for good: answered at once, without looking at the store again
    assert_gone(stored.http.get(stored.url, headers=stored.headers | {"Range": "bytes=0-9"}), "unavailable")


def test_bit_flip_before_the_first_download_is_caught_by_verification(service, stored):
    overwrite(service, stored, flipped(DATA, len(DATA) // 2))
    assert_gone(stored.http.get(stored.url, headers=stored.headers | {"Range": "bytes=0-9"}), "sha256")
    assert row(service, stored).verified_at is None
    assert "sha256" in listed(stored)["unavailable_reason"]


def test_bit_flip_after_verification_cuts_the_stream(service, stored):
    first = stored.http.get(stored.url, headers=stored.headers)
    assert first.status_code == 200 and first.content == DATA
    assert row(service, stored).verified_at is not None

    overwrite(service, stored, flipped(DATA))
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError):
        with stored.http.stream("GET", stored.url, headers=stored.headers) as response:
            assert response.status_code == 200 and response.headers["content-length"] == str(len(DATA))
            for chunk in response.iter_raw():
                received += chunk
    assert 0 < len(received) < len(DATA)  # some chunks went out, never the last one
    assert_gone(stored.http.get(stored.url, headers=stored.headers), "changed after verification")
    assert listed(stored)["available"] is False
    assert downloads_counted(stored) == {"200": "1.0", "500": "1.0", "410": "1.0"}  # the cut one is no success


def test_unreachable_store_answers_503_and_marks_nothing(service, stored, monkeypatch):
    def unreachable(path: str) -> int:
        raise ConnectionRefusedError("store down")

    monkeypatch.setattr(service.store.fs, "size", unreachable)
    response = stored.http.get(stored.url, headers=stored.headers)
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "artifact store unavailable" in response.json()["detail"]
    monkeypatch.undo()
    assert listed(stored)["available"] is True
    assert stored.http.get(stored.url, headers=stored.headers).content == DATA


def test_a_failed_download_is_counted_with_its_status(service, stored):
    service.store.delete(stored.uri)
    assert stored.http.get(stored.url, headers=stored.headers).status_code == 410
    assert downloads_counted(stored) == {"410": "1.0"}


def downloads_counted(stored: Stored) -> dict[str, str]:
    """{status: count} of GET requests to the download route, from /metrics."""
    text = stored.http.get("/metrics").text
    return dict(re.findall(r'wkvq_http_requests_total\{method="GET",route="' + re.escape(ROUTE)
                           + r'",status="(\d+)"\} (\S+)', text))


# ------------------------------------------------------------------------------------ RFC 9110 conditionals


def test_if_none_match_answers_304(stored):
    weak = f"W/{stored.etag}"
    for value in (stored.etag, weak, "*", f'"other", {weak}'):
        for method in ("GET", "HEAD"):
            response = stored.http.request(method, stored.url, headers=stored.headers | {"If-None-Match": value})
            assert response.status_code == 304, (method, value)
            assert response.headers["etag"] == stored.etag and response.content == b""
    response = stored.http.get(stored.url, headers=stored.headers | {"If-None-Match": '"other"'})
    assert response.status_code == 200 and response.content == DATA


def test_if_match_is_strong(stored):
    for value in ('"other"', f"W/{stored.etag}"):
        response = stored.http.get(stored.url, headers=stored.headers | {"If-Match": value})
        assert response.status_code == 412, value
    for value in (stored.etag, "*", f'"other", {stored.etag}'):
        response = stored.http.get(stored.url, headers=stored.headers | {"If-Match": value})
        assert response.status_code == 200 and response.content == DATA, value


def test_if_range_honours_the_range_only_for_the_current_etag(stored):
    ranged = stored.headers | {"Range": "bytes=10-19"}
    response = stored.http.get(stored.url, headers=ranged | {"If-Range": stored.etag})
    assert response.status_code == 206 and response.content == DATA[10:20]
    for value in ('"other"', f"W/{stored.etag}", "Wed, 21 Oct 2015 07:28:00 GMT"):
        response = stored.http.get(stored.url, headers=ranged | {"If-Range": value})
        assert response.status_code == 200 and response.content == DATA, value


def test_invalid_range_is_ignored_unsatisfiable_is_416(stored):
    for value in ("bytes=5-3", "bytes=-", "bytes=x-1", "items=0-1"):
        response = stored.http.get(stored.url, headers=stored.headers | {"Range": value})
        assert response.status_code == 200 and response.content == DATA, value
    for value in (f"bytes={len(DATA)}-", "bytes=-0"):
        response = stored.http.get(stored.url, headers=stored.headers | {"Range": value})
        assert response.status_code == 416, value
        assert response.headers["content-range"] == f"bytes */{len(DATA)}"


def test_range_positions_too_long_for_int_are_past_the_end(stored):
    """Positions of more than 4300 digits (Python's int() limit): on both routes, GET and HEAD, a start past the end
    is 416, a suffix or an end past it means the whole rest, and leading zeros are only zeros."""
    signin = stored.http.post("/dashboard/signin", data={"api_key": stored.key})
    cookie = signin.headers["set-cookie"].split(";", 1)[0]  # Secure: httpx keeps it off plain http by itself
    huge, zeros = "9" * 5000, "0" * 5000
    expected = {f"bytes={huge}-": (416, None), f"bytes={huge}-{huge}": (416, None),
                f"bytes=-{huge}": (206, (0, len(DATA) - 1)), f"bytes=10-{huge}": (206, (10, len(DATA) - 1)),
                f"bytes={zeros}10-{zeros}19": (206, (10, 19))}
    for url, headers in ((stored.url, stored.headers),
                         (f"/dashboard/jobs/{stored.job_id}/artifacts/model.tar", {"Cookie": cookie})):
        for value, (status, span) in expected.items():
            for method in ("GET", "HEAD"):
                response = stored.http.request(method, url, headers=headers | {"Range": value})
                assert response.status_code == status, (url, method, value[:20], response.text[:200])
                if span is None:
                    assert response.headers["content-range"] == f"bytes */{len(DATA)}"
                    continue
                start, end = span
                assert response.headers["content-range"] == f"bytes {start}-{end}/{len(DATA)}"
                assert response.content == (DATA[start:end + 1] if method == "GET" else b"")


def test_head_answers_the_headers_of_get(stored):
    get = stored.http.get(stored.url, headers=stored.headers)
    head = stored.http.head(stored.url, headers=stored.headers)
    assert head.status_code == 200 and head.content == b""
    for name in ("content-length", "content-type", "etag", "last-modified", "accept-ranges", "x-content-sha256",
                 "repr-digest", "content-disposition"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers["content-length"] == str(len(DATA)) and head.headers["last-modified"].endswith(" GMT")
    ranged = stored.http.head(stored.url, headers=stored.headers | {"Range": "bytes=-10"})
    assert ranged.status_code == 206 and ranged.content == b""
    assert ranged.headers["content-range"] == f"bytes {len(DATA) - 10}-{len(DATA) - 1}/{len(DATA)}"
    assert ranged.headers["content-length"] == "10"


# ------------------------------------------------------------------------------------------------ dashboard


def test_dashboard_download_tells_the_truth(service, stored):
    signin = stored.http.post("/dashboard/signin", data={"api_key": stored.key})
    assert signin.status_code == 303
    url = f"/dashboard/jobs/{stored.job_id}/artifacts/model.tar"
    signed_in = {"Cookie": f"{COOKIE}={signin.cookies[COOKIE]}"}  # the session token, not the key
    assert stored.http.get(url, headers=signed_in).content == DATA
    head = stored.http.head(url, headers=signed_in)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA)) and head.content == b""
    assert stored.http.get(url, headers=signed_in | {"If-None-Match": stored.etag}).status_code == 304
    assert stored.http.get(url, headers=signed_in | {"Range": "bytes=5-3"}).content == DATA
    overwrite(service, stored, DATA[:100])
    gone = stored.http.get(url, headers=signed_in)  # a page for the browser, naming the reason
    assert gone.status_code == 410 and gone.headers["content-type"].startswith("text/html")
    assert "100 bytes" in gone.text
