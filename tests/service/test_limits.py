"""Limits before work, over real HTTP: a body is refused by its declared size or by counting before it is received,
and a request that needs a team is authenticated before its body is read. Each request here declares a body far
larger than what it sends: a server that waited for the body would never answer (the read times out)."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import httpx
import pytest

HUGE = 300 * 1024 * 1024
REPLY_SECONDS = 5


def status_before_body(base: str, method: str, path: str, headers: dict[str, str], sent: bytes = b"") -> int:
    """Sends the request line, headers and `sent` (a prefix of the declared body) and returns the status the server
    answered without the rest of the body."""
    url = urlsplit(base)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {url.netloc}", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((url.hostname, url.port), timeout=REPLY_SECONDS) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + sent)
        reply = sock.recv(65536)
    return int(reply.split(b" ", 2)[1])


def multipart_head(length: int) -> tuple[dict[str, str], bytes]:
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", "Content-Length": str(length)}
    return headers, b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n' + b"a" * 1000


def test_unauthenticated_upload_is_refused_before_its_body(live_server, settings):
    headers, sent = multipart_head(settings.MAX_UPLOAD_BYTES)  # within the limit: only the key is wrong
    assert status_before_body(live_server, "POST", "/v1/datasets", headers, sent) == 401
    bad_key = {"Authorization": "Bearer wkvq_abc_def"}
    assert status_before_body(live_server, "POST", "/v1/datasets", headers | bad_key, sent) == 401


def test_unauthenticated_json_is_refused_before_it_is_read(live_server, settings):
    headers = {"Content-Type": "application/json", "Content-Length": str(settings.MAX_BODY_BYTES)}
    assert status_before_body(live_server, "POST", "/v1/jobs", headers, b"[" + b"1," * 1000) == 401
    assert status_before_body(live_server, "POST", "/v1/jobs/x/cancel", headers, b"[1") == 401


def test_an_oversized_body_is_refused_whatever_its_credentials(live_server):
    headers, sent = multipart_head(HUGE)
    assert status_before_body(live_server, "POST", "/v1/datasets", headers, sent) == 413


def test_authenticated_upload_over_the_limit_is_refused_by_its_declared_size(live_server, team_headers):
    headers, sent = multipart_head(HUGE)
    assert status_before_body(live_server, "POST", "/v1/datasets", headers | team_headers("a"), sent) == 413


def test_json_over_the_body_limit_is_refused_by_its_declared_size(live_server, team_headers, settings):
    headers = {"Content-Type": "application/json", "Content-Length": str(settings.MAX_BODY_BYTES + 1)}
    assert status_before_body(live_server, "POST", "/v1/jobs", headers | team_headers("a"), b"{") == 413


def test_a_chunked_body_is_counted_and_cut_at_the_limit(live_server, team_headers, settings):
    """No Content-Length: twice the limit is sent, the body never ends, and the server answers anyway."""
    chunk = b" " * 4096
    sent = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2 * settings.MAX_BODY_BYTES // len(chunk)))
    headers = team_headers("a") | {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    assert status_before_body(live_server, "POST", "/v1/jobs", headers, sent) == 413


def test_dashboard_sign_in_takes_no_large_body(live_server):
    headers, sent = multipart_head(HUGE)
    assert status_before_body(live_server, "POST", "/dashboard/signin", headers, sent) == 413


def test_dashboard_post_needs_a_sign_in_before_its_body(live_server, settings):
    headers, sent = multipart_head(settings.MAX_UPLOAD_BYTES)
    assert status_before_body(live_server, "POST", "/dashboard/jobs/new", headers, sent) == 303


@pytest.mark.parametrize("field", ["model", "config"])
def test_validation_errors_do_not_echo_large_inputs(live_server, team_headers, field):
    body = {"model": {"source": "local", "name": "stories260k"}, "calibration": {"source": "builtin", "name": "tinystories"}}
    body[field] = {"source": "local", "name": "x" * 40000} if field == "model" else list(range(8000))
    response = httpx.post(f"{live_server}/v1/jobs", json=body, headers=team_headers("a"), timeout=30)
    assert response.status_code == 422
    assert len(response.content) < 2000, response.text[:300]
    assert response.json()["detail"][0]["loc"][:2] == ["body", field]


def test_validation_errors_still_show_small_inputs(live_server, team_headers):
    body = {"model": {"source": "local", "name": "stories260k"}, "calibration": {"source": "builtin", "name": "nope"}}
    response = httpx.post(f"{live_server}/v1/jobs", json=body, headers=team_headers("a"), timeout=30)
    assert response.status_code == 422
    assert any(error.get("input") == "nope" for error in response.json()["detail"])
