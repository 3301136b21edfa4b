"""Reading a store: its catalogue of datasets, and random access to a dataset version's samples.

Readers take no lock and never write to a dataset: they only look at published versions (a
directory `vN/` with a `manifest.json`), which are immutable, so any number of processes can read
while a precompute job is writing new parts or publishing a new version. (A long-running reader,
`lopd serve`, writes one file: its lease in `.readers/`, so that `lopd gc` keeps what it reads.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lopd.errors import Corrupt, InvalidInput, NotFound

from . import layout
from .cache import RowGroupCache
from .fs import StoreDir, entries, parquet_file, read_schema, read_table, unreachable
from .integrity import FileStamp, verify_file
from .manifest import Manifest, read_manifest
from .publish import published_versions
from .schema import META_SCORED_WITH, TOKEN_COLUMNS, column_type, sample_columns, sample_schema, token_lengths
from .staging import list_staging_plans


class Store:
    """A store directory: a catalogue of datasets, each with immutable versions."""

    def __init__(self, root: str | Path | StoreDir) -> None:
        self.root = layout.check_store_path(root)
        if not (self.root / layout.STORE_MARKER).is_file():
            raise NotFound(f"{self.root} is not a lightning-opd store (no {layout.STORE_MARKER})")
        marker = json.loads((self.root / layout.STORE_MARKER).read_text())
        self.format_version = int(marker.get("format_version", 0))

    def catalogue(self) -> dict[str, list[int]]:
        """Every dataset with at least one published version, with its versions in ascending order.

        Entries of the store directory that are not datasets (hidden, files, names `validate_name`
        refuses) or that vanish while it is listed are left out.
        """
        return {name: versions for name, versions in self._dataset_dirs() if versions}

    def datasets(self) -> list[str]:
        """Names of datasets with at least one published version (the catalogue)."""
        return list(self.catalogue())

    def unpublished(self) -> list[str]:
        """Datasets with nothing published yet but a run in staging (their progress is all there is)."""
        out = []
        for name, versions in self._dataset_dirs():
            try:
                if not versions and list_staging_plans(self.root, name):
                    out.append(name)
            except OSError:  # vanished while listing
                continue
        return out

    def versions(self, name: str) -> list[int]:
        return published_versions(self.root, self._known(name))

    def manifest(self, name: str, version: int | None = None) -> Manifest:
        return self.open(name, version, verify=False).manifest

    def open(self, name: str, version: int | None = None, *, verify: bool = True) -> Dataset:
        """Open a dataset version (the latest by default); `verify` checks every file's sha256."""
        versions = self.versions(name)
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise NotFound(f"dataset {name!r} has no version {version}; versions: {versions}")
        return open_version(self.root, name, version, verify=verify)

    def _known(self, name: str) -> str:
        # Look the name up in the catalogue: a name is never joined onto a path before this check.
        layout.validate_name(name)
        if name not in self.datasets():
            raise NotFound(f"no dataset {name!r} in store {self.root}; datasets: {self.datasets()}")
        return name

    def _dataset_dirs(self) -> Iterator[tuple[str, list[int]]]:
        """(name, published versions) of every directory that may be a dataset, in name order."""
        for p in entries(self.root):
            try:
                if p.name.startswith(".") or not p.is_dir():
                    continue
                name = layout.validate_name(p.name)
                versions = published_versions(self.root, name)
            except (InvalidInput, OSError):
                continue  # not a dataset directory, or vanished while listing
            yield name, versions


def read_version_manifest(root: StoreDir, name: str, version: int) -> Manifest:
    """The manifest of `name` v`version`; `Corrupt` when it describes another version (a moved directory).

    `name` and `version` must come from `Store.catalogue()` (or `Store.versions`): the path is built from them.
    """
    manifest = read_manifest(layout.version_dir(root, name, version) / layout.MANIFEST)
    if (manifest.name, manifest.version) != (name, version):
        raise Corrupt(f"the manifest in {name}/v{version} describes {manifest.name!r} v{manifest.version}")
    return manifest


