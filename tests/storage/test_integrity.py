"""Checks while reading a verified version (storage/integrity.py): page checksums, stat, scrub."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from lopd.errors import Corrupt
from lopd.storage import schema
from lopd.storage.integrity import hash_file
from lopd.storage.reader import open_version
from tests.utils.factories import build_dataset

ALL = list(range(128))


def _shard(root: Path) -> Path:
    return root / "ds" / "v1" / "part-000000.parquet"


def _write_at(path: Path, offset: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([value]), offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("handle", ["opened before", "opened after"])
def test_page_checksums_catch_damage_that_stat_cannot_see(tmp_path: Path, handle: str) -> None:
    """Bit rot leaves size, mtime and inode alone: decoding with page CRCs must refuse, never return other data."""
    build_dataset(tmp_path, "ds", n=128, per_part=128, seed=3)
    shard = _shard(tmp_path)
    original = shard.read_bytes()
    want = open_version(tmp_path, "ds", 1).take(ALL)
    outcomes = {"same": 0, "corrupt": 0}
    for offset in np.linspace(0, len(original) - 1, 60).astype(int):
        ds = open_version(tmp_path, "ds", 1)
        ds.check_reads = False  # what a read sees when the stat did not change
        if handle == "opened before":
            ds.take([0])
        _write_at(shard, int(offset), original[offset] ^ 0xFF)
        try:
            got = ds.take(ALL)
        except Corrupt as e:
            assert "part-000000.parquet" in str(e)
            outcomes["corrupt"] += 1
        else:
            assert got.equals(want), f"offset {offset}: other data returned"
            outcomes["same"] += 1
        _write_at(shard, int(offset), original[offset])
    assert outcomes["corrupt"] >= 50, outcomes


def test_a_changed_stat_rehashes_before_reading(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=128, per_part=128, seed=3)
    shard = _shard(tmp_path)
    seen: list[str] = []
    ds = open_version(tmp_path, "ds", 1, on_corrupt=seen.append)
    ds.take([1])
    time.sleep(0.02)
    original = shard.read_bytes()
    _write_at(shard, 4, original[4] ^ 0xFF)  # a data page's first bytes
    with pytest.raises(Corrupt, match="sha256"):
        ds.take([1])
    with pytest.raises(Corrupt):  # damaged for good: even after a restore this object serves nothing
        _write_at(shard, 4, original[4])
        ds.take([2])
    assert len(seen) == 1 and "part-000000.parquet" in seen[0]
    # An untouched stat costs one `stat`, no hash; a `touch` re-hashes and, the bytes being right, reads on.
    fresh = open_version(tmp_path, "ds", 1)
    fresh.take([1])
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fresh.take([1]).num_rows == 1


def test_scrub_finds_damage_reads_have_not_touched(tmp_path: Path) -> None:
    build_dataset(tmp_path, "ds", n=128, per_part=64, seed=3)
    shard = tmp_path / "ds" / "v1" / "part-000001.parquet"
    seen: list[str] = []
    ds = open_version(tmp_path, "ds", 1, on_corrupt=seen.append)
    assert ds.scrub(1, bytes_per_s=None) == shard.stat().st_size
    original = shard.read_bytes()
    _write_at(shard, len(original) // 2, original[len(original) // 2] ^ 0x01)
    with pytest.raises(Corrupt, match="part-000001.parquet"):
        ds.scrub(1, bytes_per_s=None)
    assert seen and ds.damage is not None
    with pytest.raises(Corrupt):
        ds.take([0])  # another shard, but the version is damaged


def test_shards_without_page_checksums_stay_readable_and_stat_checked(tmp_path: Path, monkeypatch) -> None:
    """Stores written before page checksums: read as before, and protected by the stat + sha256 check and scrub."""
    monkeypatch.setitem(schema.PARQUET_WRITE_OPTIONS, "write_page_checksum", False)
    build_dataset(tmp_path, "ds", n=128, per_part=128, seed=3)
    shard = _shard(tmp_path)
    ds = open_version(tmp_path, "ds", 1)
    want = ds.take(ALL)
    time.sleep(0.02)
    original = shard.read_bytes()
    for offset in np.linspace(0, len(original) - 1, 10).astype(int):
        _write_at(shard, int(offset), original[offset] ^ 0xFF)
        with pytest.raises(Corrupt):
            ds.take(ALL)
        _write_at(shard, int(offset), original[offset])
        ds = open_version(tmp_path, "ds", 1)
        assert ds.take(ALL).equals(want)
        time.sleep(0.02)


def test_hash_file_keeps_to_its_rate(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    started = time.monotonic()
    assert hash_file(path, bytes_per_s=12 << 20) == hash_file(path)
    assert time.monotonic() - started >= 0.2
