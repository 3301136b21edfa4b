"""From Arrow rows to padded arrays: the batch a trainer gets, in numpy, or as torch tensors.

The one convention that everything here follows, and that a trainer must not get wrong:

    a log-prob is stored AT THE POSITION OF THE TOKEN IT SCORES.

`teacher_logprobs[b, t] = log p_teacher(input_ids[b, t] | input_ids[b, :t])`, and
`token_logprobs(logits, input_ids)[b, t] = log_softmax(logits[b, t - 1])[input_ids[b, t]]` for a
causal LM (`lopd.client.logprobs`), whose logits at position t - 1 predict the token at t. Both
are therefore compared element-wise, under `response_mask`, with no further shifting. Position 0
predicts nothing and holds 0. (Storing at the predicting position instead would be the classic
off-by-one that makes distillation silently train on the wrong token.)

Collation is numpy (`collate_arrays`) and needs no torch; `to_torch` and `collate_batch` give
torch tensors and need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

from lopd.arrow import list_column
from lopd.http_contract import (
    PROMPT_IDS,
    RESPONSE_IDS,
    ROLLOUT_LOGPROBS,
    SAMPLE_ID,
    TEACHER_LOGPROBS,
    TEACHER_TOPK_IDS,
    TEACHER_TOPK_LOGPROBS,
)

from .errors import ProtocolError


def require_torch(what: str) -> ModuleType:
    """The torch module; `ModuleNotFoundError` naming `what` needs it when torch is not installed."""
    try:
        import torch
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{what} needs torch, which is not installed: pip install torch (the client's numpy batches do not)",
            name="torch",
        ) from e
    return torch


def _scatter_rows(out: np.ndarray, lengths: np.ndarray, values: np.ndarray, first_col: np.ndarray) -> None:
    """out[b, first_col[b] + j] = j-th value of row b, for every row at once (no Python loop)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths) + first_col[rows]
    out[rows, cols] = values


def collate_arrays(
    table: pa.Table,
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Right-padded numpy arrays for a batch of served samples (rows with the contract's `SERVED_COLUMNS`).

    Returns `input_ids` [B, T] int64 (prompt then response, then `pad_id`), `attention_mask`
    [B, T] int64, `response_mask` [B, T] bool (True at response tokens), `teacher_logprobs` and
    `rollout_logprobs` [B, T] float32 at the positions of the tokens they score (0 elsewhere,
    and 0 for rows without rollout log-probs), `has_rollout_logprobs` [B] bool,
    `prompt_lengths` / `response_lengths` [B] int64, `sample_id` (list of str) and, when given,
    `index` [B] int64 (dataset indices).

    When the rows hold the teacher's top-k (a fetch with the `TOPK_COLUMNS`), also
    `teacher_topk_ids` [B, T, K] int64 and `teacher_topk_logprobs` [B, T, K] float32, aligned like
    `teacher_logprobs`: at [b, t] the teacher's K most likely tokens for position t (predicted from
    the tokens before it), by descending log-prob; 0 at positions that are not response tokens.
    """
    b = table.num_rows
    if b == 0:
        raise ValueError("cannot collate an empty batch")
    prompts, responses = list_column(table[PROMPT_IDS]), list_column(table[RESPONSE_IDS])
    teachers, rollouts = list_column(table[TEACHER_LOGPROBS]), list_column(table[ROLLOUT_LOGPROBS])
    p_len, p_val = prompts.lengths, prompts.flat()
    r_len, r_val = responses.lengths, responses.flat()
    t_len, t_val = teachers.lengths, teachers.flat()
    o_len, o_val, has_rollout = rollouts.lengths, rollouts.flat(), rollouts.valid
    if not np.array_equal(t_len, r_len):
        row = int(np.nonzero(t_len != r_len)[0][0])
        raise ProtocolError(f"row {row}: {t_len[row]} teacher log-probs for {r_len[row]} response tokens")
    if not np.array_equal(o_len[has_rollout], r_len[has_rollout]):
        raise ProtocolError("a row's rollout log-probs do not match its response length")

    total = p_len + r_len
    t = int(total.max())
    if pad_to_multiple_of:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of
    zeros = np.zeros(b, dtype=np.int64)
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    _scatter_rows(input_ids, p_len, p_val, zeros)
    _scatter_rows(input_ids, r_len, r_val, p_len)
    teacher = np.zeros((b, t), dtype=np.float32)
    _scatter_rows(teacher, r_len, t_val, p_len)
    rollout = np.zeros((b, t), dtype=np.float32)
    _scatter_rows(rollout, o_len, o_val, p_len)

    cols = np.arange(t)[None, :]
    attention = cols < total[:, None]
    response = attention & (cols >= p_len[:, None])
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention.astype(np.int64),
        "response_mask": response,
        "teacher_logprobs": teacher,
        "rollout_logprobs": rollout,
        "has_rollout_logprobs": has_rollout.astype(bool),
        "prompt_lengths": p_len,
        "response_lengths": r_len,
        "sample_id": table.column(SAMPLE_ID).to_pylist(),
    }
    if TEACHER_TOPK_IDS in table.column_names:
        batch[TEACHER_TOPK_IDS], batch[TEACHER_TOPK_LOGPROBS] = _collate_topk(table, r_len, p_len, t)
    if indices is not None:
        batch["index"] = np.asarray(indices, dtype=np.int64)
    return batch


def _collate_topk(table: pa.Table, r_len: np.ndarray, p_len: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, T, K] top-k ids and log-probs, row b's response position j at column p_len[b] + j."""
    ids, lps = list_column(table[TEACHER_TOPK_IDS]), list_column(table[TEACHER_TOPK_LOGPROBS])
    if not np.array_equal(ids.lengths, lps.lengths):
        raise ProtocolError("a row's top-k ids and log-probs differ in number")
    k = int(ids.lengths[0] // max(int(r_len[0]), 1))
    if k < 1 or not np.array_equal(ids.lengths, r_len * k):
        raise ProtocolError("the rows' top-k columns do not hold K values per response token for one K")
    b = len(r_len)
    out_ids = np.zeros((b, t, k), dtype=np.int64)
    out_lps = np.zeros((b, t, k), dtype=np.float32)
    _scatter_rows(out_ids, r_len, ids.flat().reshape(-1, k), p_len)
    _scatter_rows(out_lps, r_len, lps.flat().reshape(-1, k), p_len)
    return out_ids, out_lps


def to_torch(batch: dict[str, Any], *, pin_memory: bool = False) -> dict[str, Any]:
    """The batch with its numpy arrays as torch tensors (sharing memory; pinned when asked); needs torch.

    Other values (`sample_id`, `epoch`, ...) are kept as they are.
    """
    torch = require_torch("to_torch")
    out = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    if pin_memory:
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def collate_batch(
    table: pa.Table,
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """`collate_arrays` as torch tensors (same keys, dtypes and shapes); needs torch."""
    return to_torch(collate_arrays(table, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of, indices=indices))


def __getattr__(name: str) -> Any:
    # `token_logprobs` was defined here before it moved to `.logprobs` (it needs torch, collation
    # does not); `from lopd.client.collate import token_logprobs` keeps working.
    if name == "token_logprobs":
        from .logprobs import token_logprobs

        return token_logprobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
