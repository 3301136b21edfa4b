"""Reading rollout files: validate everything once, keep only where each record is, read back on demand.

Rollouts are samples from the student policy that the teacher scores. They come as JSONL
(`.jsonl`, `.jsonl.gz`) or Parquet (`.parquet`) files; a directory stands for every such file in
it (not recursive), in name order. Every record has a unique `id` (string or integer, kept as a
string) and exactly one of three forms:

* `prompt_ids` + `response_ids`: lists of token ids exactly as sampled. Preferred: nothing is
  re-tokenized, so the teacher scores exactly the tokens the policy produced.
* `messages`: a chat (list of `{role, content}`) whose last message is the assistant turn, the
  response. The prompt is the chat template applied to the messages before it with
  `add_generation_prompt=True`. The response is what the templated full conversation adds after
  that prompt, when the prompt's tokens are a prefix of the conversation's tokens (so the
  end-of-turn token the policy sampled is part of the response); otherwise it is the assistant
  content tokenized alone (`add_special_tokens=False`), without an end-of-turn token.
* `prompt` + `response`: strings. The prompt is tokenized with the tokenizer's default special
  tokens, the response with `add_special_tokens=False`.

The text forms are re-tokenized, which may not reproduce the sampled tokens; they are counted in
`RolloutScan.retokenized` so callers can warn about it.

Optional `rollout_logprobs`: the sampling policy's log-prob of each response token (floats <= 0,
one per response token). Fields other than these (rewards, metadata) are ignored.

Aliases from common generation pipelines are accepted for single fields: `prompt_token_ids` for
`prompt_ids` (vLLM), `output_token_ids` or `completion_ids` for `response_ids`, `completion` for
`response` (OpenAI / TRL). Giving a field and one of its aliases together is an error.

Inputs can be millions of records with thousands of tokens each, so the work is split in two:
`scan_rollouts` streams through every file once, validates every record and keeps only a small
`RecordRef` per valid record (where it is, and its sizes); `load_rollouts` reads a chosen set of
records back (seeking to byte offsets in JSONL, reading only the needed row groups of Parquet)
when a batch is about to be scored.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import struct
import zlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lopd.errors import InvalidInput

try:  # optional speedup; the stdlib parser decides (and explains) whenever orjson refuses a line
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is installed with the server extra
    _orjson = None

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
ROLLOUT_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

# Canonical field name first, then accepted aliases.
_PROMPT_IDS = ("prompt_ids", "prompt_token_ids")
_RESPONSE_IDS = ("response_ids", "output_token_ids", "completion_ids")
_MESSAGES = ("messages",)
_PROMPT_TEXT = ("prompt",)
_RESPONSE_TEXT = ("response", "completion")
_LOGPROBS = ("rollout_logprobs",)
_FIELDS = ("id", *_PROMPT_IDS, *_RESPONSE_IDS, *_MESSAGES, *_PROMPT_TEXT, *_RESPONSE_TEXT, *_LOGPROBS)

MAX_LOGPROB = 1e-4  # log-probs are <= 0; this much rounding noise above 0 is tolerated
_PARQUET_BATCH_ROWS = 512
_HASH_BLOCK = 8 * 2**20
_DUP_LOCATIONS_SHOWN = 5
_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True, slots=True)
class RecordRef:
    """A valid record, light: where to find it again, and its sizes.

    `offset` is the byte offset of the record's line in a plain JSONL file, the 0-based line index
    in a `.jsonl.gz` file (gzip cannot seek), and the 0-based row index in a Parquet file.
    """

    id: str
    source: int
    offset: int
    prompt_len: int
    response_len: int
    has_rollout_logprobs: bool
    retokenized: bool


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


class _Bad(Exception):
    """A record is unusable; the message is the reason shown to the user, `rid` its id when it has one."""

    rid: str | None = None


@dataclass
class _Parsed:
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    rollout_logprobs: np.ndarray | None
    retokenized: bool


# ----------------------------------------------------------------------------------------- paths


def _kind(path: Path) -> str | None:
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
                c for c in p.iterdir() if c.is_file() and _kind(c) is not None and not c.name.startswith((".", "_"))
            )
            if not files:
                raise InvalidInput(f"rollout directory {p} contains no rollout files ({', '.join(ROLLOUT_SUFFIXES)})")
        elif p.is_file():
            if _kind(p) is None:
                raise InvalidInput(
                    f"rollout file {p} has an unknown suffix; expected one of {', '.join(ROLLOUT_SUFFIXES)}"
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


def _display_names(paths: Sequence[Path]) -> list[str]:
    """File names for locators; full paths when two inputs share a file name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in paths]


