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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_runs_with_tokens_and_env(tmp_path: Path) -> None:
    build_dataset(tmp_path / "store", "ds", n=10, per_part=5, seed=1)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"secret-token-1": "lab-x"}))
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
    cmd = [sys.executable, "-c", RUNNER, str(tmp_path), "--tokens-file", str(tokens), "--port", str(free_port())]
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
