"""vLLM generation outputs as users save them: one `RequestOutput` per line, one record per sampled output.

People who sample rollouts with `vllm.LLM.generate(..., SamplingParams(n=8, logprobs=0))` usually
dump each `RequestOutput` as it is, so this shape is accepted as it comes instead of asking for a
conversion script (where ids and log-probs are easy to misalign):

    {"request_id": "17", "prompt": "...", "prompt_token_ids": [...],
     "outputs": [{"index": 0, "text": "...", "token_ids": [...], "cumulative_logprob": -3.2,
                  "logprobs": null | [{"<token id>": {"logprob": -0.1, "rank": 1, "decoded_token": "a"}, ...}, ...],
                  "finish_reason": "stop"}, ...]}

Each element of `outputs` is one record: the prompt is `prompt_token_ids` (the text is not used, so
nothing is re-tokenized), the response is the output's `token_ids`, and when `logprobs` is there the
rollout log-probs are the entries of the sampled tokens (JSON object keys are strings; the value may
be a `Logprob`-like object or a bare number). Record ids are `<base>/<index>`: `base` is the line's
`id` when it has one, else its `request_id`, else its location (`file:LINE`); `index` is the output's
`index` (its position in `outputs` when absent). Every problem names the field, e.g.
`outputs[1].logprobs[3]`; the scan adds the file and line.

A line is read this way when it has `outputs` and none of the flat response fields (`response_ids`
and its aliases, `messages`, `response`), so flat records that happen to carry an `outputs` field
read as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .records import (
    _PROMPT_IDS,
    _RESPONSE_SIDE,
    _Bad,
    _check_sizes,
    _Entry,
    _field,
    _logprobs,
    _Parsed,
    _record_id,
    _token_ids,
    _type_name,
)

_KEYS_SHOWN = 5


def is_request_output(obj: dict[str, Any]) -> bool:
    """True for a line in vLLM's nested `RequestOutput` shape (see the module docstring)."""
    return obj.get("outputs") is not None and not any(obj.get(n) is not None for n in _RESPONSE_SIDE)


def _base_id(obj: dict[str, Any], where: str | None) -> str | None:
    """The line's `id`, else its `request_id`, else `where`; None only when `where` is None too."""
    if obj.get("id") is not None:
        return _record_id(obj)
    rid = obj.get("request_id")
    if rid is None:
        return where
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise _Bad(f"request_id must be a string or an integer, got {_type_name(rid)} {rid!r}")
    s = str(rid)
    if not s.strip():
        raise _Bad("request_id is empty")
    return s


def _output_index(out: dict[str, Any], pos: int) -> int:
    index = out.get("index")
    if index is None:
        return pos
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise _Bad(f"outputs[{pos}].index must be a non-negative integer, got {_type_name(index)} {index!r}")
    return int(index)


def _sampled_logprobs(value: Any, tokens: np.ndarray, pos: int) -> np.ndarray | None:
    """The log-prob of each sampled token, picked by its id from vLLM's per-position `{id: Logprob}` objects."""
    field = f"outputs[{pos}].logprobs"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise _Bad(
            f"{field} must be a list with one {{token id: {{logprob, rank, decoded_token}}}} object per "
            f"sampled token, or null; got {_type_name(value)}"
        )
    if len(value) != tokens.size:
        raise _Bad(
            f"{field} has {len(value)} positions but outputs[{pos}].token_ids has {tokens.size} tokens; "
            "they must match one to one"
        )
    picked: list[Any] = []
    for j, (entry, tok) in enumerate(zip(value, tokens.tolist())):
        if not isinstance(entry, dict):
            raise _Bad(f"{field}[{j}] must be an object keyed by token id, got {_type_name(entry)}")
        lp = entry.get(str(tok))  # JSON object keys are strings
        if lp is None:
            lp = entry.get(tok)  # dicts built in Python keep integer keys
        if lp is None:
            keys = [str(k) for k, v in entry.items() if v is not None]
            shown = ", ".join(keys[:_KEYS_SHOWN]) + (" ..." if len(keys) > _KEYS_SHOWN else "")
            raise _Bad(
                f"{field}[{j}] has no entry for the sampled token {tok} (it has {shown or 'none'}); "
                f"were these log-probs written for other token_ids?"
            )
        if isinstance(lp, dict):
            lp = lp.get("logprob")
        if type(lp) not in (float, int):
            raise _Bad(f"{field}[{j}]['{tok}'].logprob is {lp!r} ({_type_name(lp)}), not a number")
        picked.append(lp)
    return _logprobs(picked, int(tokens.size), False, field=field)


def expand_request_output(
    obj: dict[str, Any], vocab_size: int | None, max_context: int | None, where: str | None
) -> list[_Entry]:
    """One entry per element of `outputs`, or a single entry when the line as a whole is unusable.

    `where` (`file:LINE`) stands in for the id when the line has neither `id` nor `request_id`; pass
    None when it is unknown (reading back), and such records get no id to check against.
    """
    try:
        base = _base_id(obj, where)
    except _Bad as e:
        return [_Entry(None, None, str(e), nested=True)]
    outputs = obj["outputs"]
    if not isinstance(outputs, (list, tuple)):
        problem = f"outputs must be a list of vLLM CompletionOutput objects, got {_type_name(outputs)}"
        return [_Entry(base, None, problem, nested=True)]
    if not outputs:
        return [_Entry(base, None, "outputs is empty: the request has no sampled output to score", nested=True)]

    prompt: np.ndarray | None = None
    shared_problem = None
    try:
        pids = _field(obj, _PROMPT_IDS)
        if pids is None:
            raise _Bad(
                "a vLLM RequestOutput needs prompt_token_ids (the prompt as the policy saw it); "
                "its prompt text is not re-tokenized"
            )
        prompt = _token_ids(pids[1], pids[0], vocab_size)
    except _Bad as e:
        shared_problem = str(e)

    entries = []
    for pos, out in enumerate(outputs):
        rid = None
        try:
            if not isinstance(out, dict):
                raise _Bad(f"outputs[{pos}] must be an object (a vLLM CompletionOutput), got {_type_name(out)}")
            index = _output_index(out, pos)
            rid = None if base is None else f"{base}/{index}"
            if prompt is None:  # the line's prompt is unusable, so is every output of it
                raise _Bad(str(shared_problem))
            if out.get("token_ids") is None:
                raise _Bad(f"outputs[{pos}] has no token_ids (the sampled tokens)")
            response = _token_ids(out["token_ids"], f"outputs[{pos}].token_ids", vocab_size)
            if response.size == 0:
                raise _Bad(f"outputs[{pos}].token_ids is empty")
            _check_sizes(prompt, response, max_context)
            logprobs = _sampled_logprobs(out.get("logprobs"), response, pos)
            entries.append(_Entry(rid, _Parsed(prompt, response, logprobs, False), None, nested=True, output=pos))
        except _Bad as e:
            entries.append(_Entry(rid, None, str(e), nested=True, output=pos))
    return entries
