"""The fields of a rollout record and the checks on their values, shared by both record shapes.

`records` reads flat records and `request_outputs` reads vLLM's nested `RequestOutput` lines; both
name fields, check ids, token ids, log-probs and sizes with what is defined here, so a value is
accepted or refused (with the same reason) whichever shape it comes in. Files (`files`) only need
`RECORD_FIELDS`, the columns worth reading.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# Canonical field name first, then accepted aliases.
PROMPT_IDS = ("prompt_ids", "prompt_token_ids")
RESPONSE_IDS = ("response_ids", "output_token_ids", "completion_ids")
MESSAGES = ("messages",)
PROMPT_TEXT = ("prompt",)
RESPONSE_TEXT = ("response", "completion")
LOGPROBS = ("rollout_logprobs",)
# vLLM's `RequestOutput` as users dump it: one prompt, several sampled outputs (see `request_outputs`).
REQUEST_OUTPUT = ("request_id", "outputs")
# Every field a record may use: the only columns read from Parquet.
RECORD_FIELDS = (
    "id",
    *PROMPT_IDS,
    *RESPONSE_IDS,
    *MESSAGES,
    *PROMPT_TEXT,
    *RESPONSE_TEXT,
    *LOGPROBS,
    *REQUEST_OUTPUT,
)
# Fields that carry a flat record's response: a record with any of them is flat even if it has `outputs`.
RESPONSE_SIDE = (*RESPONSE_IDS, *MESSAGES, *RESPONSE_TEXT)

MAX_LOGPROB = 1e-4  # log-probs are <= 0; this much rounding noise above 0 is tolerated
_INT32 = np.iinfo(np.int32)

Field = tuple[str, Any]  # (the name it was given under, its value)


class BadRecord(Exception):
    """A record is unusable; the message is the reason shown to the user."""


@dataclass
class ParsedRecord:
    """A usable record's tokens: int32 ids, float32 rollout log-probs (one per response token) or None."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    rollout_logprobs: np.ndarray | None
    retokenized: bool


@dataclass
class RecordEntry:
    """One record of a raw item (a JSONL line or a Parquet row), usable or not.

    A flat record is one entry; a nested vLLM `RequestOutput` line is one entry per output (or a single
    entry when the line itself is unusable). Exactly one of `parsed` and `problem` is set.
    """

    rid: str | None  # None when the record has no usable id
    parsed: ParsedRecord | None
    problem: str | None
    nested: bool = False  # from a vLLM RequestOutput line
    output: int | None = None  # position in that line's `outputs`; None for flat records and whole-line problems


def type_name(v: Any) -> str:
    """The JSON-ish name of a value's type, for reasons (`null` for None)."""
    return "null" if v is None else type(v).__name__


def record_id(obj: dict[str, Any]) -> str:
    """The record's `id` as a string; `BadRecord` when it is missing, empty or not a string or integer."""
    if "id" not in obj or obj["id"] is None:
        raise BadRecord("no id: every record needs a unique 'id' (a string or an integer)")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise BadRecord(f"id must be a string or an integer, got {type_name(rid)} {rid!r}")
    s = str(rid)
    if not s.strip():
        raise BadRecord("id is empty")
    return s


def pick_field(obj: dict[str, Any], names: tuple[str, ...]) -> Field | None:
    """(name, value) of the one field among `names` (canonical + aliases) that is set, or None."""
    given = [n for n in names if obj.get(n) is not None]
    if len(given) > 1:
        raise BadRecord(f"gives both {given[0]!r} and {given[1]!r}, which mean the same; keep one")
    return (given[0], obj[given[0]]) if given else None


def token_ids(value: Any, field: str, vocab_size: int | None) -> np.ndarray:
    """int32 ids, checked to be integers in [0, vocab_size) (in int32 range when vocab_size is None)."""
    hi = vocab_size if vocab_size is not None else int(_INT32.max) + 1
    span = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else f"the int32 range [0, {hi})"
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise BadRecord(f"{field} must be integer token ids, got an array of {value.dtype}")
        arr = value
    elif isinstance(value, (list, tuple)):
        if set(map(type, value)) - {int}:
            i, v = next((i, v) for i, v in enumerate(value) if type(v) is not int)
            raise BadRecord(f"{field}[{i}] is {v!r} ({type_name(v)}), not an integer token id")
        try:
            arr = np.array(value, dtype=np.int64)
        except OverflowError:
            i, v = next((i, v) for i, v in enumerate(value) if not -(2**63) <= v < 2**63)
            raise BadRecord(f"{field}[{i}] = {v} is outside {span}") from None
    else:
        raise BadRecord(f"{field} must be a list of integer token ids, got {type_name(value)}")
    if arr.size:
        wide = arr.astype(np.int64) if arr.dtype != np.uint64 else arr
        bad = (wide < 0) | (wide >= hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise BadRecord(f"{field}[{i}] = {arr[i]} is outside {span}")
    return arr.astype(np.int32)


def logprobs(value: Any, n: int, retokenized: bool, field: str = "rollout_logprobs") -> np.ndarray:
    """float32 log-probs, checked to be `n` finite numbers <= `MAX_LOGPROB` (one per response token)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iuf":
            raise BadRecord(f"{field} must be numbers, got an array of {value.dtype}")
        arr64 = value.astype(np.float64)
    elif isinstance(value, (list, tuple)):
        if set(map(type, value)) - {float, int}:
            i, v = next((i, v) for i, v in enumerate(value) if type(v) not in (float, int))
            raise BadRecord(f"{field}[{i}] is {v!r} ({type_name(v)}), not a number")
        try:
            arr64 = np.array(value, dtype=np.float64)
        except OverflowError:
            i = next(i for i, v in enumerate(value) if not math.isfinite(float(v)))
            raise BadRecord(f"{field}[{i}] is not finite") from None
    else:
        raise BadRecord(f"{field} must be a list of numbers (one log-prob per response token), got {type_name(value)}")
    if arr64.shape[0] != n:
        hint = (
            " (the response was re-tokenized from text; give prompt_ids + response_ids to keep the sampled tokens)"
            if retokenized
            else ""
        )
        raise BadRecord(f"{field} has {arr64.shape[0]} values but the response has {n} tokens{hint}")
    with np.errstate(over="ignore"):
        arr = arr64.astype(np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        i = int(np.argmin(finite))
        raise BadRecord(f"{field}[{i}] = {float(arr64[i])!r} is not finite (as float32)")
    if arr64.size and float(arr64.max()) > MAX_LOGPROB:
        i = int(np.argmax(arr64))
        raise BadRecord(f"{field}[{i}] = {float(arr64[i])!r} is positive; log-probabilities are <= 0")
    return arr


def check_sizes(prompt: np.ndarray, response: np.ndarray, max_context: int | None) -> None:
    """`BadRecord` unless both sides have tokens and together fit in `max_context` (None: no limit)."""
    if response.size == 0:
        raise BadRecord("response is empty")
    if prompt.size == 0:
        raise BadRecord("prompt is empty; the first response token needs at least one token of context (e.g. BOS)")
    if max_context is not None and prompt.size + response.size > max_context:
        raise BadRecord(
            f"prompt ({prompt.size} tokens) + response ({response.size} tokens) = "
            f"{prompt.size + response.size} tokens exceeds the teacher's context of {max_context} tokens"
        )
