"""Arrow list columns as numpy, without a Python loop over values.

Every layer reads list<number> columns (token ids, log-probs): the store's reader, the API's
encoders, the client's collation, the rollout scanner and the interop reader. They all need the
same three arrays, so they are computed here once: pyarrow's `offsets` and `values` of a sliced
list array still index the unsliced child, which is exactly what row views need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = ["ListColumn", "NullValueError", "list_column", "list_lengths", "list_rows"]


class NullValueError(ValueError):
    """A list row holds a null value; `row` is the first such row."""

    def __init__(self, row: int) -> None:
        super().__init__(f"a list row holds a null value (row {row})")
        self.row = row


@dataclass(frozen=True)
class ListColumn:
    """A list<number> column split into `offsets` (len n+1), flat `values` and the `valid` mask.

    Row `i` is `values[offsets[i]:offsets[i + 1]]`; a null row has `valid[i]` False and an empty slice.
    """

    offsets: np.ndarray
    values: np.ndarray
    valid: np.ndarray

    def __len__(self) -> int:
        return len(self.valid)

    @property
    def lengths(self) -> np.ndarray:
        """Values per row (0 for a null row), int64."""
        return np.diff(self.offsets).astype(np.int64, copy=False) * self.valid

    def flat(self) -> np.ndarray:
        """The values of the valid rows, concatenated in row order (what `pyarrow` `flatten` gives)."""
        o = self.offsets
        if self.valid.all():
            return self.values[o[0] : o[-1]]
        return np.concatenate([self.values[o[i] : o[i + 1]] for i in np.nonzero(self.valid)[0]] or [self.values[:0]])

    def row(self, i: int) -> np.ndarray | None:
        """Row `i` as a numpy view, or None when the row is null."""
        if not self.valid[i]:
            return None
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def required_rows(self, what: str = "column") -> list[np.ndarray]:
        """Every row as a numpy view; `ValueError` naming `what` if a row is null."""
        if not self.valid.all():
            raise ValueError(f"{what} has a null row at {int(np.argmin(self.valid))}")
        o, v = self.offsets, self.values
        return [v[o[i] : o[i + 1]] for i in range(len(self.valid))]

    def rows(self) -> list[np.ndarray | None]:
        """Every row as a numpy view (None for a null row)."""
        o, v, ok = self.offsets, self.values, self.valid
        return [v[o[i] : o[i + 1]] if ok[i] else None for i in range(len(ok))]


def list_column(column: pa.ChunkedArray | pa.Array, dtype: np.dtype | type | None = None) -> ListColumn:
    """Split a list (or large_list) column of numbers; `dtype` converts the values (no copy when equal).

    Raises `TypeError` when the column is not a list column, `NullValueError` (a `ValueError`) naming
    the row when a value inside a row is null (a list of numbers with holes has no numpy form).
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TypeError(f"expected a list column, got {arr.type}")
    n = len(arr)
    if n == 0:
        values = np.empty(0, dtype=dtype or arr.type.value_type.to_pandas_dtype())
        return ListColumn(np.zeros(1, dtype=np.int64), values, np.zeros(0, dtype=bool))
    offsets = arr.offsets.to_numpy()
    child = arr.values
    lo, hi = int(offsets[0]), int(offsets[-1])
    inside = child.slice(lo, hi - lo)
    if inside.null_count:
        first = lo + int(np.argmax(inside.is_null().to_numpy(zero_copy_only=False)))
        raise NullValueError(int(np.searchsorted(offsets, first, side="right")) - 1)
    values = child.to_numpy(zero_copy_only=False)
    if dtype is not None:
        values = values.astype(dtype, copy=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False) if arr.null_count else np.ones(n, dtype=bool)
    return ListColumn(offsets, values, valid)


def list_rows(column: pa.ChunkedArray | pa.Array, dtype: np.dtype | type | None = None) -> list[np.ndarray | None]:
    """A list column as one numpy view per row (None for a null row)."""
    return list_column(column, dtype).rows()


def list_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Values per row of a list column (0 for a null row), int64, from the offsets alone.

    Unlike `list_column(...).lengths` it neither reads nor checks the values, and does not combine
    the chunks of a column read from Parquet (one per row group).
    """
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for arr in chunks:
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise TypeError(f"expected a list column, got {arr.type}")
        lengths = np.diff(arr.offsets.to_numpy()).astype(np.int64, copy=False)
        if arr.null_count:
            lengths = lengths * arr.is_valid().to_numpy(zero_copy_only=False)
        parts.append(lengths)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
