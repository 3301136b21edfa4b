"""The two phases: `scan_rollouts` validates every record once and keeps light refs; `load_rollouts` reads refs back.

Also the dataclasses they return. File access is in `files`; what a raw item (a JSONL line or a
Parquet row) holds is read by `records.read_entries`: one record for a flat record, one per output
for a vLLM `RequestOutput` line.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lopd.errors import InvalidInput

from .fields import RECORD_FIELDS, RecordEntry
from .files import InputHasher, display_names, expand_rollout_paths, iter_items, read_items, rollout_file_kind
from .records import read_entries


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A valid record, light: where to find it again, and its sizes.

    `offset` is the byte offset of the record's line in a plain JSONL file, the 0-based line index
    in a `.jsonl.gz` file (gzip cannot seek), and the 0-based row index in a Parquet file. `output`
    is the record's position in the `outputs` of a vLLM `RequestOutput` line (which holds several
    records), None for a flat record.
    """

    id: str
    source: int
    offset: int
    prompt_len: int
    response_len: int
    has_rollout_logprobs: bool
    retokenized: bool
    output: int | None = None


@dataclass(frozen=True)
class Rollout:
    """One rollout with its tokens, ready to score."""

    id: str
    prompt_ids: np.ndarray  # int32
    response_ids: np.ndarray  # int32
    rollout_logprobs: np.ndarray | None  # float32, same length as response_ids
    retokenized: bool


@dataclass
class RolloutScan:
    """What `scan_rollouts` found: the valid records, the bad ones, and a fingerprint of the input."""

    paths: list[Path]
    records: list[RecordRef]  # the valid records, in input order (files in order, then lines/rows)
    problems: list[tuple[str, str]]  # (id or locator, reason) for every bad record, in input order
    total: int  # records seen
    retokenized: int  # valid records that came as text
    input_fingerprint: str  # "sha256:<hex>" over the input files' bytes

    @property
    def num_tokens(self) -> int:
        """Response tokens of the valid records (the positions the teacher scores)."""
        return sum(r.response_len for r in self.records)


# ------------------------------------------------------------------------------------------- scan


def _check_positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise InvalidInput(f"{name} must be a positive integer, got {v!r}")


def scan_rollouts(
    paths: Sequence[str | Path],
    tokenizer: Any,
    *,
    vocab_size: int,
    max_context: int,
    progress: bool = False,
) -> RolloutScan:
    """Validate every record of the rollout files, keeping only a `RecordRef` per valid record.

    Bad records do not raise: they are returned in `problems` as (id, reason), or (locator, reason)
    when the record has no usable id. Locators are `file:LINE` (1-based) for JSONL and
    `file:row ROW` (0-based) for Parquet, with the file's name (its path when two inputs share a
    name); the reasons of records from a vLLM `RequestOutput` line start with it. The first record
    with an id (in input order: files in order, then lines or rows) owns it, valid or not; every
    later record with that id is bad, and its reason names both locations. `tokenizer` may be None
    when every record gives token ids. Unusable paths and unreadable files raise `InvalidInput`.
    """
    _check_positive("vocab_size", vocab_size)
    _check_positive("max_context", max_context)
    files = expand_rollout_paths(paths)
    names = display_names(files)
    hasher = InputHasher()

    entries: list[Any] = []  # RecordRef for a valid record, (label, reason) for a bad one
    ent_source = array("q")
    ent_pos = array("q")  # JSONL: 1-based line number; Parquet: 0-based row
    ent_output = array("q")  # position in a RequestOutput line's outputs; -1 for flat records
    first_at: dict[str, int] = {}
    dups: dict[str, list[int]] = {}

    from tqdm.auto import tqdm

    bar = tqdm(desc="scan rollouts", unit=" rec", disable=not progress)
    shown = 0  # records counted on the bar
    try:
        for source, path in enumerate(files):
            kind = rollout_file_kind(path)
            for offset, pos, item in iter_items(path, RECORD_FIELDS, hasher):
                where = _locator(names, kind, source, pos)
                for entry in read_entries(item, tokenizer, vocab_size, max_context, where):
                    idx = len(entries)
                    ent_source.append(source)
                    ent_pos.append(pos)
                    ent_output.append(-1 if entry.output is None else entry.output)
                    rid, parsed = entry.rid, entry.parsed
                    if parsed is not None and rid is not None:
                        entries.append(
                            RecordRef(
                                id=rid,
                                source=source,
                                offset=offset,
                                prompt_len=int(parsed.prompt_ids.size),
                                response_len=int(parsed.response_ids.size),
                                has_rollout_logprobs=parsed.rollout_logprobs is not None,
                                retokenized=parsed.retokenized,
                                output=entry.output,
                            )
                        )
                    else:
                        label = rid if rid is not None else _locator(names, kind, source, pos, entry.output)
                        reason = f"{where}: {entry.problem}" if entry.nested else str(entry.problem)
                        entries.append((label, reason))
                    if rid is not None:
                        first = first_at.setdefault(rid, idx)
                        if first != idx:
                            dups.setdefault(rid, [first]).append(idx)
                if len(entries) - shown >= 256:
                    bar.update(len(entries) - shown)
                    shown = len(entries)
        bar.update(len(entries) - shown)
    finally:
        bar.close()

    kinds = [rollout_file_kind(p) for p in files]

    def where_is(j: int) -> str:
        return _locator(names, kinds[ent_source[j]], ent_source[j], ent_pos[j], ent_output[j])

    for rid, idxs in dups.items():
        # The first record with an id owns it; every later one is a duplicate naming both places.
        owner = where_is(idxs[0])
        fate = "kept" if isinstance(entries[idxs[0]], RecordRef) else "not kept either: it is invalid"
        for idx in idxs[1:]:
            message = f"duplicate id: {where_is(idx)} repeats the id of {owner} ({fate})"
            e = entries[idx]
            entries[idx] = (rid, message) if isinstance(e, RecordRef) else (e[0], f"{e[1]}; also, {message}")

    records = [e for e in entries if isinstance(e, RecordRef)]
    problems = [e for e in entries if not isinstance(e, RecordRef)]
    return RolloutScan(
        paths=files,
        records=records,
        problems=problems,
        total=len(entries),
        retokenized=sum(r.retokenized for r in records),
        input_fingerprint=hasher.fingerprint,
    )