def _hash_file_into(h: Any, path: Path) -> None:
    size = path.stat().st_size
    h.update(struct.pack("<Q", size))
    read = 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            read += len(block)
    if read != size:
        raise InvalidInput(f"rollout file {path} changed while it was being read")


def rollout_files_fingerprint(paths: Sequence[str | Path]) -> str:
    """`sha256:<hex>` over the files' bytes in order, each preceded by its size (8 bytes, little-endian).

    `scan_rollouts` computes the same value as `RolloutScan.input_fingerprint` while it reads;
    this recomputes it without parsing, e.g. to check that inputs did not change before resuming.
    """
    h = hashlib.sha256()
    for p in paths:
        _hash_file_into(h, Path(p))
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------ raw records


def _loads(line: bytes, exact: bool) -> Any:
    if _orjson is not None and not exact:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass  # BOM, NaN, or really invalid: let the stdlib decide and explain
    return json.loads(line)


def _iter_jsonl(path: Path, kind: str, h: Any) -> Iterator[tuple[int, int, bytes]]:
    """(offset, 1-based line number, line) for every non-blank line; hashes a plain file's bytes into `h`."""
    if kind == "jsonl":
        size = path.stat().st_size
        h.update(struct.pack("<Q", size))
        pos = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                h.update(line)
                start, pos = pos, pos + len(line)
                if line.strip():
                    yield start, lineno, line
        if pos != size:
            raise InvalidInput(f"rollout file {path} changed while it was being read")
        return
    _hash_file_into(h, path)
    lineno = 0
    try:
        with gzip.open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno - 1, lineno, line
    except (OSError, EOFError, zlib.error) as e:
        raise InvalidInput(f"cannot read {path} (after line {lineno}): {e}; is it a complete gzip file?") from e


class _ListColumn:
    """Rows of an Arrow list-of-numbers column as numpy slices, without converting to Python lists."""

    def __init__(self, col: Any) -> None:
        self.offsets = col.offsets.to_numpy()
        self.values = col.values.to_numpy(zero_copy_only=False)
        self.valid = col.is_valid().to_numpy(zero_copy_only=False)

    def __getitem__(self, i: int) -> np.ndarray | None:
        if not self.valid[i]:
            return None
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def _column_rows(col: Any) -> Any:
    import pyarrow as pa

    t = col.type
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)
    ):
        if col.values.null_count == 0:
            return _ListColumn(col)
    return col.to_pylist()


def _batch_rows(batch: Any) -> tuple[list[str], list[Any]]:
    return list(batch.schema.names), [_column_rows(c) for c in batch.columns]


def _parquet_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path}: {e}") from e


def _parquet_columns(pf: Any) -> list[str]:
    names = set(pf.schema_arrow.names)
    return [c for c in _FIELDS if c in names]


