"""Every store command against an object store that does not answer: exit 2 and one message saying where to look.

No traceback: before, `lopd stats` and `lopd verify` on an unreachable endpoint printed pyarrow's OSError
traceback (`lopd serve` had its own check).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.utils.inference_server import closed_port_url

COMMANDS = {
    "stats": ["stats", "s3://lopd/store", "--dataset", "math"],
    "verify": ["verify", "s3://lopd/store", "--dataset", "math", "--samples", "2"],
    "export": ["export", "s3://lopd/store", "--dataset", "math", "--format", "verl", "--out", "x.parquet"],
    "serve": ["serve", "s3://lopd/store", "--port", "0"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unreachable_object_store_is_one_clear_error(command: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {**os.environ, "AWS_ENDPOINT_URL": closed_port_url(), "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}  # fmt: skip
    got = subprocess.run([sys.executable, "-m", "lopd", *COMMANDS[command]], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    out = got.stdout + got.stderr
    assert got.returncode == 2, out
    assert "Traceback" not in out, out
    assert "AWS_ENDPOINT_URL" in out and "error:" in out, out
