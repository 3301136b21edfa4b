"""Operator faults end precompute with exit 2 and one line naming the cause and the fix (issue 13).

A full disk, a read-only store, a missing permission and a second identical job on the same run.
What is already stored is never lost or changed: a rerun after the fix gives the uninterrupted dataset.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from lopd.cli.params import cli_errors
from lopd.errors import Conflict
from lopd.server.precompute import run_precompute
from lopd.storage import layout, staging
from lopd.storage.reader import Store
from tests.server.test_precompute import _cfg, _cli, _shard_hashes, write_rollouts


def _fail_writes_after(monkeypatch: pytest.MonkeyPatch, parts_ok: int, err: int, *, cleanup_fails: bool) -> None:
    """The (parts_ok+1)-th part write fails with `err`; with `cleanup_fails`, deleting its temp file fails too."""
    real = staging.pq.write_table
    calls = {"n": 0}

    def write_table(table, where, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > parts_ok:
            Path(where).write_bytes(b"half")
            raise OSError(err, os.strerror(err), str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(staging.pq, "write_table", write_table)
    if cleanup_fails:
        real_unlink = Path.unlink

        def unlink(self: Path, missing_ok: bool = False) -> None:
            if self.name.startswith(".tmp-"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)


def _one_line_exit_2(capsys: pytest.CaptureFixture[str], run) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(typer.Exit) as exc, cli_errors():
        run()
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir) -> tuple[Path, list[str]]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("ref")
    rollouts = write_rollouts(tmp / "r.jsonl", 40, seed=3)
    run_precompute(_cfg(tmp, rollouts, tiny_llama_dir))
    return rollouts, _shard_hashes(tmp / "store")


@pytest.mark.parametrize(
    ("err", "cleanup_fails", "cause", "fix"),
    [
        (errno.ENOSPC, False, "no space left", "Free space"),
        (errno.EDQUOT, False, "no space left", "Free space"),
        (errno.EROFS, True, "read-only file system", "Remount it read-write"),
        (errno.EACCES, False, "permission denied", "write access"),
    ],
)
def test_write_faults_end_in_one_line_and_keep_what_is_stored(
    tmp_path, tiny_llama_dir, reference, capsys, monkeypatch, err, cleanup_fails, cause, fix
):
    rollouts, want = reference
    cfg = _cfg(tmp_path, rollouts, tiny_llama_dir)
    with monkeypatch.context() as m:
        _fail_writes_after(m, 2, err, cleanup_fails=cleanup_fails)
        message = _one_line_exit_2(capsys, lambda: run_precompute(cfg))
    assert cause in message and fix in message and "run the same command again" in message
    assert ".tmp-" in message or str(cfg.store) in message  # names where
    parts = sorted(p.name for p in layout.staging_root(cfg.store, "ds").glob("*/part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet"]  # kept, for the rerun
    run_precompute(cfg)
    assert _shard_hashes(cfg.store) == want


def test_cleanup_failure_does_not_hide_the_cause(tmp_path, monkeypatch) -> None:
    from lopd.storage.atomic import atomic_write

    _fail_writes_after(monkeypatch, 0, errno.ENOSPC, cleanup_fails=True)
    with pytest.raises(OSError) as exc:
        atomic_write(tmp_path / "x", lambda tmp: staging.pq.write_table(None, tmp))
    assert exc.value.errno == errno.ENOSPC


def test_a_store_that_cannot_be_created_is_named(tmp_path, tiny_llama_dir, reference, capsys, monkeypatch) -> None:
    rollouts, _ = reference
    cfg = _cfg(tmp_path, rollouts, tiny_llama_dir)
    real_mkdir = Path.mkdir

    def mkdir(self: Path, *a, **kw):  # type: ignore[no-untyped-def]
        if self == cfg.store:  # what chmod 555 on its parent does (the tests may run as root, who ignores modes)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    message = _one_line_exit_2(capsys, lambda: run_precompute(cfg))
    assert f"permission denied writing {cfg.store}" in message
    assert not cfg.store.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory modes (the monkeypatched test covers it)")
def test_read_only_directory_by_chmod(tmp_path, tiny_llama_dir, reference, capsys) -> None:
    rollouts, _ = reference
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        cfg = _cfg(parent, rollouts, tiny_llama_dir)
        assert "permission denied" in _one_line_exit_2(capsys, lambda: run_precompute(cfg))
    finally:
        parent.chmod(0o755)


def test_one_process_per_worker_index_of_a_run(tmp_path) -> None:
    from lopd.storage.writer import RunWriter
    from tests.utils.factories import make_plan, random_samples

    plan = make_plan(random_samples(10), run_key="a" * 64, dataset="ds", per_part=4)
    with RunWriter(tmp_path, plan, worker=0):
        with pytest.raises(Conflict, match="already working as worker 0"):
            RunWriter(tmp_path, plan, worker=0)
        RunWriter(tmp_path, plan, worker=1).close()  # another worker of the same run is welcome
    RunWriter(tmp_path, plan, worker=0).close()  # released with the first


@pytest.mark.slow
def test_two_identical_jobs_at_once_one_is_refused_before_scoring(tmp_path, tiny_llama_dir) -> None:
    rollouts = write_rollouts(tmp_path / "big.jsonl", 160, seed=5, long=True)
    store = tmp_path / "store"
    cmd = _cli(tmp_path, rollouts, tiny_llama_dir, store)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = [ln for ln in loser[2].splitlines() if ln.strip()]
    assert len(lines) == 1 and "already working as worker 0" in lines[0], loser[2]
    assert "Traceback" not in loser[2]
    got = Store(store).open("ds")
    assert got.manifest.version == 1 and len(got) == 160
    assert Store(store).versions("ds") == [1]
    reference = tmp_path / "ref"
    subprocess.run(_cli(tmp_path, rollouts, tiny_llama_dir, reference), check=True, capture_output=True)
    assert _shard_hashes(store) == _shard_hashes(reference)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
