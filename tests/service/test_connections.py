"""Slow clients hold no connection of `wkvq serve` (a real process) for long: a connection that does not send a
complete request head within WKVQ_REQUEST_HEAD_TIMEOUT_SECONDS is closed, while normal requests are answered."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

from .processes import service_env, start_server

HEAD_TIMEOUT = 1  # seconds; the test waits up to a minute for the server to close the connections
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


def connect(base: str) -> socket.socket:
    address = urlsplit(base)
    sock = socket.create_connection((address.hostname, address.port), timeout=60)
    sock.setblocking(False)
    return sock


def read(sock: socket.socket) -> tuple[bytes, bool]:
    """What the server has sent since the last read, and whether it has closed the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer, head and Content-Length body, from a blocking socket: it may come in several segments (the
    body after the head)."""
    data = b""
    while True:
        head, separator, body = data.partition(b"\r\n\r\n")
        if separator:
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk


def test_connections_without_a_complete_request_head_are_closed(tmp_path):
    """Silent connections, ones that sent part of a head, ones that send a header byte by byte (each byte would
    reset uvicorn's keep-alive timer), and a kept-alive one that does so after its first answer: all closed, those
    with part of a head after a 408; /healthz answers throughout."""
    env = service_env(f"sqlite:///{tmp_path}/wkvq.db", tmp_path / "store",
                      WKVQ_REQUEST_HEAD_TIMEOUT_SECONDS=str(HEAD_TIMEOUT))
    server, base = start_server(env, tmp_path)
    silent = [connect(base) for _ in range(20)]
    partial = [connect(base) for _ in range(20)]
    dribbling = [connect(base) for _ in range(5)]
    kept = connect(base)
    try:
        for sock in partial + dribbling:
            sock.sendall(PARTIAL_HEAD)
        kept.setblocking(True)
        kept.sendall(HEALTHZ)
        first = read_answer(kept)
        assert first.startswith(b"HTTP/1.1 200") and first.endswith(b'{"status":"ok"}'), first
        kept.setblocking(False)
        kept.sendall(PARTIAL_HEAD)
        dribbling.append(kept)

        pending = {sock: b"" for sock in silent + partial + dribbling}
        closed: dict[socket.socket, bytes] = {}
        deadline = time.monotonic() + 60
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} of {len(pending) + len(closed)} connections still open"
            assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
            for sock in list(pending):
                data, eof = read(sock)
                pending[sock] += data
                if eof:
                    closed[sock] = pending.pop(sock)
                elif sock in dribbling:
                    try:
                        sock.send(b"x")
                    except OSError:  # closed meanwhile: the next read says so
                        pass
        assert all(closed[sock] == b"" for sock in silent)
        assert all(closed[sock] == REQUEST_TIMEOUT for sock in partial + dribbling), \
            {closed[sock] for sock in partial + dribbling}
    finally:
        for sock in silent + partial + dribbling:
            sock.close()
        server.stop()
