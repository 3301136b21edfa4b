"""A real `lopd serve` process against hostile clients on raw sockets: smuggled and endless bodies,
slow heads and bodies, connection hoarding, huge URLs and headers, foreign Host names.

Each is refused in bounded time and memory while other clients are still served. The server runs
with short timeouts and a small per-client connection limit (its flags), and tokens on.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.api.test_command import RUNNER, free_port
from tests.utils.factories import build_dataset

TOKEN = "tok-hostile-0123456789"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
PER_CLIENT = 4
CHUNK = b"10000\r\n" + b"7" * 65536 + b"\r\n"  # one 64 kB chunk of a chunked body
FORTY_MB = [CHUNK] * 640


@dataclass
class Served:
    port: int
    pid: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hostile")
    build_dataset(root / "store", "ds", n=20, per_part=8, seed=3)
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps({TOKEN: "lab"}))
    tokens.chmod(0o600)
    port = free_port()
    cmd = [sys.executable, "-c", RUNNER, str(root / "store"), "--port", str(port), "--tokens-file", str(tokens)]
    cmd += ["--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", str(BODY_TIMEOUT_S)]
    cmd += ["--max-connections-per-client", str(PER_CLIENT), "--log-level", "warning"]
    log = open(root / "server.log", "wb")  # closed below, once the server has stopped
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.1)
        yield Served(port, proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == 0, (root / "server.log").read_text()[-3000:]


def exchange(
    port: int, data: list[bytes], *, source: str = "127.0.0.1", pause_s: float = 0.0, timeout: float = 15
) -> tuple[bytes, float]:
    """Send `data` piece by piece from a thread (pausing between pieces) while reading until the server
    closes; (the answer, seconds until the server closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    stop = threading.Event()

    def send() -> None:
        try:
            for piece in data:
                s.sendall(piece)
                if pause_s and stop.wait(pause_s):
                    return
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    start = time.monotonic()
    sender.start()
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    took = time.monotonic() - start
    stop.set()
    s.close()
    sender.join(timeout)
    return answer, took


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def error_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def reset_rss_peak(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak becomes the current RSS
    except OSError:
        pass  # then the peak since start-up is the baseline: still a bound


def head(method: str, path: str, extra: bytes = b"") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak RSS from /proc")
def test_smuggled_and_endless_bodies_are_refused_at_once_with_memory_flat(served: Served) -> None:
    """40 MB chunked bodies, behind a small Content-Length or none: refused within a second or two, and
    the server's peak memory does not grow (before: 4.7 s and +380 MB, parsed whole)."""
    batch = "/v1/datasets/ds/batch"
    smuggled = b"Content-Type: application/json\r\nContent-Length: 20\r\nTransfer-Encoding: chunked\r\n"
    endless = b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    cases = [
        (head("POST", batch, AUTH + smuggled), 400),  # both framings
        (head("POST", batch, smuggled), 401),  # no token: nothing is read
        (head("POST", batch, AUTH + endless), 413),  # counted as it streams: refused past 1 MiB
    ]
    reset_rss_peak(served.pid)
    before = rss_peak_mb(served.pid)
    for request_head, status in cases:
        answer, took = exchange(served.port, [request_head + b"\r\n", *FORTY_MB])
        assert status_of(answer) == status, answer[:300]
        assert b"connection: close" in answer.lower()
        assert took < 5, took
    grown = rss_peak_mb(served.pid) - before
    assert grown < 30, f"the server's peak RSS grew by {grown:.0f} MB"
    assert httpx.get(served.url("/livez")).status_code == 200


def test_a_slow_head_is_dropped_while_other_clients_are_served(served: Served) -> None:
    """Slowloris: a header line every 0.2 s, forever. Dropped (408) after header_timeout_s."""
    trickle = [head("GET", "/v1/datasets")] + [b"X-Slow: %d\r\n" % i for i in range(100)]
    result: dict[str, tuple[bytes, float]] = {}
    slow = threading.Thread(target=lambda: result.update(slow=exchange(served.port, trickle, pause_s=0.2)))
    slow.start()
    latencies = []
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as other:
        while slow.is_alive():
            t0 = time.monotonic()
            assert other.get(served.url("/v1/datasets")).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
    slow.join()
    answer, took = result["slow"]
    assert status_of(answer) == 408 and error_of(answer)["type"] == "timeout", answer
    assert "header_timeout_s" in error_of(answer)["message"]
    assert HEADER_TIMEOUT_S * 0.9 < took < HEADER_TIMEOUT_S + 3, took
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies


def test_an_idle_connection_is_closed_after_the_header_timeout(served: Served) -> None:
    answer, took = exchange(served.port, [])
    assert status_of(answer) == 408 and HEADER_TIMEOUT_S * 0.9 < took < HEADER_TIMEOUT_S + 3


def test_a_slow_body_is_408_after_the_body_timeout(served: Served) -> None:
    request = head("POST", "/v1/datasets/ds/batch", AUTH + b"Content-Length: 200\r\n\r\n")
    answer, took = exchange(served.port, [request] + [b" "] * 50, pause_s=0.2)
    assert status_of(answer) == 408 and "body_timeout_s" in error_of(answer)["message"], answer
    assert BODY_TIMEOUT_S * 0.9 < took < BODY_TIMEOUT_S + 3, took


def test_connections_per_client_are_limited(served: Served) -> None:
    """One address holding max_connections_per_client connections gets 429 for one more; another
    address is still served; closing one makes room."""
    hog = "127.0.0.3"
    held = []
    try:
        for _ in range(PER_CLIENT):  # keep-alive connections, each after one answered request
            s = socket.create_connection(("127.0.0.1", served.port), timeout=10, source_address=(hog, 0))
            s.sendall(head("GET", "/livez", b"\r\n"))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(s)
        answer, took = exchange(served.port, [head("GET", "/livez", b"\r\n")], source=hog)
        assert status_of(answer) == 429 and took < 3, answer
        assert b"retry-after: 1" in answer.lower() and error_of(answer)["type"] == "too_many_requests"
        answer, _ = exchange(served.port, [head("GET", "/livez", b"Connection: close\r\n\r\n")], source="127.0.0.4")
        assert status_of(answer) == 200
        held.pop().close()
        time.sleep(0.2)
        answer, _ = exchange(served.port, [head("GET", "/livez", b"Connection: close\r\n\r\n")], source=hog)
        assert status_of(answer) == 200
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (head("GET", "/" + "a" * 1_000_000, b"\r\n"), 414),  # a 1 MB URL, still arriving when refused
        (head("GET", "/livez?" + "q" * 10_000, b"Connection: close\r\n\r\n"), 414),  # 10 kB, arrived whole
        (head("GET", "/livez", b"X-Big: " + b"b" * 20_000 + b"\r\nConnection: close\r\n\r\n"), 431),
        (head("GET", "/livez", b"X-Big: " + b"b" * 2_000_000 + b"\r\n\r\n"), 431),
    ],
    ids=["url-1MB", "url-10kB", "header-20kB", "header-2MB"],
)
def test_oversized_heads_are_answered_not_reset(served: Served, request_bytes: bytes, status: int) -> None:
    answer, took = exchange(served.port, [request_bytes])
    assert status_of(answer) == status and error_of(answer)["type"] == "too_large", answer[:300]
    assert took < 5


def test_foreign_host_names_are_refused(served: Served) -> None:
    """DNS rebinding: a page served as evil.example, resolved to 127.0.0.1, sends `Host: evil.example`."""
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1.evil.example"):
        r = httpx.get(served.url("/readyz"), headers={"Host": host})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_input", (host, r.text)
        assert "allowed_hosts" in r.json()["error"]["message"]
    for host in ("localhost", f"localhost:{served.port}", f"127.0.0.1:{served.port}", "LOCALHOST"):
        assert httpx.get(served.url("/readyz"), headers={"Host": host}).status_code == 200, host
