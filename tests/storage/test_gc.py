"""`collect_garbage`: old versions and abandoned runs go; the newest, what is read and what is written stay."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lopd.errors import InvalidInput, NotFound
from lopd.storage import gc as gc_module
from lopd.storage import layout
from lopd.storage.gc import collect_garbage
from lopd.storage.reader import Store
from lopd.storage.readers import LEASE_TTL_S, ReaderLease
from lopd.storage.staging import Staging, staged_runs
from lopd.storage.writer import RunWriter
from tests.utils.factories import build_dataset, make_plan, random_samples, write_parts

DAY = 86400.0


def three_versions(store: Path, name: str = "ds") -> None:
    for seed in (1, 2, 3):
        build_dataset(store, name, n=12, per_part=5, seed=seed)
    assert Store(store).versions(name) == [1, 2, 3]


def names(items) -> list[str]:  # type: ignore[no-untyped-def]
    return [i.name for i in items]


def staged_run(store: Path, name: str, *, done: set[int], seed: int, age_s: float = 0.0) -> Path:
    """A run that wrote only the parts in `done`, last touched `age_s` ago, with no worker alive."""
    samples = random_samples(12, seed)
    plan = make_plan(samples, run_key=f"{seed:04d}" + "f" * 60, dataset=name, per_part=4)
    with RunWriter(store, plan) as run:
        write_parts(run.staging, run.plan, samples, only=done)
    directory = run.staging.dir
    if age_s:
        then = time.time() - age_s
        for p in [directory, *directory.iterdir()]:
            os.utime(p, (then, then))
    return directory


def test_keeps_the_newest_n_and_never_the_newest(tmp_path: Path) -> None:
    three_versions(tmp_path)
    with pytest.raises(InvalidInput, match="at least 1"):
        collect_garbage(tmp_path, "ds", keep=0)
    with pytest.raises(NotFound, match="no dataset 'nope'"):
        collect_garbage(tmp_path, "nope", keep=1)

    dry = collect_garbage(tmp_path, "ds", keep=2, dry_run=True)
    assert names(dry.removed) == ["v1"] and dry.bytes_freed > 0
    assert Store(tmp_path).versions("ds") == [1, 2, 3]  # a dry run removes nothing

    report = collect_garbage(tmp_path, "ds", keep=1)
    assert names(report.removed) == ["v1", "v2"] and names(report.kept) == ["v3"]
    assert report.kept[0].reason == "the newest version"
    assert Store(tmp_path).versions("ds") == [3]
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [".lock", "v3"]
    Store(tmp_path).open("ds", verify=True)  # what is left is intact
    assert collect_garbage(tmp_path, "ds", keep=1).removed == []


def test_a_version_listed_by_a_live_lease_is_kept_until_the_lease_expires(tmp_path: Path) -> None:
    three_versions(tmp_path)
    lease = ReaderLease(tmp_path, lambda: {("ds", 1): time.time()})
    lease.start()
    try:
        report = collect_garbage(tmp_path, "ds", keep=1)
        assert names(report.removed) == ["v2"]
        (kept_v1,) = [i for i in report.kept if i.name == "v1"]
        assert kept_v1.reason == f"being read ({lease.path.stem})"
        assert Store(tmp_path).versions("ds") == [1, 3]
        # A reader that crashed leaves its lease: it protects until it expires, then gc removes both.
        later = time.time() + LEASE_TTL_S + 1
        report = collect_garbage(tmp_path, "ds", keep=1, now=later)
        assert names(report.removed) == ["v1", lease.path.name]
        assert Store(tmp_path).versions("ds") == [3] and not lease.path.exists()
    finally:
        lease.close()


def test_a_reader_that_registers_while_gc_removes_gets_the_version_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_versions(tmp_path)
    looks = iter([{}, {("ds", 1): ["late-reader"]}, {}, {}])
    monkeypatch.setattr(gc_module, "versions_being_read", lambda *a, **k: next(looks))
    report = collect_garbage(tmp_path, "ds", keep=1)
    assert names(report.removed) == ["v2"]
    assert [i.reason for i in report.kept if i.name == "v1"] == ["being read (late-reader)"]
    assert Store(tmp_path).versions("ds") == [1, 3]
    Store(tmp_path).open("ds", 1, verify=True)


def test_removal_is_crash_safe_and_open_files_stay_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    three_versions(tmp_path)
    ds = Store(tmp_path).open("ds", 1)
    shard = pq.ParquetFile(ds.shard_paths()[0])  # a reader that opened v1 before gc

    real_rmtree = shutil.rmtree

    def crash_midway(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        next(Path(path).glob("part-*.parquet")).unlink()
        raise KeyboardInterrupt  # gc killed while deleting

    monkeypatch.setattr(gc_module.shutil, "rmtree", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        collect_garbage(tmp_path, "ds", keep=2)
    monkeypatch.setattr(gc_module.shutil, "rmtree", real_rmtree)

    (tomb,) = [p for p in (tmp_path / "ds").iterdir() if layout.is_tombstone(p.name)]
    assert tomb.name.startswith(".gc-v1-") and not (tomb / "manifest.json").exists()  # the manifest goes first
    assert Store(tmp_path).versions("ds") == [2, 3]  # a half-deleted tombstone is not a version
    assert shard.read().num_rows == 5  # the open file is still readable (POSIX)

    report = collect_garbage(tmp_path, "ds", keep=2)
    assert [(i.kind, i.name) for i in report.removed] == [("tombstone", tomb.name)]
    assert not tomb.exists() and Store(tmp_path).versions("ds") == [2, 3]


def test_a_gc_killed_before_its_second_look_restores_a_version_a_reader_wants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_versions(tmp_path)
    looks = iter([{}])

    def killed_on_second_look(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return next(looks)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr(gc_module, "versions_being_read", killed_on_second_look)
    with pytest.raises(KeyboardInterrupt):
        collect_garbage(tmp_path, "ds", keep=1)
    monkeypatch.undo()
    (tomb,) = [p for p in (tmp_path / "ds").iterdir() if layout.is_tombstone(p.name)]
    assert (tomb / "manifest.json").is_file() and Store(tmp_path).versions("ds") == [2, 3]

    lease = ReaderLease(tmp_path, lambda: {("ds", 1): time.time()})  # a server registered for v1 meanwhile
    lease.start()
    try:
        dry = collect_garbage(tmp_path, "ds", keep=1, dry_run=True)
        assert [i.reason for i in dry.kept if i.name == "v1"] == [
            f"restored from a tombstone: being read ({lease.path.stem})"
        ]
        assert tomb.exists()
        report = collect_garbage(tmp_path, "ds", keep=1)
        assert [i.name for i in report.kept if i.reason.startswith("restored")] == ["v1"]
        assert names(report.removed) == ["v2"] and not tomb.exists()
        Store(tmp_path).open("ds", 1, verify=True)
    finally:
        lease.close()


def test_publisher_temporaries_are_removed(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=5, per_part=5)
    left = tmp_path / "ds" / ".tmp-v2-deadbeef"
    left.mkdir()
    (left / "part-000000.parquet").write_bytes(b"x" * 10)
    report = collect_garbage(tmp_path, "ds", keep=1)
    assert [(i.kind, i.name, i.bytes) for i in report.removed] == [("temporary", left.name, 10)]
    assert not left.exists()


def test_staging_runs_abandoned_live_recent_and_complete(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=5, per_part=5)
    abandoned = staged_run(tmp_path, "ds", done={0}, seed=11, age_s=10 * DAY)
    recent = staged_run(tmp_path, "ds", done={0}, seed=12, age_s=3600)
    complete = staged_run(tmp_path, "ds", done={0, 1, 2}, seed=13, age_s=10 * DAY)
    live_dir = staged_run(tmp_path, "ds", done={1}, seed=14, age_s=10 * DAY)
    samples = random_samples(12, 14)
    worker = RunWriter(tmp_path, make_plan(samples, run_key="0014" + "f" * 60, dataset="ds", per_part=4))
    then = time.time() - 10 * DAY
    for p in [live_dir, *live_dir.iterdir()]:
        os.utime(p, (then, then))
    try:
        dry = collect_garbage(tmp_path, "ds", keep=1, dry_run=True)
        assert [i.path for i in dry.removed] == [str(abandoned.relative_to(tmp_path))]
        assert abandoned.exists()

        report = collect_garbage(tmp_path, "ds", keep=1)
        assert names(report.removed) == [f"{abandoned.name} (1/3 parts)"]
        reasons = {i.name.split()[0]: i.reason for i in report.kept if i.kind == "run"}
        assert reasons[live_dir.name] == "a worker is writing it"
        assert reasons[complete.name].startswith("complete but not published: run `lopd finalize")
        assert reasons[recent.name].startswith("last written 1h ago (abandoned after 7d)")
        assert not abandoned.exists() and recent.exists() and complete.exists() and live_dir.exists()
        # With a shorter threshold the recent run goes too; the live worker's still stays.
        report = collect_garbage(tmp_path, "ds", keep=1, staging_older_than_s=60)
        assert names(report.removed) == [f"{recent.name} (1/3 parts)"]
        assert live_dir.exists()
    finally:
        worker.close()
    assert names(collect_garbage(tmp_path, "ds", keep=1, staging_older_than_s=60).removed) == [
        f"{live_dir.name} (1/3 parts)"
    ]
    assert [r.path for r in staged_runs(tmp_path, "ds")] == [complete]


def test_a_worker_that_arrives_after_gc_starts_a_fresh_run(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=5, per_part=5)
    old = staged_run(tmp_path, "ds", done={0, 1}, seed=21, age_s=10 * DAY)
    collect_garbage(tmp_path, "ds", keep=1)
    assert not old.exists() and not layout.staging_root(tmp_path, "ds").exists()  # the empty .staging/ goes too
    samples = random_samples(12, 21)
    with RunWriter(tmp_path, make_plan(samples, run_key="0021" + "f" * 60, dataset="ds", per_part=4)) as run:
        assert run.staging.dir == old and run.todo() == run.plan.parts  # nothing of the removed run is reused
        for part in run.todo():
            write_parts(run.staging, run.plan, samples, only={part.index})
        assert run.publish().version == 2


def test_publishing_removes_an_empty_staging_directory_but_not_a_busy_one(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=5, per_part=5)
    assert not layout.staging_root(tmp_path, "ds").exists()
    other = Staging(tmp_path, "ds", "9" * 64)
    with other.hold():  # another run's worker is there: .staging/ stays
        build_dataset(tmp_path, "ds", n=6, per_part=5, seed=5)
        assert layout.staging_root(tmp_path, "ds").is_dir() and other.dir.is_dir()
