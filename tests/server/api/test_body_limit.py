"""Request bodies: bounded by their headers and as they stream, timed, and never read before auth."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from lopd.server.api.settings import ServerSettings
from tests.server.api.conftest import GOOD_TOKEN, Running, running_server

BATCH = "/v1/datasets/alpha/batch"


def raw_exchange(port: int, head: bytes, body_chunks: list[bytes] = (), *, timeout: float = 10) -> tuple[int, bytes]:
    """Send a request head and body chunks byte for byte from a thread (a send fails once the server has
    answered and closed), while reading the answer until the server closes: (status, whole answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send() -> None:
            try:
                s.sendall(head)
                for chunk in body_chunks:
                    s.sendall(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        s.shutdown(socket.SHUT_RDWR)
        sender.join(timeout)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12]), answer


def error_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


@pytest.fixture(scope="module")
def small_body_server(store) -> Running:
    with running_server(ServerSettings(store=store[0], max_body_bytes=2_000, body_timeout_s=1.0)) as srv:
        yield srv


def test_content_length_over_the_limit_is_413_from_the_header(small_body_server: Running) -> None:
    with small_body_server.client() as client:
        ok = client.post(BATCH, json={"indices": [0, 1]}, headers={"Accept": "application/json"})
        assert ok.status_code == 200, ok.text
        big = json.dumps({"indices": list(range(1000))})  # ~5 kB, above the 2 kB limit
        r = client.post(BATCH, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert r.json()["error"]["type"] == "too_large" and "2000 bytes" in r.json()["error"]["message"]


def test_a_chunked_body_is_counted_as_it_streams(small_body_server: Running) -> None:
    with small_body_server.client() as client:
        headers = {"Accept": "application/json", "Content-Type": "application/json"}
        small = client.post(BATCH, content=iter([b'{"indices": ', b"[0, 1]}"]), headers=headers)
        assert small.status_code == 200, small.text
        assert [s["index"] for s in small.json()["samples"]] == [0, 1]
    # 40 MB offered in 64 kB chunks: refused once 2 kB have arrived, the rest never read.
    head = b"POST " + BATCH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"10000\r\n" + b"7" * 65536 + b"\r\n"
    start = time.monotonic()
    status, answer = raw_exchange(small_body_server.port, head, [chunk] * 640)
    assert status == 413 and b"connection: close" in answer.lower()
    assert "more than 2000 bytes" in error_of(answer)["message"]
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("te", [b"chunked", b"gzip, chunked"])
def test_content_length_with_transfer_encoding_is_400(small_body_server: Running, te: bytes) -> None:
    """Both framings at once (the request smuggling vector): refused before any of the body is read."""
    head = (
        b"POST " + BATCH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20\r\nTransfer-Encoding: " + te + b"\r\n\r\n"
    )
    status, answer = raw_exchange(small_body_server.port, head, [b'5\r\n{"ind\r\n'] * 10)
    assert status == 400 and b"connection: close" in answer.lower()
    err = error_of(answer)
    assert err["type"] == "invalid_input"
    if te == b"chunked":  # (h11 itself refuses any other coding: a malformed request)
        assert "Content-Length and Transfer-Encoding" in err["message"]


def test_a_body_that_stalls_is_408(small_body_server: Running) -> None:
    head = b"POST " + BATCH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n"
    start = time.monotonic()
    status, answer = raw_exchange(small_body_server.port, head, [b'{"indices": [0'])
    took = time.monotonic() - start
    assert status == 408 and b"connection: close" in answer.lower(), answer
    assert error_of(answer)["type"] == "timeout" and "body_timeout_s" in error_of(answer)["message"]
    assert 0.9 < took < 5


def test_auth_comes_before_the_body(auth_server: Running) -> None:
    """Without a token: 401 whatever the body (malformed, too large, smuggled), and none of it is read."""
    url = "/v1/datasets/alpha/batch"
    with httpx.Client(base_url=auth_server.base_url, timeout=30) as c:
        r = c.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthorized", r.text
        assert r.headers["connection"] == "close"  # the body was not read: the connection cannot be reused
        r = c.post(url, content=b"x" * 3_000_000, headers={"Content-Type": "application/json"})
        assert r.status_code == 401, r.text
        authed = c.post(url, content=b"{not json", headers={"Authorization": f"Bearer {GOOD_TOKEN}"})
        assert authed.status_code == 422 and authed.json()["error"]["type"] == "invalid_input"
    head = (
        b"POST " + url.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    start = time.monotonic()
    status, answer = raw_exchange(auth_server.port, head, [b"10000\r\n" + b"7" * 65536 + b"\r\n"] * 640)
    assert status == 401 and time.monotonic() - start < 5
