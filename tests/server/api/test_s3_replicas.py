"""Two `lopd serve` replicas over one store on a real S3 server (SeaweedFS on loopback), and DuckDB stats over S3.

The replicas answer with identical bytes and ETags, see a version published after they started
without a restart, and a corrupt or missing object turns /readyz to 503 and is never served.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from lopd.storage import layout, stats
from lopd.storage.fs import StoreDir
from tests.server.api.test_command import RUNNER, free_port
from tests.utils.factories import build_dataset


def _serve(store: StoreDir) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    cmd = [sys.executable, "-c", RUNNER, str(store), "--port", str(port), "--log-level", "warning",
           "--catalog-ttl-s", "0.5", "--scrub-bytes-per-s", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait(base: str, proc: subprocess.Popen[str], status: int = 200, timeout_s: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(f"{base}/readyz")
            if r.status_code == status:
                return r
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"{base}/readyz did not answer {status}"
        time.sleep(0.1)


def _batch(base: str, name: str, indices: list[int]) -> httpx.Response:
    r = httpx.post(f"{base}/v1/datasets/{name}/batch", json={"indices": indices}, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _etag(base: str, name: str, index: int) -> tuple[str, bytes]:
    """The ETags of the manifest and of one sample, and the sample's bytes."""
    manifest = httpx.get(f"{base}/v1/datasets/{name}")
    sample = httpx.get(f"{base}/v1/datasets/{name}/samples/{index}")
    assert manifest.status_code == sample.status_code == 200, (manifest.text, sample.text)
    return f"{manifest.headers['etag']} {sample.headers.get('etag')}", sample.content


@pytest.mark.slow
def test_replicas_over_one_bucket(s3_store: StoreDir) -> None:
    build_dataset(s3_store, "math", n=200, per_part=50, seed=1)
    replicas = [_serve(s3_store) for _ in range(2)]
    try:
        for proc, base in replicas:
            _wait(base, proc)
        indices = [5, 199, 0, 77, 5, 130]
        answers = [_batch(base, "math", indices) for _, base in replicas]
        assert answers[0].content == answers[1].content
        etags = [_etag(base, "math", 77) for _, base in replicas]
        assert etags[0] == etags[1]
        again = _batch(replicas[0][1], "math", indices)  # from the row-group cache this time
        assert again.content == answers[0].content

        # a new version, published while they run, is served by both without a restart
        build_dataset(s3_store, "math", n=120, per_part=50, seed=2)
        for _, base in replicas:
            deadline = time.monotonic() + 30
            while httpx.get(f"{base}/v1/datasets/math").json()["version"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        v2 = [_batch(base, "math", [3, 119]) for _, base in replicas]
        assert v2[0].content == v2[1].content
        v2_etags = [_etag(base, "math", 3) for _, base in replicas]
        assert v2_etags[0] == v2_etags[1] and v2_etags[0] != etags[0]

        # damage: one object of v2 overwritten, one of v1 deleted; a fresh replica refuses both versions
        v2_shard = layout.version_dir(s3_store, "math", 2) / layout.part_name(1)
        data = bytearray(v2_shard.read_bytes())
        data[len(data) // 3] ^= 0x55
        v2_shard.write_bytes(bytes(data))
        (layout.version_dir(s3_store, "math", 1) / layout.part_name(3)).unlink()
        fresh = _serve(s3_store)
        replicas.append(fresh)
        deadline = time.monotonic() + 60
        while "still being verified" in (text := str(_wait(fresh[1], fresh[0], status=503).json())):
            assert time.monotonic() < deadline, text  # a missing object is found at once, checksums after
            time.sleep(0.2)
        assert "part-000001.parquet" in text and "part-000003.parquet" in text, text
        for version in (1, 2):
            r = httpx.post(f"{fresh[1]}/v1/datasets/math/batch?version={version}", json={"indices": [0]})
            assert r.status_code == 503 and r.json()["error"]["type"] == "corrupt", r.text
        # a replica already serving v2 from memory finds the overwritten object on its next uncached read
        r = httpx.post(f"{replicas[0][1]}/v1/datasets/math/batch", json={"indices": [60]})
        assert r.status_code == 503, r.text
        _wait(replicas[0][1], replicas[0][0], status=503)
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(timeout=30)


def test_duckdb_stats_over_s3_equal_the_local_ones(s3_store: StoreDir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    build_dataset(s3_store, "ds", n=60, per_part=16, seed=3)
    build_dataset(tmp_path, "ds", n=60, per_part=16, seed=3)
    remote, local = stats.coverage(s3_store, "ds"), stats.coverage(tmp_path, "ds")
    assert remote.response_length == local.response_length and remote.bytes == local.bytes
    remote_c, local_c = stats.consistency(s3_store, "ds"), stats.consistency(tmp_path, "ds")
    assert remote_c.teacher_logprobs == local_c.teacher_logprobs
    assert remote_c.rollout_vs_teacher == local_c.rollout_vs_teacher
