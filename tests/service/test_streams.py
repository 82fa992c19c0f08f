"""Event streams starve no one: a team holding its most open streams (more are refused, 429) leaves another team's
requests fast, and the streams still end when their job does. Real HTTP (`live_server`), SQLite and Postgres."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import TINY_JOB, service_settings, team_key

PER_KEY, PER_TEAM = 500, 1000  # team a's keys: two at their cap make the team's
POLL_SECONDS = 0.05  # 20 rounds a second: 20,000 polls a second for the old code's 1000 streams, 40 queries here
FAST_SECONDS = 2.0  # idle streams cost nothing here (~10 ms answers); the old code: 3.7 s (SQLite, this test, a loaded
# 2-core machine), 9-31 s with 500-1500 streams polling once a second; and it had no cap to refuse the next stream


@pytest.fixture
def settings(db_url, tmp_path):
    return service_settings(db_url, str(tmp_path / "store"), POLL_SECONDS=POLL_SECONDS,
                            MAX_STREAMS_PER_KEY=PER_KEY, MAX_STREAMS_PER_TEAM=PER_TEAM)


def open_streams(base: str, job_id: str, key: str, count: int = 1) -> list[tuple[socket.socket, bytes]]:
    """`count` sockets on the job's event stream, all requested before any answer is read, and the response head
    read from each."""
    address = urlsplit(base)
    request = (f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: {address.netloc}\r\n"
               f"Authorization: Bearer {key}\r\n\r\n").encode()
    sockets = [socket.create_connection((address.hostname, address.port), timeout=120) for _ in range(count)]
    for sock in sockets:
        sock.sendall(request)
    return [(sock, read_until(sock, b"\r\n\r\n", b"")) for sock in sockets]


def read_until(sock: socket.socket, marker: bytes, received: bytes) -> bytes:
    while marker not in received:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {received[-500:]!r}"
        received += chunk
    return received


def submit(http: httpx.Client, key: str) -> str:
    response = http.post("/v1/jobs", json=TINY_JOB, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_team_at_its_stream_cap_leaves_other_teams_fast(live_server, service):
    """Team a holds 1000 streams on its queued job (no worker runs it) with two keys; team b's requests answer within
    2 s meanwhile; a third stream of a full key, and any stream of a full team, is refused with Retry-After; closing a
    stream frees its place; cancelling the job ends every stream."""
    keys = [team_key(service, "a") for _ in range(3)]
    other = team_key(service, "b")
    sockets: list[tuple[socket.socket, bytes]] = []
    with httpx.Client(base_url=live_server, timeout=60) as http:
        job_id, others_job = submit(http, keys[0]), submit(http, other)
        try:
            for key in keys[:2]:
                sockets += open_streams(live_server, job_id, key, PER_KEY)
            assert all(head.startswith(b"HTTP/1.1 200") for _, head in sockets), {head for _, head in sockets}
            # each has sent the job's `queued` event: from now on the streams are idle
            sockets = [(sock, read_until(sock, b"event: queued", head)) for sock, head in sockets]

            for path in ["/healthz", "/v1/jobs", f"/v1/jobs/{others_job}"] * 3:
                started = time.monotonic()
                response = http.get(path, headers={"Authorization": f"Bearer {other}"})
                took = time.monotonic() - started
                assert response.status_code == 200 and took < FAST_SECONDS, (path, response.status_code, took)

            for key, cap in ((keys[0], "this API key"), (keys[2], "your team")):
                with http.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"}
                                 ) as refused:  # the old code opened it: never read to its end
                    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0, cap
                    assert refused.read() and refused.json()["detail"].startswith(cap), refused.text
            sockets += open_streams(live_server, others_job, other)  # the caps are per team
            assert sockets[-1][1].startswith(b"HTTP/1.1 200"), sockets[-1][1]

            closed, _ = sockets.pop(0)
            closed.close()
            deadline = time.monotonic() + 60  # the server notices the closed connection, then frees its place
            while True:
                [(sock, head)] = open_streams(live_server, job_id, keys[0])
                if head.startswith(b"HTTP/1.1 200"):
                    sockets.append((sock, head))
                    break
                sock.close()
                assert head.startswith(b"HTTP/1.1 429") and time.monotonic() < deadline, head

            assert http.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {keys[0]}"}
                             ).status_code == 200
            for sock, head in sockets[:-2] + sockets[-1:]:  # team a's: each ends with the job's status
                assert b'"status":"cancelled"' in read_until(sock, b"event: end", head).replace(b" ", b"")
        finally:
            for sock, _ in sockets:
                sock.close()
