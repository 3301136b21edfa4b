"""One rollout record: decode it, check it, and turn it into token ids (the one place records are interpreted).

A record is a JSONL line or a Parquet row in one of three forms (token ids, chat messages, or
prompt/response text; see the package docstring). `_flat_entry` returns its id and tokens, or the
reason it is unusable, so scanning and loading read every record identically. A line in vLLM's
nested `RequestOutput` shape holds several records; `request_outputs` expands it with the checks
defined here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # optional speedup; the stdlib parser decides (and explains) whenever orjson refuses a line
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is installed with the server extra
    _orjson = None

# Canonical field name first, then accepted aliases.
_PROMPT_IDS = ("prompt_ids", "prompt_token_ids")
_RESPONSE_IDS = ("response_ids", "output_token_ids", "completion_ids")
_MESSAGES = ("messages",)
_PROMPT_TEXT = ("prompt",)
_RESPONSE_TEXT = ("response", "completion")
_LOGPROBS = ("rollout_logprobs",)
# vLLM's `RequestOutput` as users dump it: one prompt, several sampled outputs (see `request_outputs`).
_REQUEST_OUTPUT = ("request_id", "outputs")
_FIELDS = (
    "id",
    *_PROMPT_IDS,
    *_RESPONSE_IDS,
    *_MESSAGES,
    *_PROMPT_TEXT,
    *_RESPONSE_TEXT,
    *_LOGPROBS,
    *_REQUEST_OUTPUT,
)
# Fields that carry a flat record's response: a record with any of them is flat even if it has `outputs`.
_RESPONSE_SIDE = (*_RESPONSE_IDS, *_MESSAGES, *_RESPONSE_TEXT)

MAX_LOGPROB = 1e-4  # log-probs are <= 0; this much rounding noise above 0 is tolerated
_INT32 = np.iinfo(np.int32)


class _Bad(Exception):
    """A record is unusable; the message is the reason shown to the user."""


@dataclass
class _Parsed:
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    rollout_logprobs: np.ndarray | None
    retokenized: bool


@dataclass
class _Entry:
    """One record of a raw item (a JSONL line or a Parquet row), usable or not.

    A flat record is one entry; a nested vLLM `RequestOutput` line is one entry per output (or a single
    entry when the line itself is unusable). Exactly one of `parsed` and `problem` is set.
    """

    rid: str | None  # None when the record has no usable id
    parsed: _Parsed | None
    problem: str | None
    nested: bool = False  # from a vLLM RequestOutput line
    output: int | None = None  # position in that line's `outputs`; None for flat records and whole-line problems


def _loads(line: bytes, exact: bool) -> Any:
    if _orjson is not None and not exact:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass  # BOM, NaN, or really invalid: let the stdlib decide and explain
    return json.loads(line)


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


def _logprobs(value: Any, n: int, retokenized: bool, field: str = "rollout_logprobs") -> np.ndarray:
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
        raise _Bad(f"{field} has {arr64.shape[0]} values but the response has {n} tokens{hint}")
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


def _check_sizes(prompt: np.ndarray, response: np.ndarray, max_context: int | None) -> None:
    if response.size == 0:
        raise _Bad("response is empty")
    if prompt.size == 0:
        raise _Bad("prompt is empty; the first response token needs at least one token of context (e.g. BOS)")
    if max_context is not None and prompt.size + response.size > max_context:
        raise _Bad(
            f"prompt ({prompt.size} tokens) + response ({response.size} tokens) = "
            f"{prompt.size + response.size} tokens exceeds the teacher's context of {max_context} tokens"
        )


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

    _check_sizes(prompt, response, max_context)
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


def _flat_entry(obj: dict[str, Any], tokenizer: Any, vocab_size: int | None, max_context: int | None) -> _Entry:
    """The one record of a flat (not nested) object: its id and tokens, or the reason it is unusable."""
    rid = None
    try:
        rid = _record_id(obj)
        return _Entry(rid, _parse(obj, tokenizer, vocab_size, max_context), None)
    except _Bad as e:
        return _Entry(rid, None, str(e))


def _retry_exact(item: bytes | dict[str, Any], exact: bool) -> bool:
    """Whether a line that gave a bad record should be read again with the stdlib parser.

    orjson reads integers beyond 64 bits as floats; for a bad record the stdlib's exact reading
    decides, so the reason names the value as written. (Valid records read the same either way.)
    """
    return _orjson is not None and not exact and not isinstance(item, dict)
