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

from .fields import (
    PROMPT_IDS,
    RESPONSE_SIDE,
    BadRecord,
    ParsedRecord,
    RecordEntry,
    check_sizes,
    logprobs,
    pick_field,
    record_id,
    token_ids,
    type_name,
)

_KEYS_SHOWN = 5


def is_request_output(obj: dict[str, Any]) -> bool:
    """True for a line in vLLM's nested `RequestOutput` shape (see the module docstring)."""
    return obj.get("outputs") is not None and not any(obj.get(n) is not None for n in RESPONSE_SIDE)


def _base_id(obj: dict[str, Any], where: str | None) -> str | None:
    """The line's `id`, else its `request_id`, else `where`; None only when `where` is None too."""
    if obj.get("id") is not None:
        return record_id(obj)
    rid = obj.get("request_id")
    if rid is None:
        return where
    if isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise BadRecord(f"request_id must be a string or an integer, got {type_name(rid)} {rid!r}")
    s = str(rid)
    if not s.strip():
        raise BadRecord("request_id is empty")
    return s


def _output_index(out: dict[str, Any], pos: int) -> int:
    index = out.get("index")
    if index is None:
        return pos
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise BadRecord(f"outputs[{pos}].index must be a non-negative integer, got {type_name(index)} {index!r}")
    return int(index)


def _sampled_logprobs(value: Any, tokens: np.ndarray, pos: int) -> np.ndarray | None:
    """The log-prob of each sampled token, picked by its id from vLLM's per-position `{id: Logprob}` objects."""
    field = f"outputs[{pos}].logprobs"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise BadRecord(
            f"{field} must be a list with one {{token id: {{logprob, rank, decoded_token}}}} object per "
            f"sampled token, or null; got {type_name(value)}"
        )
    if len(value) != tokens.size:
        raise BadRecord(
            f"{field} has {len(value)} positions but outputs[{pos}].token_ids has {tokens.size} tokens; "
            "they must match one to one"
        )
    picked: list[Any] = []
    for j, (entry, tok) in enumerate(zip(value, tokens.tolist())):
        if not isinstance(entry, dict):
            raise BadRecord(f"{field}[{j}] must be an object keyed by token id, got {type_name(entry)}")
        lp = entry.get(str(tok))  # JSON object keys are strings
        if lp is None:
            lp = entry.get(tok)  # dicts built in Python keep integer keys
        if lp is None:
            keys = [str(k) for k, v in entry.items() if v is not None]
            shown = ", ".join(keys[:_KEYS_SHOWN]) + (" ..." if len(keys) > _KEYS_SHOWN else "")
            raise BadRecord(
                f"{field}[{j}] has no entry for the sampled token {tok} (it has {shown or 'none'}); "
                f"were these log-probs written for other token_ids?"
            )
        if isinstance(lp, dict):
            lp = lp.get("logprob")
        if type(lp) not in (float, int):
            raise BadRecord(f"{field}[{j}]['{tok}'].logprob is {lp!r} ({type_name(lp)}), not a number")
        picked.append(lp)
    return logprobs(picked, int(tokens.size), False, field=field)


def expand_request_output(
    obj: dict[str, Any], vocab_size: int | None, max_context: int | None, where: str | None
) -> list[RecordEntry]:
    """One entry per element of `outputs`, or a single entry when the line as a whole is unusable.

    `where` (`file:LINE`) stands in for the id when the line has neither `id` nor `request_id`; pass
    None when it is unknown (reading back), and such records get no id to check against.
    """
    try:
        base = _base_id(obj, where)
    except BadRecord as e:
        return [RecordEntry(None, None, str(e), nested=True)]
    outputs = obj["outputs"]
    if not isinstance(outputs, (list, tuple)):
        problem = f"outputs must be a list of vLLM CompletionOutput objects, got {type_name(outputs)}"
        return [RecordEntry(base, None, problem, nested=True)]
    if not outputs:
        return [RecordEntry(base, None, "outputs is empty: the request has no sampled output to score", nested=True)]

    prompt: np.ndarray | None = None
    shared_problem = None
    try:
        pids = pick_field(obj, PROMPT_IDS)
        if pids is None:
            raise BadRecord(
                "a vLLM RequestOutput needs prompt_token_ids (the prompt as the policy saw it); "
                "its prompt text is not re-tokenized"
            )
        prompt = token_ids(pids[1], pids[0], vocab_size)
    except BadRecord as e:
        shared_problem = str(e)

    entries = []
    for pos, out in enumerate(outputs):
        rid = None
        try:
            if not isinstance(out, dict):
                raise BadRecord(f"outputs[{pos}] must be an object (a vLLM CompletionOutput), got {type_name(out)}")
            index = _output_index(out, pos)
            rid = None if base is None else f"{base}/{index}"
            if prompt is None:  # the line's prompt is unusable, so is every output of it
                raise BadRecord(str(shared_problem))
            if out.get("token_ids") is None:
                raise BadRecord(f"outputs[{pos}] has no token_ids (the sampled tokens)")
            response = token_ids(out["token_ids"], f"outputs[{pos}].token_ids", vocab_size)
            if response.size == 0:
                raise BadRecord(f"outputs[{pos}].token_ids is empty")
            check_sizes(prompt, response, max_context)
            rollout_lp = _sampled_logprobs(out.get("logprobs"), response, pos)
            parsed = ParsedRecord(prompt, response, rollout_lp, False)
            entries.append(RecordEntry(rid, parsed, None, nested=True, output=pos))
        except BadRecord as e:
            entries.append(RecordEntry(rid, None, str(e), nested=True, output=pos))
    return entries
