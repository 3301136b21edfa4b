"""`serve` as a command in its own process: flags, environment, tokens file, clean start and stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lopd.server.api.settings import ServerSettings
from tests.utils.factories import build_dataset

# `lopd serve ARGS...`, through the real command line app.
RUNNER = "import sys; from lopd.cli import app; app(['serve', *sys.argv[1:]])"
# The same, up to the point where uvicorn would start serving (which prints "serving HOST PORT" instead).
UP_TO_START = (
    "import sys, uvicorn; uvicorn.run = lambda app, **kw: print('serving', kw['host'], kw['port']);"
    "from lopd.cli import app; app(['serve', *sys.argv[1:]])"
)


def serve(*args: str | Path, start: bool = False) -> subprocess.CompletedProcess[str]:
    """`lopd serve ARGS` in a subprocess; it stops where uvicorn would start unless `start`."""
    cmd = [sys.executable, "-c", RUNNER if start else UP_TO_START, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_runs_with_tokens_and_env(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=10, per_part=5, seed=1)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"secret-token-1": "lab-x"}))
    tokens.chmod(0o600)
    port = free_port()
    env = {**os.environ, "LOPD_MAX_BATCH_INDICES": "3", "LOPD_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "store"), "--port", str(port), "--tokens-file", str(tokens)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        headers = {"Authorization": "Bearer secret-token-1"}
        assert httpx.get(f"{base}/v1/datasets").status_code == 401
        assert httpx.get(f"{base}/v1/datasets", headers=headers).json()["datasets"][0]["name"] == "ds"
        r = httpx.post(f"{base}/v1/datasets/ds/batch", json={"indices": [0, 1, 2, 3]}, headers=headers)
        assert r.status_code == 413 and "max_batch_indices is 3" in r.json()["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    assert "secret-token-1" not in out


def test_bad_tokens_file_fails_fast(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text("{}")
    tokens.chmod(0o600)
    (tmp_path / "store").mkdir()
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path / "store"), "--tokens-file", str(tokens)]
    cmd += ["--port", str(free_port())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "lists no tokens" in done.stderr


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOPD_STORE", str(tmp_path))
    monkeypatch.setenv("LOPD_MAX_RESPONSE_TOKENS", "123")
    monkeypatch.setenv("LOPD_HOST", "0.0.0.0")
    s = ServerSettings()
    assert (s.store, s.max_response_tokens, s.max_batch_indices, s.catalog_ttl_s) == (tmp_path, 123, 4096, 2.0)
    assert s.exposed
    assert ServerSettings(host="127.0.0.1").exposed is False  # arguments win over the environment


def test_a_store_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    done = serve(tmp_path / "no-such-store", "--port", free_port())
    assert done.returncode == 2, done.stderr
    assert f"store {tmp_path / 'no-such-store'} does not exist" in done.stderr
    assert "lopd precompute" in done.stderr and "--store" in done.stderr
    assert "serving" not in done.stdout and "Traceback" not in done.stderr


def test_a_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a store")
    done = serve(tmp_path, "--port", free_port())
    assert done.returncode == 2, done.stderr
    assert f"{tmp_path} is not a lightning-opd store (it has no lopd-store.json)" in done.stderr
    assert "lopd precompute" in done.stderr
    (tmp_path / "file.parquet").write_text("")
    done = serve(tmp_path / "file.parquet", "--port", free_port())
    assert done.returncode == 2 and "is not a directory" in done.stderr


def test_an_empty_directory_is_served_with_a_warning(tmp_path: Path) -> None:
    """A store to be filled later: precompute creates the store in it, and the server picks datasets up live."""
    port = free_port()
    done = serve(tmp_path, "--port", port)
    assert done.returncode == 0, done.stderr
    assert f"warning: store {tmp_path} is empty" in done.stderr
    assert done.stdout.strip() == f"serving 127.0.0.1 {port}"


def test_a_port_in_use_is_refused_before_startup(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=4, per_part=4, seed=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = serve(tmp_path / "store", "--port", port, start=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: port {port} on 127.0.0.1 is in use" in done.stderr and "--port" in done.stderr
    assert "startup complete" not in done.stdout + done.stderr and "Errno" not in done.stderr


def test_serving_beyond_loopback_without_tokens_warns_once(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=4, per_part=4, seed=1)
    done = serve(tmp_path / "store", "--host", "0.0.0.0", "--port", free_port())
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("serving on 0.0.0.0") == 1, done.stderr  # once: the app warns, the command does not
    assert "without a tokens file (--tokens-file" in done.stderr


# The command up to uvicorn.run, printing the connection guard's settings it would run with.
GUARD = (
    "import sys, uvicorn; uvicorn.run = lambda app, **kw: print('guard', kw['timeout_keep_alive'], "
    "kw['h11_max_incomplete_event_size'], kw['http'].header_timeout_s, kw['http'].clients.limit, "
    "sorted(app.state.settings.host_allow_list or ['*']));"
    "from lopd.cli import app; app(['serve', *sys.argv[1:]])"
)


def test_connection_limits_are_flags_and_variables_and_reach_uvicorn(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=4, per_part=4, seed=1)
    env = {**os.environ, "LOPD_KEEP_ALIVE_S": "7", "LOPD_ALLOWED_HOSTS": "store,store.lab.example"}
    cmd = [sys.executable, "-c", GUARD, str(tmp_path / "store"), "--port", str(free_port())]
    cmd += ["--header-timeout-s", "3", "--max-connections-per-client", "9", "--max-header-bytes", "20000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "guard 7.0 20000 3.0 9 ['store', 'store.lab.example']"
    help_env = {**os.environ, "COLUMNS": "250", "TERM": "dumb"}
    help_text = subprocess.run(cmd[:3] + ["--help"], capture_output=True, text=True, timeout=120, env=help_env).stdout
    for option in ("--allowed-hosts", "--header-timeout-s", "--body-timeout-s", "--max-url-bytes", "--redact-paths"):
        assert option in help_text, option


def test_a_tokens_file_others_can_read_is_refused(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=4, per_part=4, seed=1)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"secret-token-1": "lab-x"}))
    tokens.chmod(0o644)
    done = serve(tmp_path / "store", "--port", free_port(), "--tokens-file", tokens)
    assert done.returncode == 2 and "serving" not in done.stdout, done.stdout + done.stderr
    assert f"can be read by other users (-rw-r--r--): make it private with `chmod 600 {tokens}`" in done.stderr
    assert "--insecure-tokens-file" in done.stderr and "Traceback" not in done.stderr
    done = serve(tmp_path / "store", "--port", free_port(), "--tokens-file", tokens, "--insecure-tokens-file")
    assert done.returncode == 0 and "serving" in done.stdout, done.stderr
    assert "can be read by other users" in done.stderr and "secret-token-1" not in done.stderr
