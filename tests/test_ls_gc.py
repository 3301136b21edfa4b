"""`lopd ls` and `lopd gc` as a user runs them, next to a real `lopd serve`; store URLs refused everywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lopd.cli import app
from lopd.storage.gc import collect_garbage
from lopd.storage.reader import Store
from lopd.storage.readers import LEASE_TTL_S, read_leases
from lopd.storage.staging import Staging
from tests.server.api.test_command import RUNNER, free_port
from tests.utils.factories import build_dataset, make_plan, random_samples, write_parts

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.output


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    for seed in (1, 2, 3):
        build_dataset(root, "ds", n=12, per_part=5, seed=seed)
    build_dataset(root, "other", n=4, per_part=4, seed=9)
    samples = random_samples(12, 7)
    plan = make_plan(samples, run_key="0007" + "f" * 60, dataset="fresh", per_part=4)
    staging = Staging(root, "fresh", plan.run_key)
    write_parts(staging, staging.open(plan), samples, only={0})
    return root


def test_ls_lists_versions_sizes_verdicts_and_runs(store: Path) -> None:
    code, out = cli("ls", str(store))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"store {store}"
    assert lines[1:3] == ["ds", lines[2]] and lines[2].startswith("  v1 ")
    v3 = next(line for line in lines if line.startswith("  v3 "))
    assert "12 samples" in v3 and "consistent" in v3 and " kB" in v3
    assert "  run 0007ffffffffffff: 1/3 parts (4/12 samples), last written" in out
    assert "fresh" in lines and lines[-1] == "readers: 0 live"

    code, out = cli("ls", str(store), "--json")
    assert code == 0, out
    listing = json.loads(out)
    by_name = {d["name"]: d for d in listing["datasets"]}
    assert sorted(by_name) == ["ds", "fresh", "other"]
    v1 = by_name["ds"]["versions"][0]
    m = Store(store).manifest("ds", 1)
    assert (v1["version"], v1["num_samples"], v1["num_response_tokens"]) == (1, 12, m.num_response_tokens)
    assert v1["bytes"] == sum(f.bytes for f in m.files) and v1["verdict"] == "consistent" and v1["read_by"] == []
    assert by_name["fresh"]["versions"] == []
    (run,) = by_name["fresh"]["in_progress"]
    assert (run["parts_done"], run["parts_total"], run["worker_alive"]) == (1, 3, False)


def test_gc_cli_dry_run_json_and_errors(store: Path) -> None:
    code, out = cli("gc", str(store), "--dataset", "ds", "--keep", "2", "--dry-run")
    assert code == 0, out
    assert out.splitlines()[0] == "gc ds (keep the 2 newest): dry run, nothing removed"
    assert "  would remove version v1 " in out and "would free" in out
    assert Store(store).versions("ds") == [1, 2, 3]
    code, out = cli("gc", str(store), "--dataset", "ds", "--keep", "2", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [i["name"] for i in report["removed"]] == ["v1"] and report["dry_run"] is False
    assert Store(store).versions("ds") == [2, 3]

    for args, message in [
        (["--keep", "0"], "error: --keep is 0; it must be at least 1"),
        (["--keep", "1", "--staging-older-than", "soon"], "error: --staging-older-than 'soon' is not a duration"),
    ]:
        code, out = cli("gc", str(store), "--dataset", "ds", *args)
        assert code == 2 and message in out, out
    code, out = cli("gc", str(store), "--dataset", "nope", "--keep", "1")
    assert code == 2 and "error: no dataset 'nope'" in out


@pytest.mark.parametrize(
    "args",
    [
        ["precompute", "r.jsonl", "--teacher", "t", "--sft-teacher", "t", "--store", "{url}", "--dataset", "x"],
        ["verify", "{url}", "--dataset", "x", "--teacher", "t"],
        ["serve", "{url}"],
        ["stats", "{url}", "--dataset", "x"],
        ["finalize", "{url}", "--dataset", "x"],
        ["export", "{url}", "--dataset", "x", "--out", "o.parquet", "--tokenizer", "t"],
        ["import", "a.parquet", "--store", "{url}", "--dataset", "x", "--tokenizer", "t"],
        ["ls", "{url}"],
        ["gc", "{url}", "--dataset", "x", "--keep", "1"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_refuses_a_store_url_it_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    """Only s3:// URLs are stores (tests/storage/test_backends.py); any other scheme is refused, nothing written."""
    monkeypatch.chdir(tmp_path)
    code, out = cli(*[a.replace("{url}", "gs://bucket/x") for a in args])
    assert code == 2, out
    assert "error: store gs://bucket/x is not supported" in out and "s3://BUCKET/PREFIX" in out
    assert list(tmp_path.iterdir()) == []  # no local `gs:/bucket/x` directory


@pytest.mark.parametrize("command", [["ls"], ["gc", "--dataset", "x", "--keep", "1"]])
def test_ls_and_gc_refuse_object_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, out = cli(command[0], "s3://bucket/x", *command[1:])
    assert code == 2 and f"lopd {command[0]} works on local stores only" in out, out
    assert list(tmp_path.iterdir()) == []


def test_a_store_url_from_the_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from lopd.errors import InvalidInput
    from lopd.server.api.settings import ServerSettings

    monkeypatch.setenv("LOPD_STORE", "gs://bucket/store")
    with pytest.raises(InvalidInput, match="is not supported"):
        ServerSettings()


def _wait_ready(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


def _serve(store: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-c", RUNNER, str(store), "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    _wait_ready(base, proc)
    return proc, base


@pytest.mark.slow
def test_gc_and_a_real_lopd_serve(store: Path) -> None:
    proc, base = _serve(store)
    try:
        assert httpx.get(f"{base}/v1/datasets/ds/samples/2", params={"version": 1}).status_code == 200
        (lease,) = read_leases(store)
        out = subprocess.run(
            [sys.executable, "-m", "lopd", "gc", str(store), "--dataset", "ds", "--keep", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "removed      version v2" in out.stdout
        assert f"kept         version v1  being read ({lease.stem})" in out.stdout
        code, text = cli("ls", str(store))
        assert f"[read by {lease.stem}]" in text and "readers: 1 live" in text
        assert "reading ds v1" in text
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert read_leases(store) == {}  # removed on a clean shutdown
    assert [i.name for i in collect_garbage(store, "ds", keep=1).removed] == ["v1"]

    # A server killed with -9 leaves its lease: it protects what it read until it expires.
    build_dataset(store, "ds", n=6, per_part=5, seed=5)  # v4
    proc, base = _serve(store)
    assert httpx.get(f"{base}/v1/datasets/ds/samples/0", params={"version": 3}).status_code == 200
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert len(read_leases(store)) == 1
    assert [i.name for i in collect_garbage(store, "ds", keep=1).removed] == []
    expired = collect_garbage(store, "ds", keep=1, now=time.time() + LEASE_TTL_S + 1)
    assert [(i.kind, i.name) for i in expired.removed][0] == ("version", "v3")
    assert read_leases(store) == {} and Store(store).versions("ds") == [4]