def open_version(
    root: StoreDir,
    name: str,
    version: int,
    *,
    verify: bool = True,
    on_corrupt: Callable[[str], None] | None = None,
    cache: RowGroupCache | None = None,
) -> Dataset:
    """Open a version found in the catalogue without listing the store again; `verify` checks every file's sha256.

    For callers that keep their own copy of `Store.catalogue()` (a server); others use `Store.open`.
    `on_corrupt(message)` is called when a later read finds damage (see `Dataset`); `cache` keeps
    decoded row groups (see `RowGroupCache`).
    """
    manifest = read_version_manifest(root, name, version)
    ds = Dataset(layout.version_dir(root, name, version), manifest, on_corrupt=on_corrupt, cache=cache)
    if verify:
        ds.verify()
    return ds


class Dataset:
    """One published version: manifest, integrity check, and random access by dataset index.

    After `verify()`, reads stay checked (`storage/integrity.py`): each read `stat`s its shard and
    re-hashes it first when the stamp changed since its last good sha256, and pages are decoded with
    their CRC32 verified (shards written with page checksums). Any mismatch or decode failure raises
    `Corrupt` naming the shard, marks this object damaged (every later `take` raises too) and calls
    `on_corrupt(message)` once; no damaged byte is ever returned as data.

    With a `cache`, row groups are read one by one and kept once they passed those checks; a read
    whose row groups are all cached touches no file (for object storage, where each read is a GET).
    """

    def __init__(
        self,
        path: StoreDir,
        manifest: Manifest | None = None,
        *,
        on_corrupt: Callable[[str], None] | None = None,
        cache: RowGroupCache | None = None,
    ) -> None:
        self.path = path
        self.cache = cache
        self._row_group_starts: dict[int, np.ndarray] = {}  # shard index -> first row of each row group
        self.manifest = manifest if manifest is not None else read_manifest(path / layout.MANIFEST)
        self._starts = np.array([f.first_index for f in self.manifest.files], dtype=np.int64)
        # One set of open Parquet handles per thread: a shared handle would need a lock around every
        # read, which serialised a server's concurrent requests (bench/bench_serving.py).
        self._local = threading.local()
        self._on_corrupt = on_corrupt
        self._stamps: dict[int, FileStamp] = {}  # shard index -> stamp at its last good sha256
        self._stamp_lock = threading.Lock()
        # Off only to measure their cost (bench/bench_integrity.py) or to simulate damage stat cannot see (tests).
        self.check_reads = True  # stat, and re-hash on a change, before each read
        self.verify_pages = True  # verify page CRC32s while decoding (shards written with them)
        self.damage: str | None = None

    def __len__(self) -> int:
        return self.manifest.num_samples

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    def shard_paths(self) -> list[StoreDir]:
        """The shards, in dataset order (what DuckDB queries and readers open)."""
        return [layout.version_file(self.path, f.path) for f in self.manifest.files]

    def scored_with(self) -> list[dict[str, object]]:
        """Per shard, in order, the settings its part was scored with (`schema.META_SCORED_WITH`; {} if unrecorded).

        Reads only the footers. Parts scored with other batch budgets (a resumed run) may differ within
        float rounding; this says which.
        """
        out: list[dict[str, object]] = []
        for path in self.shard_paths():
            try:
                meta = read_schema(path).metadata or {}
                raw = meta.get(META_SCORED_WITH)
                out.append(json.loads(raw) if raw else {})
            except (OSError, pa.ArrowException, ValueError) as e:
                raise Corrupt(f"{path}: unreadable Parquet footer ({e})") from e
        return out

    def verify(self) -> None:
        """Raise `Corrupt` naming the first file whose size or sha256 differs from the manifest."""
        entries = list(self.manifest.files)
        if self.manifest.coverage.skipped_file is not None:
            entries.append(self.manifest.coverage.skipped_file)
        stamps = {}
        for i, entry in enumerate(entries):
            stamp = verify_file(layout.version_file(self.path, entry.path), entry)
            if i < len(self.manifest.files) and stamp is not None:
                stamps[i] = stamp
        with self._stamp_lock:
            self._stamps = stamps

    def scrub(self, file_index: int, *, bytes_per_s: float | None, stop: threading.Event | None = None) -> int:
        """Re-hash shard `file_index` at most `bytes_per_s`; bytes read (`Corrupt`, and damaged, on a mismatch)."""
        entry = self.manifest.files[file_index]
        try:
            stamp = verify_file(self.shard_paths()[file_index], entry, bytes_per_s=bytes_per_s, stop=stop)
        except Corrupt as e:
            self._damaged(str(e))
        return 0 if stamp is None else entry.bytes

    def _check_unchanged(self, file_index: int) -> FileStamp | None:
        """Re-hash shard `file_index` if its stamp changed since its last good hash; its stamp (None: unverified)."""
        if self.damage is not None:
            raise Corrupt(self.damage)
        with self._stamp_lock:
            known = self._stamps.get(file_index)
        if known is None or not self.check_reads:
            return known
        path = self.shard_paths()[file_index]
        try:
            now = FileStamp.of(path)
        except OSError:
            now = None
        if now == known:
            return known
        with self._stamp_lock:  # one re-hash at a time; others wait, then see the new stamp
            if self._stamps.get(file_index) == now and now is not None:
                return now
            try:
                stamp = verify_file(path, self.manifest.files[file_index])
            except Corrupt as e:
                self._damaged(str(e), locked=True)
            assert stamp is not None
            self._stamps[file_index] = stamp
            return stamp

    def _damaged(self, message: str, *, locked: bool = False) -> NoReturn:
        """Mark this version damaged, tell `on_corrupt` (once) and raise `Corrupt(message)`."""
        first = self.damage is None
        if first:
            self.damage = message
        if first and self._on_corrupt is not None:
            self._on_corrupt(message)
        raise Corrupt(message)

    def token_counts(self) -> np.ndarray:
        """Tokens (prompt + response) of every sample, int64 in dataset order: what a batch token limit counts.

        Reads only the token id columns, shard by shard. Raises `Corrupt` when a shard is unreadable
        or the shards hold another number of samples than the manifest says.
        """
        parts = []
        for path in self.shard_paths():
            try:
                table = read_table(path, columns=list(TOKEN_COLUMNS), page_checksum_verification=True)
            except (OSError, pa.ArrowException) as e:
                raise Corrupt(f"{path}: unreadable Parquet ({e})") from e
            prompt, response = token_lengths(table)
            parts.append(prompt + response)
        counts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if counts.size != len(self):
            raise Corrupt(f"the shards hold {counts.size} samples, the manifest says {len(self)}")
        return counts

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        cols = list(columns) if columns is not None else list(sample_columns(self.manifest.provenance.top_k))
        tables = [read_table(p, columns=cols, page_checksum_verification=True) for p in self.shard_paths()]
        if not tables:
            return sample_schema(self.manifest.provenance.top_k).empty_table().select(cols)
        return pa.concat_tables(tables).replace_schema_metadata(None)

    def take(self, indices: Sequence[int] | np.ndarray, columns: Sequence[str] | None = None) -> pa.Table:
        """The samples at `indices` (dataset order numbers), in the order requested.

        Reads only the row groups that hold them (64 samples each by default).
        """
        idx = np.asarray(indices, dtype=np.int64)
        cols = list(columns) if columns is not None else list(sample_columns(self.manifest.provenance.top_k))
        if self.damage is not None:
            raise Corrupt(self.damage)
        if idx.size == 0:
            return sample_schema(self.manifest.provenance.top_k).empty_table().select(cols)
        n = len(self)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise InvalidInput(f"index {int(bad[0])} is out of range for {self.name!r} v{self.version} (0..{n - 1})")
        file_of = np.searchsorted(self._starts, idx, side="right") - 1
        pieces: list[pa.Table] = []
        positions = np.empty(idx.size, dtype=np.int64)
        offset = 0
        for f in np.unique(file_of):
            sel = np.nonzero(file_of == f)[0]
            local = idx[sel] - self._starts[f]
            table, where = self._read_rows(int(f), local, cols)
            pieces.append(table)
            positions[sel] = offset + where
            offset += table.num_rows
        return pa.concat_tables(pieces).take(pa.array(positions)).replace_schema_metadata(None)

    def _read_rows(self, file_index: int, local: np.ndarray, cols: list[str]) -> tuple[pa.Table, np.ndarray]:
        """Read the row groups covering `local` rows; return them and each row's position in the result."""
        if self.cache is not None:
            cached = self._cached_rows(file_index, local, cols)
            if cached is not None:
                return cached
        stamp = self._check_unchanged(file_index)
        try:
            pf = self._parquet(file_index, stamp)
            md = pf.metadata
            rg_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
            rg_of = np.searchsorted(rg_starts, local, side="right") - 1
            groups = np.unique(rg_of)
            if self.cache is None:
                table = pf.read_row_groups([int(g) for g in groups], columns=cols)
            else:  # one table per group, so that each cache entry owns its buffers
                pieces = [pf.read_row_group(int(g), columns=cols) for g in groups]
                table = pa.concat_tables(pieces)
            expected = int(sum(md.row_group(int(g)).num_rows for g in groups))
            if table.num_rows != expected or table.column_names != cols:
                raise ValueError(
                    f"decoded {table.num_rows} rows of {table.column_names}, expected {expected} of {cols}"
                )
            for name in cols:
                if not table.schema.field(name).type.equals(column_type(name), check_metadata=False):
                    raise ValueError(f"column {name} decoded as {table.schema.field(name).type}")
        except (OSError, pa.ArrowException, ValueError, KeyError, IndexError) as e:
            if isinstance(e, OSError) and (transient := unreachable(self.path, e)) is not None:
                raise transient from e  # the service did not answer: no evidence about the bytes
            name = self.manifest.files[file_index].path
            self._damaged(f"{self.path / name}: unreadable Parquet ({type(e).__name__}: {e})")
        if self.cache is not None:
            self._row_group_starts[file_index] = rg_starts
            for g, piece in zip(groups, pieces):
                self.cache.put(self._cache_key(file_index, int(g), cols), piece)
        base = {int(g): int(sum(md.row_group(int(h)).num_rows for h in groups[:k])) for k, g in enumerate(groups)}
        where = np.array([base[int(g)] + int(r - rg_starts[g]) for r, g in zip(local, rg_of)], dtype=np.int64)
        return table, where

    def _cache_key(self, file_index: int, group: int, cols: list[str]) -> tuple[str, int, tuple[str, ...]]:
        return (self.manifest.files[file_index].sha256, group, tuple(cols))

    def _cached_rows(self, file_index: int, local: np.ndarray, cols: list[str]) -> tuple[pa.Table, np.ndarray] | None:
        """`_read_rows` from the cache alone, or None when a row group (or the shard's layout) is not cached."""
        assert self.cache is not None
        rg_starts = self._row_group_starts.get(file_index)
        if rg_starts is None:
            return None
        rg_of = np.searchsorted(rg_starts, local, side="right") - 1
        groups = np.unique(rg_of)
        pieces = []
        for g in groups:
            piece = self.cache.get(self._cache_key(file_index, int(g), cols))
            if piece is None:
                return None
            pieces.append(piece)
        sizes = np.diff(rg_starts)
        base = {int(g): int(sizes[groups[:k]].sum()) for k, g in enumerate(groups)}
        where = np.array([base[int(g)] + int(r - rg_starts[g]) for r, g in zip(local, rg_of)], dtype=np.int64)
        return pa.concat_tables(pieces), where

    def _parquet(self, file_index: int, stamp: FileStamp | None) -> pq.ParquetFile:
        # A handle is kept per thread for the stamp it was opened under: a replaced file is reopened.
        files: dict[int, tuple[FileStamp | None, pq.ParquetFile]] = self._local.__dict__.setdefault("files", {})
        held = files.get(file_index)
        if held is None or held[0] != stamp:
            pf = parquet_file(self.shard_paths()[file_index], page_checksum_verification=self.verify_pages)
            files[file_index] = held = (stamp, pf)
        return held[1]
