"""Launch a command on N local processes with torchrun (gloo on CPU), as users launch training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def torchrun(
    args: list[str], *, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node N ARGS...` (ARGS: `-m lopd train ...` or a script), captured.

    One thread per process: two ranks on a 2-core machine would otherwise fight over the cores.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