def _iter_parquet(path: Path, h: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, row as a dict of the known fields) for every row, reading batches of rows."""
    import pyarrow as pa

    _hash_file_into(h, path)
    pf = _parquet_file(path)
    columns = _parquet_columns(pf)
    row = 0
    try:
        if not columns:
            for row in range(pf.metadata.num_rows):
                yield row, {}
            return
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            names, cols = _batch_rows(batch)
            for i in range(batch.num_rows):
                yield row, {n: c[i] for n, c in zip(names, cols)}
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path} (near row {row}): {e}") from e


# ---------------------------------------------------------------------------------------- parsing


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _record_id(obj: dict[str, Any]) -> str:
    if "id" not in obj or obj["id"] is None:
        raise _Bad("no id: every record needs a unique 'id' (a string or an integer)")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise _Bad(f"id must be a string or an integer, got {_type_name(rid)} {rid!r}")
    s = str(rid)
    if not s.strip():
        raise _Bad("id is empty")
    return s


def _field(obj: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any] | None:
    """(name, value) of the one field among `names` (canonical + aliases) that is set, or None."""
    given = [n for n in names if obj.get(n) is not None]
    if len(given) > 1:
        raise _Bad(f"gives both {given[0]!r} and {given[1]!r}, which mean the same; keep one")
    return (given[0], obj[given[0]]) if given else None


def _token_ids(value: Any, field: str, vocab_size: int | None) -> np.ndarray:
    """int32 ids, checked to be integers in [0, vocab_size) (in int32 range when vocab_size is None)."""
    hi = vocab_size if vocab_size is not None else int(_INT32.max) + 1
    span = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else f"the int32 range [0, {hi})"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise _Bad(f"{field} must be integer token ids, got an array of {value.dtype}")
        arr = value
    elif isinstance(value, (list, tuple)):
        if set(map(type, value)) - {int}:
            i, v = next((i, v) for i, v in enumerate(value) if type(v) is not int)
            raise _Bad(f"{field}[{i}] is {v!r} ({_type_name(v)}), not an integer token id")
        try:
            arr = np.array(value, dtype=np.int64)
        except OverflowError:
            i, v = next((i, v) for i, v in enumerate(value) if not -(2**63) <= v < 2**63)
            raise _Bad(f"{field}[{i}] = {v} is outside {span}") from None
    else:
        raise _Bad(f"{field} must be a list of integer token ids, got {_type_name(value)}")
    if arr.size:
        wide = arr.astype(np.int64) if arr.dtype != np.uint64 else arr
        bad = (wide < 0) | (wide >= hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise _Bad(f"{field}[{i}] = {arr[i]} is outside {span}")
    return arr.astype(np.int32)


def _logprobs(value: Any, n: int, retokenized: bool) -> np.ndarray:
    field = "rollout_logprobs"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise _Bad(f"{field} must be numbers, got an array of {value.dtype}")
        arr64 = value.astype(np.float64)
    elif isinstance(value, (list, tuple)):
        if set(map(type, value)) - {float, int}:
            i, v = next((i, v) for i, v in enumerate(value) if type(v) not in (float, int))
            raise _Bad(f"{field}[{i}] is {v!r} ({_type_name(v)}), not a number")
        try:
            arr64 = np.array(value, dtype=np.float64)
        except OverflowError:
            i = next(i for i, v in enumerate(value) if not math.isfinite(float(v)))
            raise _Bad(f"{field}[{i}] is not finite") from None
    else:
        raise _Bad(f"{field} must be a list of numbers (one log-prob per response token), got {_type_name(value)}")
    if arr64.shape[0] != n:
        hint = (
            " (the response was re-tokenized from text; give prompt_ids + response_ids to keep the sampled tokens)"
            if retokenized
            else ""
        )
        raise _Bad(f"rollout_logprobs has {arr64.shape[0]} values but the response has {n} tokens{hint}")
    with np.errstate(over="ignore"):
        arr = arr64.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.argmin(finite))
        raise _Bad(f"{field}[{i}] = {float(arr64[i])!r} is not finite (as float32)")
    if arr64.size and float(arr64.max()) > MAX_LOGPROB:
        i = int(np.argmax(arr64))
        raise _Bad(f"{field}[{i}] = {float(arr64[i])!r} is positive; log-probabilities are <= 0")
    return arr


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{field} must be a string, got {_type_name(value)}")
    return value


def _need_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise _Bad(f"{what} needs a tokenizer to be re-tokenized; pass one, or give prompt_ids + response_ids")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    except Exception as e:  # a tokenizer may raise anything on odd input
        raise _Bad(f"the tokenizer failed: {type(e).__name__}: {e}") from None


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad(f"messages must be a non-empty list of {{role, content}} objects, got {_type_name(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{i}] must be an object with 'role' and 'content', got {_type_name(m)}")
        m = {k: v for k, v in m.items() if v is not None}  # Parquet structs fill absent keys with nulls
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Bad(f"messages[{i}] must have a string 'role' and a string 'content'")
        out.append(m)
    if out[-1]["role"] != "assistant":
        raise _Bad(f"the last message must be the assistant turn (the response), got role {out[-1]['role']!r}")
    return out


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates are user code (Jinja); report, don't crash the scan
        raise _Bad(f"the chat template failed: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise _Bad(f"the chat template returned {_type_name(text)}, not text")
    return text


def _from_messages(value: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    messages = _chat_messages(value)
    _need_tokenizer(tokenizer, "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise _Bad(
            "messages need a tokenizer with a chat template and this tokenizer has none; "
            "give prompt + response text or prompt_ids + response_ids instead"
        )
    prompt_text = _apply_template(tokenizer, messages[:-1], True)
    full_text = _apply_template(tokenizer, messages, False)
    prompt = _encode(tokenizer, prompt_text, False)
    full = _encode(tokenizer, full_text, False)
    if len(full) > len(prompt) and full[: len(prompt)] == prompt:
        return prompt, full[len(prompt) :]
    return prompt, _encode(tokenizer, messages[-1]["content"], False)


def _parse(obj: dict[str, Any], tokenizer: Any, vocab_size: int | None, max_context: int | None) -> _Parsed:
    """The record's tokens, or `_Bad` with the first problem found. The one place records are interpreted."""
    pids, rids = _field(obj, _PROMPT_IDS), _field(obj, _RESPONSE_IDS)
    msgs = _field(obj, _MESSAGES)
    ptext, rtext = _field(obj, _PROMPT_TEXT), _field(obj, _RESPONSE_TEXT)
    forms = [
        name
        for name, parts in (
            ("prompt_ids/response_ids", (pids, rids)),
            ("messages", (msgs,)),
            ("prompt/response", (ptext, rtext)),
        )
        if any(p is not None for p in parts)
    ]
    if not forms:
        raise _Bad(
            "no rollout in the record: give prompt_ids + response_ids (token ids as sampled, preferred), "
            "messages (a chat ending with the assistant turn), or prompt + response (text)"
        )
    if len(forms) > 1:
        raise _Bad(f"ambiguous: the record gives both {forms[0]} and {forms[1]}; give exactly one form")

    if pids is not None or rids is not None:
        if pids is None or rids is None:
            have, need = (rids[0], "prompt_ids") if pids is None else (pids[0], "response_ids")
            raise _Bad(f"has {have} but no {need}")
        prompt = _token_ids(pids[1], pids[0], vocab_size)
        response = _token_ids(rids[1], rids[0], vocab_size)
        retokenized = False
    else:
        if msgs is not None:
            p, r = _from_messages(msgs[1], tokenizer)
        else:
            if ptext is None or rtext is None:
                have, need = (rtext[0], "prompt") if ptext is None else (ptext[0], "response")
                raise _Bad(f"has {have} but no {need}")
            prompt_s, response_s = _text(ptext[1], ptext[0]), _text(rtext[1], rtext[0])
            _need_tokenizer(tokenizer, "prompt/response text")
            p, r = _encode(tokenizer, prompt_s, True), _encode(tokenizer, response_s, False)
        prompt = _token_ids(p, "re-tokenized prompt", vocab_size)
        response = _token_ids(r, "re-tokenized response", vocab_size)
        retokenized = True

    if response.size == 0:
        raise _Bad("response is empty")
    if prompt.size == 0:
        raise _Bad("prompt is empty; the first response token needs at least one token of context (e.g. BOS)")
    if max_context is not None and prompt.size + response.size > max_context:
        raise _Bad(
            f"prompt ({prompt.size} tokens) + response ({response.size} tokens) = "
            f"{prompt.size + response.size} tokens exceeds the teacher's context of {max_context} tokens"
        )
    lp = _field(obj, _LOGPROBS)
    logprobs = _logprobs(lp[1], int(response.size), retokenized) if lp is not None else None
    return _Parsed(prompt, response, logprobs, retokenized)


