"""The student's log-probs at the positions where `collate` puts the teacher's (needs torch).

`token_logprobs(logits, input_ids)[b, t] = log_softmax(logits[b, t - 1])[input_ids[b, t]]`: the
logits of a causal LM at t - 1 predict the token at t, so after this shift the result lines up,
element for element, with the batch's `teacher_logprobs` (the convention is spelled out in
`lopd.client.collate`). Collation itself is numpy and needs no torch; this module does.
"""

from __future__ import annotations

from typing import Any

import torch


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


class _GatherLogprobs(torch.autograd.Function):
    """log_softmax(x)[ids] for K ids per position, by chunks of positions, in float32 (as `_TokenLogprob`)."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        b, n, _ = logits.shape
        compute = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty((b, n, ids.shape[-1]), dtype=compute, device=logits.device)
        lse = torch.empty((b, n), dtype=compute, device=logits.device)
        for s in range(0, n, chunk):
            x = logits[:, s : s + chunk].to(compute)
            lse[:, s : s + chunk] = torch.logsumexp(x, dim=-1)
            out[:, s : s + chunk] = x.gather(-1, ids[:, s : s + chunk]) - lse[:, s : s + chunk, None]
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        logits, ids, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[1], ctx.chunk):
            x = logits[:, s : s + ctx.chunk].to(lse.dtype)
            g_out = grad_out[:, s : s + ctx.chunk].to(lse.dtype)
            # d/dx [x_i - logsumexp(x)] summed over the K ids: onehot(ids) . g - softmax(x) * sum(g).
            g = torch.exp(x - lse[:, s : s + ctx.chunk, None]).mul_(-g_out.sum(dim=-1, keepdim=True))
            g.scatter_add_(-1, ids[:, s : s + ctx.chunk], g_out)
            grad[:, s : s + ctx.chunk] = g.to(grad.dtype)
        return grad, None, None


def gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, *, chunk_tokens: int = 8192) -> torch.Tensor:
    """The student's log-probs of K given tokens per position, aligned like the teacher's top-k.

    `out[b, t, k] = log_softmax(logits[b, t - 1])[ids[b, t, k]]` for t >= 1 and 0 at t = 0: with
    `ids = batch["teacher_topk_ids"]` it lines up with `batch["teacher_topk_logprobs"]`. Float32,
    chunked like `token_logprobs` (no float32 copy of [B, T, V]), differentiable w.r.t. `logits`.
    """
    if logits.dim() != 3 or ids.dim() != 3 or ids.shape[:2] != logits.shape[:2]:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} do not match")
    b, t, _ = logits.shape
    k = ids.shape[-1]
    first = torch.zeros((b, 1, k), dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
    if t < 2:
        return first.expand(b, t, k).clone()
    chunk = max(1, chunk_tokens // max(b, 1))
    scored = _GatherLogprobs.apply(logits[:, :-1], ids[:, 1:].to(device=logits.device, dtype=torch.long), chunk)
    return torch.cat([first, scored], dim=1)
