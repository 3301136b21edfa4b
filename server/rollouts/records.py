"""Records out of raw items (JSONL lines, Parquet rows): the one place records are interpreted.

A raw item holds one flat record, in one of three forms (token ids, chat messages, or prompt/response
text; see the package docstring), or, in vLLM's nested `RequestOutput` shape, one record per sampled
output (`request_outputs`). `read_entries` returns every record of an item with its id and tokens, or
the reason it is unusable, so scanning and loading read every record identically. Values are checked
by `fields`.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from .fields import (
    LOGPROBS,
    MESSAGES,
    PROMPT_IDS,
    PROMPT_TEXT,
    RESPONSE_IDS,
    RESPONSE_TEXT,
    BadRecord,
    Field,
    ParsedRecord,
    RecordEntry,
    check_sizes,
    logprobs,
    pick_field,
    record_id,
    token_ids,
    type_name,
)
from .request_outputs import expand_request_output, is_request_output

_orjson: ModuleType | None
try:  # optional speedup; the stdlib parser decides (and explains) whenever orjson refuses a line
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is installed with the server extra
    _orjson = None


def read_entries(
    item: bytes | dict[str, Any],
    tokenizer: Any,
    vocab_size: int | None,
    max_context: int | None,
    where: str | None,
) -> list[RecordEntry]:
    """The records of one JSONL line (bytes) or Parquet row (dict of its fields), usable or not.

    One entry for a flat record, one per output for a vLLM `RequestOutput` line. `where` (`file:LINE`)
    names the item in ids and reasons; None when unknown (reading back). `tokenizer` is needed only
    by text forms; `vocab_size` and `max_context` None skip those checks.
    """
    return _entries(item, tokenizer, vocab_size, max_context, where, exact=False)


def _entries(
    item: bytes | dict[str, Any],
    tokenizer: Any,
    vocab_size: int | None,
    max_context: int | None,
    where: str | None,
    exact: bool,
) -> list[RecordEntry]:
    try:
        obj = item if isinstance(item, dict) else _decode_line(item, exact)
    except BadRecord as e:
        return [RecordEntry(None, None, str(e))]
    if is_request_output(obj):
        entries = expand_request_output(obj, vocab_size, max_context, where)
    else:
        entries = [_flat_entry(obj, tokenizer, vocab_size, max_context)]
    if any(e.parsed is None for e in entries) and _retry_exact(item, exact):
        return _entries(item, tokenizer, vocab_size, max_context, where, exact=True)
    return entries


def _retry_exact(item: bytes | dict[str, Any], exact: bool) -> bool:
    """Whether a line that gave a bad record should be read again with the stdlib parser.

    orjson reads integers beyond 64 bits as floats; for a bad record the stdlib's exact reading
    decides, so the reason names the value as written. (Valid records read the same either way.)
    """
    return _orjson is not None and not exact and not isinstance(item, dict)


def _loads(line: bytes, exact: bool) -> Any:
    if _orjson is not None and not exact:
        try:
            return _orjson.loads(line)
        except _orjson.JSONDecodeError:
            pass  # BOM, NaN, or really invalid: let the stdlib decide and explain
    return json.loads(line)


def _decode_line(line: bytes, exact: bool) -> dict[str, Any]:
    try:
        obj = _loads(line, exact)
    except json.JSONDecodeError as e:
        raise BadRecord(_json_error(e)) from None
    except UnicodeDecodeError as e:
        raise BadRecord(f"byte {e.start + 1}: invalid JSON: not {e.encoding} text ({e.reason})") from None
    except ValueError as e:
        raise BadRecord(f"invalid JSON: {e}") from None
    except RecursionError:
        raise BadRecord("invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        raise BadRecord(f"the record is {kind.get(type(obj), 'null')}, not a JSON object")
    return obj


def _json_error(e: json.JSONDecodeError) -> str:
    """The decoder's complaint placed on the record's own line: `column C: invalid JSON: what`.

    The locator before it gives the file's line number. The decoder numbers lines and columns within
    the text it was given, this one line, so a line that ends before its JSON does came out as
    "line 2 column 1" of a one-line record; that is the end of the line, and said so.
    """
    text = e.doc.rstrip("\r\n")
    if e.pos < len(text):
        return f"column {e.pos + 1}: invalid JSON: {e.msg}"
    return (
        f"column {len(text) + 1} (the end of the line): invalid JSON: {e.msg}; a JSONL record is one JSON object on "
        "one line (is this one cut short, or spread over several lines?)"
    )


def _flat_entry(obj: dict[str, Any], tokenizer: Any, vocab_size: int | None, max_context: int | None) -> RecordEntry:
    """The one record of a flat (not nested) object: its id and tokens, or the reason it is unusable."""
    rid = None
    try:
        rid = record_id(obj)
        return RecordEntry(rid, _parse(obj, tokenizer, vocab_size, max_context), None)
    except BadRecord as e:
        return RecordEntry(rid, None, str(e))


# ------------------------------------------------------------------------------------ flat forms


def _parse(obj: dict[str, Any], tokenizer: Any, vocab_size: int | None, max_context: int | None) -> ParsedRecord:
    """The record's tokens, or `BadRecord` with the first problem found. The one place flat records are read."""
    pids, rids = pick_field(obj, PROMPT_IDS), pick_field(obj, RESPONSE_IDS)
    msgs = pick_field(obj, MESSAGES)
    ptext, rtext = pick_field(obj, PROMPT_TEXT), pick_field(obj, RESPONSE_TEXT)
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
        raise BadRecord(
            "no rollout in the record: give prompt_ids + response_ids (token ids as sampled, preferred), "
            "messages (a chat ending with the assistant turn), or prompt + response (text)"
        )
    if len(forms) > 1:
        raise BadRecord(f"ambiguous: the record gives both {forms[0]} and {forms[1]}; give exactly one form")

    if pids is not None or rids is not None:
        pids, rids = _both(pids, rids, ("prompt_ids", "response_ids"))
        prompt = token_ids(pids[1], pids[0], vocab_size)
        response = token_ids(rids[1], rids[0], vocab_size)
        retokenized = False
    else:
        if msgs is not None:
            p, r = _from_messages(msgs[1], tokenizer)
        else:
            ptext, rtext = _both(ptext, rtext, ("prompt", "response"))
            prompt_s, response_s = _text(ptext[1], ptext[0]), _text(rtext[1], rtext[0])
            _need_tokenizer(tokenizer, "prompt/response text")
            p, r = _encode(tokenizer, prompt_s, True), _encode(tokenizer, response_s, False)
        prompt = token_ids(p, "re-tokenized prompt", vocab_size)
        response = token_ids(r, "re-tokenized response", vocab_size)
        retokenized = True

    check_sizes(prompt, response, max_context)
    lp = pick_field(obj, LOGPROBS)
    rollout_lp = logprobs(lp[1], int(response.size), retokenized) if lp is not None else None
    return ParsedRecord(prompt, response, rollout_lp, retokenized)


