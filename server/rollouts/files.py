"""Rollout files as bytes and rows: which files, their fingerprint, their raw records, and reading some back.

Everything here knows file formats (JSONL, gzipped JSONL, Parquet) and nothing about what a record
means; `records` interprets the raw items (a JSONL line as bytes, a Parquet row as a dict of the
columns the caller asked for) that `iter_items` and `read_items` yield. Items are located by an
offset whose meaning depends on the format (see `RecordRef`): a byte offset in plain JSONL, a line
index in `.jsonl.gz` (gzip cannot seek), a row index in Parquet.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lopd.errors import InvalidInput

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
ROLLOUT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
_PARQUET_BATCH_ROWS = 512
_HASH_BLOCK = 8 * 2**20


# ----------------------------------------------------------------------------------------- paths


def rollout_file_kind(path: Path) -> str | None:
    """`jsonl`, `jsonl.gz` or `parquet` by the file's suffix; None for any other file."""
    name = path.name.lower()
    if name.endswith(".jsonl.gz"):
        return "jsonl.gz"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def expand_rollout_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The rollout files named by `paths`, in order; a directory stands for its rollout files, sorted.

    In a directory, files with other suffixes (READMEs, `.crc`) and hidden files (names starting
    with `.` or `_`, as Spark and Hadoop write them) are skipped; subdirectories are not read.
    A missing path, a file with an unknown suffix, a directory without rollout files, or a file
    named twice raises `InvalidInput` naming it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InvalidInput(
            "no rollout files given; pass one or more .jsonl, .jsonl.gz or .parquet files or directories"
        )
    out: list[Path] = []
    seen: dict[Path, str] = {}
    for given in paths:
        p = Path(given)
        if p.is_dir():
            files = sorted(
                c
                for c in p.iterdir()
                if c.is_file() and rollout_file_kind(c) is not None and not c.name.startswith((".", "_"))
            )
            if not files:
                raise InvalidInput(f"rollout directory {p} contains no rollout files ({', '.join(ROLLOUT_SUFFIXES)})")
        elif p.is_file():
            if rollout_file_kind(p) is None:
                hint = ""
                if p.name.lower().endswith((".json", ".json.gz")):
                    hint = (
                        "; if it holds one JSON object per line (as Hugging Face's Dataset.to_json writes by "
                        "default), give it a .jsonl (or .jsonl.gz) name"
                    )
                raise InvalidInput(
                    f"rollout file {p} has an unknown suffix; expected one of {', '.join(ROLLOUT_SUFFIXES)}{hint}"
                )
            files = [p]
        elif p.exists():
            raise InvalidInput(f"rollout path {p} is neither a file nor a directory")
        else:
            raise InvalidInput(f"rollout path {p} does not exist")
        for f in files:
            key = f.resolve()
            if key in seen:
                raise InvalidInput(f"rollout file {f} is given more than once (also as {seen[key]})")
            seen[key] = str(f)
            out.append(f)
    return out


def display_names(paths: Sequence[Path]) -> list[str]:
    """File names to show in locators; full paths when two inputs share a file name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


class InputHasher:
    """The inputs' fingerprint (`rollout_files_fingerprint`), computed while the files are read in order.

    Each file adds its size (8 bytes, little-endian), then its bytes: `add_file` for a whole file, or
    `add_size` then `add_bytes` for a file read piece by piece.
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add_size(self, size: int) -> None:
        self._h.update(struct.pack("<Q", size))

    def add_bytes(self, data: bytes) -> None:
        self._h.update(data)

    def add_file(self, path: Path) -> None:
        """Size and bytes of a whole file; `InvalidInput` if its size changes while it is read."""
        size = path.stat().st_size
        self.add_size(size)
        read = 0
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                self._h.update(block)
                read += len(block)
        if read != size:
            raise InvalidInput(f"rollout file {path} changed while it was being read")

    @property
    def fingerprint(self) -> str:
        """`sha256:<hex>` over what was added so far."""
        return "sha256:" + self._h.hexdigest()


def rollout_files_fingerprint(paths: Sequence[str | Path]) -> str:
    """`sha256:<hex>` over the files' bytes in order, each preceded by its size (8 bytes, little-endian).

    `scan_rollouts` computes the same value as `RolloutScan.input_fingerprint` while it reads;
    this recomputes it without parsing, e.g. to check that inputs did not change before resuming.
    """
    hasher = InputHasher()
    for p in paths:
        hasher.add_file(Path(p))
    return hasher.fingerprint


# ------------------------------------------------------------------------------------ raw items


def iter_items(
    path: Path, fields: Sequence[str], hasher: InputHasher
) -> Iterator[tuple[int, int, bytes | dict[str, Any]]]:
    """(offset, position, item) for every item of a rollout file, in order; adds the file to `hasher`.

    JSONL: every non-blank line as bytes, at its 1-based line number. Parquet: every row as a dict of
    those of `fields` that are columns (list<number> values as numpy views), at its 0-based row index.
    Unreadable files raise `InvalidInput`.
    """
    kind = rollout_file_kind(path)
    if kind == "parquet":
        for row, obj in _iter_parquet(path, fields, hasher):
            yield row, row, obj
    else:
        yield from _iter_jsonl(path, kind != "jsonl", hasher)