def _decode_line(line: bytes, exact: bool) -> dict[str, Any]:
    try:
        obj = _loads(line, exact)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise _Bad(f"invalid JSON: {e}") from None
    except RecursionError:
        raise _Bad("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise _Bad(f"the record is {kind.get(type(obj), 'null')}, not a JSON object")
    return obj


def _interpret(
    item: bytes | dict[str, Any], tokenizer: Any, vocab_size: int | None, max_context: int | None, exact: bool = False
) -> tuple[str, _Parsed]:
    """(id, tokens) of a JSONL line or Parquet row, or `_Bad` carrying the id when there is one."""
    rid = None
    try:
        obj = item if isinstance(item, dict) else _decode_line(item, exact)
        rid = _record_id(obj)
        return rid, _parse(obj, tokenizer, vocab_size, max_context)
    except _Bad as e:
        if _orjson is not None and not exact and not isinstance(item, dict):
            # orjson reads integers beyond 64 bits as floats; for a bad record, the stdlib's exact
            # reading decides, so the reason names the value as written. (Valid records read the same.)
            return _interpret(item, tokenizer, vocab_size, max_context, exact=True)
        e.rid = rid
        raise


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
    name). Every record that shares an id with another is bad, since there is no telling which one
    is meant. `tokenizer` may be None when every record gives token ids. Unusable paths and
    unreadable files raise `InvalidInput`.
    """
    _check_positive("vocab_size", vocab_size)
    _check_positive("max_context", max_context)
    files = expand_rollout_paths(paths)
    names = _display_names(files)
    h = hashlib.sha256()

    entries: list[Any] = []  # RecordRef for a valid record, (label, reason) for a bad one
    ent_source = array("q")
    ent_pos = array("q")  # JSONL: 1-based line number; Parquet: 0-based row
    first_at: dict[str, int] = {}
    dups: dict[str, list[int]] = {}

    from tqdm.auto import tqdm

    bar = tqdm(desc="scan rollouts", unit=" rec", disable=not progress)
    try:
        for source, path in enumerate(files):
            kind = _kind(path)
            if kind == "parquet":
                raw: Iterator[tuple[int, int, Any]] = ((row, row, obj) for row, obj in _iter_parquet(path, h))
            else:
                raw = _iter_jsonl(path, kind, h)  # type: ignore[arg-type]
            for offset, pos, item in raw:
                idx = len(entries)
                ent_source.append(source)
                ent_pos.append(pos)
                rid: str | None = None
                try:
                    rid, parsed = _interpret(item, tokenizer, vocab_size, max_context)
                    entries.append(
                        RecordRef(
                            id=rid,
                            source=source,
                            offset=offset,
                            prompt_len=int(parsed.prompt_ids.size),
                            response_len=int(parsed.response_ids.size),
                            has_rollout_logprobs=parsed.rollout_logprobs is not None,
                            retokenized=parsed.retokenized,
                        )
                    )
                except _Bad as e:
                    rid = e.rid
                    label = rid if rid is not None else _locator(names, kind, source, pos)
                    entries.append((label, str(e)))
                if rid is not None:
                    first = first_at.setdefault(rid, idx)
                    if first != idx:
                        dups.setdefault(rid, [first]).append(idx)
                if idx % 256 == 255:
                    bar.update(256)
        bar.update(len(entries) % 256)
    finally:
        bar.close()

    kinds = [_kind(p) for p in files]
    for rid, idxs in dups.items():
        # Only the first few locations are named, so an id used a million times stays linear.
        head = [
            (j, _locator(names, kinds[ent_source[j]], ent_source[j], ent_pos[j]))
            for j in idxs[: _DUP_LOCATIONS_SHOWN + 1]
        ]
        for idx in idxs:
            others = [loc for j, loc in head if j != idx][:_DUP_LOCATIONS_SHOWN]
            shown = ", ".join(others)
            if len(idxs) - 1 > len(others):
                shown += f" and {len(idxs) - 1 - len(others)} more"
            e = entries[idx]
            if isinstance(e, RecordRef):
                entries[idx] = (rid, f"duplicate id: also used at {shown}")
            else:
                entries[idx] = (e[0], f"{e[1]}; also, the id is used again at {shown}")

    records = [e for e in entries if isinstance(e, RecordRef)]
    problems = [e for e in entries if not isinstance(e, RecordRef)]
    return RolloutScan(
        paths=files,
        records=records,
        problems=problems,
        total=len(entries),
        retokenized=sum(r.retokenized for r in records),
        input_fingerprint="sha256:" + h.hexdigest(),
    )


def _locator(names: list[str], kind: str | None, source: int, pos: int) -> str:
    return f"{names[source]}:row {pos}" if kind == "parquet" else f"{names[source]}:{pos}"


# ------------------------------------------------------------------------------------------- load


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


def _load_parquet(path: Path, wanted: list[tuple[int, int]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(request index, row) for (request index, row index) pairs, reading only the row groups needed."""
    import pyarrow as pa

    pf = _parquet_file(path)
    columns = _parquet_columns(pf)
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
                    names, cols = _batch_rows(batch)
                    while j < len(todo) and todo[j][1] < end:
                        k, row = todo[j]
                        yield k, {n: c[row - start] for n, c in zip(names, cols)}
                        j += 1
                start = end
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read Parquet file {path}: {e}") from e


