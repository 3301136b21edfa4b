"""From Arrow rows to padded tensors, and the student's log-probs at the same positions.

The one convention that everything here follows, and that a trainer must not get wrong:

    a log-prob is stored AT THE POSITION OF THE TOKEN IT SCORES.

`teacher_logprobs[b, t] = log p_teacher(input_ids[b, t] | input_ids[b, :t])`, and
`token_logprobs(logits, input_ids)[b, t] = log_softmax(logits[b, t - 1])[input_ids[b, t]]` for a
causal LM, whose logits at position t - 1 predict the token at t. Both tensors are therefore
compared element-wise, under `response_mask`, with no further shifting. Position 0 predicts
nothing and holds 0. (Storing at the predicting position instead would be the classic
off-by-one that makes distillation silently train on the wrong token.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from lopd.arrow import list_column
from lopd.http_contract import PROMPT_IDS, RESPONSE_IDS, ROLLOUT_LOGPROBS, SAMPLE_ID, TEACHER_LOGPROBS

from .errors import ProtocolError


def _scatter_rows(out: np.ndarray, lengths: np.ndarray, values: np.ndarray, first_col: np.ndarray) -> None:
    """out[b, first_col[b] + j] = j-th value of row b, for every row at once (no Python loop)."""
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    cols = np.arange(len(values)) - np.repeat(starts, lengths) + first_col[rows]
    out[rows, cols] = values


def collate_batch(
    table: pa.Table,
    *,
    pad_id: int = 0,
    pad_to_multiple_of: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Right-padded tensors for a batch of served samples (rows with the contract's `SERVED_COLUMNS`).

    Returns `input_ids` [B, T] int64 (prompt then response, then `pad_id`), `attention_mask`
    [B, T] int64, `response_mask` [B, T] bool (True at response tokens), `teacher_logprobs` and
    `rollout_logprobs` [B, T] float32 at the positions of the tokens they score (0 elsewhere,
    and 0 for rows without rollout log-probs), `has_rollout_logprobs` [B] bool,
    `prompt_lengths` / `response_lengths` [B] int64, `sample_id` (list of str) and, when given,
    `index` [B] int64 (dataset indices).
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
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention.astype(np.int64)),
        "response_mask": torch.from_numpy(response),
        "teacher_logprobs": torch.from_numpy(teacher),
        "rollout_logprobs": torch.from_numpy(rollout),
        "has_rollout_logprobs": torch.from_numpy(has_rollout.astype(bool)),
        "prompt_lengths": torch.from_numpy(p_len),
        "response_lengths": torch.from_numpy(r_len),
        "sample_id": table.column(SAMPLE_ID).to_pylist(),
    }
    if indices is not None:
        batch["index"] = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    return batch


class _TokenLogprob(torch.autograd.Function):
    """log_softmax(x / T)[target] by chunks of positions, in float32, without keeping [.., V] in float32.

    Autograd through `logsumexp(x.float())` would save every float32 chunk for the backward
    pass, i.e. the whole float32 copy of the logits. Here only the logits (in their own dtype,
    which autograd keeps anyway) and one float32 number per position (the logsumexp) are saved;
    the backward recomputes the softmax chunk by chunk.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, chunk: int, temperature: float) -> torch.Tensor:
        b, n, _ = logits.shape
        compute = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 input
        out = torch.empty((b, n), dtype=compute, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, n, chunk):
            x = logits[:, s : s + chunk].to(compute)
            if temperature != 1.0:
                x = x / temperature
            lse[:, s : s + chunk] = torch.logsumexp(x, dim=-1)
            out[:, s : s + chunk] = x.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1) - lse[:, s : s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        logits, targets, lse = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[1], chunk):
            x = logits[:, s : s + chunk].to(lse.dtype)
            if temperature != 1.0:
                x = x / temperature
            g_out = grad_out[:, s : s + chunk, None].to(lse.dtype)
            # d/dx [x_y - logsumexp(x)] = onehot(y) - softmax(x), times 1/T for the temperature.
            g = torch.exp(x - lse[:, s : s + chunk, None]).mul_(-g_out)
            g.scatter_add_(-1, targets[:, s : s + chunk, None], g_out)
            if temperature != 1.0:
                g.div_(temperature)
            grad[:, s : s + chunk] = g.to(grad.dtype)
        return grad, None, None, None


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, *, temperature: float = 1.0, chunk_tokens: int = 8192
) -> torch.Tensor:
    """Per-token log-probs of a causal LM, placed at the position of the token they score.

    `out[b, t] = log_softmax(logits[b, t - 1] / temperature)[input_ids[b, t]]` for t >= 1 and
    `out[b, 0] = 0`: logits at t - 1 predict the token at t, so after this shift `out` lines up
    with `teacher_logprobs` from `collate_batch` (compare them under `response_mask`).

    Computed as gather minus logsumexp in float32, `chunk_tokens` positions at a time, so a
    bf16 [B, T, V] logits tensor is never copied whole to float32 (forward or backward).
    Differentiable with respect to `logits`. Returns float32 [B, T] (float64 for float64 logits).
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} do not match")
    b, t, _ = logits.shape
    first = torch.zeros((b, 1), dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    if t < 2:
        return first.expand(b, t).clone()
    chunk = max(1, chunk_tokens // max(b, 1))
    targets = input_ids[:, 1:].to(device=logits.device, dtype=torch.long)
    scored = _TokenLogprob.apply(logits[:, :-1], targets, chunk, float(temperature))
    return torch.cat([first, scored], dim=1)
