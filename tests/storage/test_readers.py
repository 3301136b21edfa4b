"""Reader leases: what a live reader says it reads, and when that stops counting."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from lopd.storage import layout
from lopd.storage.readers import LEASE_TTL_S, READ_IDLE_S, ReaderLease, read_leases, versions_being_read
from tests.utils.factories import build_dataset


def test_a_lease_lists_what_was_read_until_it_expires_or_closes(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=10, per_part=5)
    now = time.time()
    reads = {("ds", 1): now - 5}
    lease = ReaderLease(tmp_path, lambda: reads)
    lease.start()
    try:
        assert lease.path.parent == layout.readers_dir(tmp_path) and lease.path.is_file()
        assert versions_being_read(tmp_path) == {("ds", 1): [lease.path.stem]}
        (record,) = read_leases(tmp_path).values()
        assert record is not None and record.pid == os.getpid()
        # A crashed reader's lease protects until it expires, then nothing.
        assert versions_being_read(tmp_path, now + LEASE_TTL_S - 30) == {("ds", 1): [lease.path.stem]}
        assert versions_being_read(tmp_path, now + LEASE_TTL_S + 30) == {}
        # A version nobody read for READ_IDLE_S is no longer being read, live lease or not.
        reads[("ds", 1)] = time.time() - READ_IDLE_S - 1
        lease.renew()
        assert versions_being_read(tmp_path) == {}
    finally:
        lease.close()
    assert not lease.path.exists() and versions_being_read(tmp_path) == {}


def test_the_lease_is_renewed_in_the_background(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=10, per_part=5)
    reads: dict = {}
    lease = ReaderLease(tmp_path, lambda: dict(reads), renew_s=0.05)
    lease.start()
    try:
        first = read_leases(tmp_path)[lease.path]
        reads[("ds", 1)] = time.time()
        deadline = time.monotonic() + 5
        while ("ds", 1) not in versions_being_read(tmp_path):
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.02)
        assert first is not None and read_leases(tmp_path)[lease.path].renewed_at > first.renewed_at  # type: ignore[union-attr]
    finally:
        lease.close()


def test_no_store_no_lease_and_an_unwritable_store_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nowhere"
    lease = ReaderLease(missing, dict)
    lease.start()
    lease.close()
    assert not missing.exists()  # a reader never creates a store

    # A store the server cannot write to (a read-only mount; here `.readers` cannot be a directory, which
    # fails for root too): it serves anyway, says once that gc cannot see it, and keeps trying.
    build_dataset(tmp_path / "ro", "ds", n=4, per_part=4)
    layout.readers_dir(tmp_path / "ro").write_text("")
    lease = ReaderLease(tmp_path / "ro", dict)
    with caplog.at_level(logging.WARNING, logger="lopd.storage.readers"):
        lease.start()
        assert lease.renew() is False
    lease.close()
    assert sum("cannot register as a reader" in r.getMessage() for r in caplog.records) == 1


def test_unreadable_lease_files_protect_nothing(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=4, per_part=4)
    layout.readers_dir(tmp_path).mkdir()
    (layout.readers_dir(tmp_path) / "garbage.json").write_text("{not json")
    assert read_leases(tmp_path) == {layout.readers_dir(tmp_path) / "garbage.json": None}
    assert versions_being_read(tmp_path) == {}