def _both(first: Field | None, second: Field | None, names: tuple[str, str]) -> tuple[Field, Field]:
    """The two fields of a two-field form, given at least one; `BadRecord` naming the missing one."""
    if first is None:
        raise BadRecord(f"has {second[0] if second is not None else names[1]} but no {names[0]}")
    if second is None:
        raise BadRecord(f"has {first[0]} but no {names[1]}")
    return first, second


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{field} must be a string, got {type_name(value)}")
    return value


def _need_tokenizer(tokenizer: Any, what: str) -> None:
    if tokenizer is None:
        raise BadRecord(f"{what} needs a tokenizer to be re-tokenized; pass one, or give prompt_ids + response_ids")


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    except Exception as e:  # a tokenizer may raise anything on odd input
        raise BadRecord(f"the tokenizer failed: {type(e).__name__}: {e}") from None


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not value:
        raise BadRecord(f"messages must be a non-empty list of {{role, content}} objects, got {type_name(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"messages[{i}] must be an object with 'role' and 'content', got {type_name(m)}")
        m = {k: v for k, v in m.items() if v is not None}  # Parquet structs fill absent keys with nulls
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadRecord(f"messages[{i}] must have a string 'role' and a string 'content'")
        out.append(m)
    if out[-1]["role"] != "assistant":
        raise BadRecord(f"the last message must be the assistant turn (the response), got role {out[-1]['role']!r}")
    return out


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # templates are user code (Jinja); report, don't crash the scan
        raise BadRecord(f"the chat template failed: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise BadRecord(f"the chat template returned {type_name(text)}, not text")
    return text


def _from_messages(value: Any, tokenizer: Any) -> tuple[list[int], list[int]]:
    messages = _chat_messages(value)
    _need_tokenizer(tokenizer, "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise BadRecord(
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