def load_rollouts(scan: RolloutScan, refs: Sequence[RecordRef], tokenizer: Any) -> list[Rollout]:
    """Read exactly these records back, in the order of `refs`.

    Text forms are re-tokenized the same way `scan_rollouts` did (so pass the same tokenizer).
    Raises `InvalidInput` when a record no longer matches its ref (the file changed since the scan).
    """
    by_source: dict[int, list[tuple[int, int]]] = {}
    for k, ref in enumerate(refs):
        if not 0 <= ref.source < len(scan.paths):
            raise InvalidInput(
                f"record {ref.id!r} refers to input file #{ref.source}, but the scan has {len(scan.paths)} files"
            )
        by_source.setdefault(ref.source, []).append((k, ref.offset))

    out: list[Rollout | None] = [None] * len(refs)
    for source, wanted in by_source.items():
        path = scan.paths[source]
        kind = _kind(path)
        if kind == "parquet":
            items: Iterator[tuple[int, Any]] = _load_parquet(path, wanted)
        elif kind == "jsonl.gz":
            items = _load_jsonl_gz(path, wanted)
        else:
            items = _load_jsonl(path, wanted)
        for k, item in items:
            ref = refs[k]
            try:
                rid, parsed = _interpret(item, tokenizer, None, None)
                if rid != ref.id:
                    raise _Bad(f"found id {rid!r} where {ref.id!r} was")
            except _Bad as e:
                raise InvalidInput(
                    f"rollout file {path} changed since it was scanned (record {ref.id!r}: {e}); scan it again"
                ) from None
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
            out[k] = Rollout(
                id=ref.id,
                prompt_ids=parsed.prompt_ids,
                response_ids=parsed.response_ids,
                rollout_logprobs=parsed.rollout_logprobs,
                retokenized=parsed.retokenized,
            )
    missing = [refs[k].id for k, r in enumerate(out) if r is None]
    if missing:  # only reachable if a file shrank under us
        raise InvalidInput(f"could not read back records {missing[:5]}; the inputs changed since the scan")
    return out  # type: ignore[return-value]