def read_items(
    path: Path, wanted: list[tuple[int, int]], fields: Sequence[str]
) -> Iterator[tuple[int, bytes | dict[str, Any]]]:
    """(key, item) for (key, offset) pairs, in file order; offsets are those `iter_items` yielded.

    Seeks to byte offsets in plain JSONL, reads `.jsonl.gz` in one pass, and reads only the needed
    row groups of Parquet. A file that changed since (fewer lines or rows) raises `InvalidInput`.
    """
    kind = rollout_file_kind(path)
    if kind == "parquet":
        yield from _load_parquet(path, wanted, fields)
    elif kind == "jsonl.gz":
        yield from _load_jsonl_gz(path, wanted)
    else:
        yield from _load_jsonl(path, wanted)


def _iter_jsonl(path: Path, gzipped: bool, hasher: InputHasher) -> Iterator[tuple[int, int, bytes]]:
    """(offset, 1-based line number, line) for every non-blank line; hashes a plain file's bytes as it reads."""
    if not gzipped:
        size = path.stat().st_size
        hasher.add_size(size)
        pos = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                hasher.add_bytes(line)
                start, pos = pos, pos + len(line)
                if line.strip():
                    yield start, lineno, line
        if pos != size:
            raise InvalidInput(f"rollout file {path} changed while it was being read")
        return
    hasher.add_file(path)
    lineno = 0
    try:
        with gzip.open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno - 1, lineno, line
    except (OSError, EOFError, zlib.error) as e:
        raise InvalidInput(f"cannot read {path} (after line {lineno}): {e}; is it a complete gzip file?") from e


def _row_getter(col: Any) -> Callable[[int], Any]:
    """Row `i` of a batch column: a numpy view for list<number> columns, else the Python value.

    A list<number> column with a null inside a row stays Python, so the record's check can name the null.
    """
    import pyarrow as pa

    from lopd.arrow import list_column

    t = col.type
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
    ):
        try:
            return list_column(col).row
        except ValueError:
            pass
    return col.to_pylist().__getitem__


def _batch_rows(batch: Any) -> tuple[list[str], list[Callable[[int], Any]]]:
    return list(batch.schema.names), [_row_getter(c) for c in batch.columns]


def _parquet_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path}: {e}") from e


def _parquet_columns(pf: Any, fields: Sequence[str]) -> list[str]:
    names = set(pf.schema_arrow.names)
    return [c for c in fields if c in names]


def _iter_parquet(path: Path, fields: Sequence[str], hasher: InputHasher) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, row as a dict of the wanted fields) for every row, reading batches of rows."""
    import pyarrow as pa

    hasher.add_file(path)
    pf = _parquet_file(path)
    columns = _parquet_columns(pf, fields)
    row = 0
    try:
        if not columns:
            for row in range(pf.metadata.num_rows):
                yield row, {}
            return
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            names, rows = _batch_rows(batch)
            for i in range(batch.num_rows):
                yield row, {n: r(i) for n, r in zip(names, rows)}
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path} (near row {row}): {e}") from e


# ---------------------------------------------------------------------------------- read back


def _load_jsonl(path: Path, wanted: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(request index, line) for (request index, offset) pairs; offsets are byte offsets."""
    with open(path, "rb") as f:
        for k, offset in sorted(wanted, key=lambda kv: kv[1]):
            f.seek(offset)
            yield k, f.readline()


def _load_jsonl_gz(path: Path, wanted: list[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(request index, line) for (request index, 0-based line index) pairs, in one pass over the file."""
    by_line: dict[int, list[int]] = {}
    for k, line_index in wanted:
        by_line.setdefault(line_index, []).append(k)
    last = max(by_line)
    try:
        with gzip.open(path, "rb") as f:
            for i, line in enumerate(f):
                for k in by_line.get(i, ()):
                    yield k, line
                if i >= last:
                    return
    except (OSError, EOFError, zlib.error) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from e
    raise InvalidInput(f"rollout file {path} changed since it was scanned: it has fewer than {last + 1} lines")


def _load_parquet(
    path: Path, wanted: list[tuple[int, int]], fields: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(request index, row) for (request index, row index) pairs, reading only the row groups needed."""
    import pyarrow as pa

    pf = _parquet_file(path)
    columns = _parquet_columns(pf, fields)
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    by_group: dict[int, list[tuple[int, int]]] = {}
    for k, row in wanted:
        if not 0 <= row < starts[-1]:
            raise InvalidInput(f"rollout file {path} changed since it was scanned: it has no row {row}")
        g = int(np.searchsorted(starts, row, side="right")) - 1
        by_group.setdefault(g, []).append((k, row))
    try:
        for g in sorted(by_group):
            if not columns:
                for k, _ in by_group[g]:
                    yield k, {}
                continue
            todo = sorted(by_group[g], key=lambda kv: kv[1])
            j = 0
            start = int(starts[g])
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=[g], columns=columns):
                end = start + batch.num_rows
                if j < len(todo) and todo[j][1] < end:
                    names, rows = _batch_rows(batch)
                    while j < len(todo) and todo[j][1] < end:
                        k, row = todo[j]
                        yield k, {n: r(row - start) for n, r in zip(names, rows)}
                        j += 1
                start = end
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path}: {e}") from e