def _locator(names: list[str], kind: str | None, source: int, pos: int, output: int | None = None) -> str:
    where = f"{names[source]}:row {pos}" if kind == "parquet" else f"{names[source]}:{pos}"
    return where if output is None or output < 0 else f"{where} outputs[{output}]"


def load_rollouts(scan: RolloutScan, refs: Sequence[RecordRef], tokenizer: Any) -> list[Rollout]:
    """Read exactly these records back, in the order of `refs`.

    Text forms are re-tokenized the same way `scan_rollouts` did (so pass the same tokenizer). A line
    that holds several records (a vLLM `RequestOutput`) is read and parsed once for all of them.
    Raises `InvalidInput` when a record no longer matches its ref (the file changed since the scan).
    """
    by_source: dict[int, dict[int, list[int]]] = {}  # source -> offset -> indices into refs
    for k, ref in enumerate(refs):
        if not 0 <= ref.source < len(scan.paths):
            raise InvalidInput(
                f"record {ref.id!r} refers to input file #{ref.source}, but the scan has {len(scan.paths)} files"
            )
        by_source.setdefault(ref.source, {}).setdefault(ref.offset, []).append(k)

    out: list[Rollout | None] = [None] * len(refs)
    for source, by_offset in by_source.items():
        path = scan.paths[source]
        offsets = list(by_offset)
        for j, item in read_items(path, list(enumerate(offsets)), RECORD_FIELDS):
            entries = read_entries(item, tokenizer, None, None, where=None)
            for k in by_offset[offsets[j]]:
                out[k] = _read_back(refs[k], entries, path)
    missing = [refs[k].id for k, r in enumerate(out) if r is None]
    if missing:  # only reachable if a file shrank under us
        raise InvalidInput(f"could not read back records {missing[:5]}; the inputs changed since the scan")
    return out  # type: ignore[return-value]


def _read_back(ref: RecordRef, entries: list[RecordEntry], path: Path) -> Rollout:
    """The entry `ref` points at, checked against what the scan saw."""
    found = [e for e in entries if e.output == ref.output]
    entry = found[0] if len(found) == 1 else None
    if entry is None or entry.parsed is None or (entry.rid is not None and entry.rid != ref.id):
        if entry is None:
            why = "its line no longer holds it"
        elif entry.parsed is None:
            why = str(entry.problem)
        else:
            why = f"found id {entry.rid!r} where {ref.id!r} was"
        raise InvalidInput(
            f"rollout file {path} changed since it was scanned (record {ref.id!r}: {why}); scan it again"
        )
    parsed = entry.parsed
    if (
        parsed.prompt_ids.size != ref.prompt_len
        or parsed.response_ids.size != ref.response_len
        or (parsed.rollout_logprobs is not None) != ref.has_rollout_logprobs
        or parsed.retokenized != ref.retokenized
    ):
        raise InvalidInput(
            f"record {ref.id!r} in {path} no longer matches the scan (lengths or fields differ); "
            "the file or the tokenizer changed since it was scanned; scan it again"
        )
    return Rollout(
        id=ref.id,
        prompt_ids=parsed.prompt_ids,
        response_ids=parsed.response_ids,
        rollout_logprobs=parsed.rollout_logprobs,
        retokenized=parsed.retokenized,
    )
