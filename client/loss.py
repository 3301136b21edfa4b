"""The Lightning OPD objective: on-policy distillation from precomputed teacher log-probs.

Each response token gets the advantage `A_t = log p_teacher(y_t) - log p_student(y_t)`, the
negative per-token reverse KL, treated as a constant (detached): the student is pushed up on
tokens the teacher likes more than it does and down on the others. Minimising
`-A_t * log p_student(y_t)` over student samples is a policy-gradient estimate of the gradient of
KL(student || teacher); when the rollouts were sampled by an older policy, PPO's clipped ratio
`exp(student - old)` and an optional truncated importance weight `min(exp(old - rollout), cap)`
correct for the difference.

This is only unbiased for the right teacher: the one that generated the student's SFT data
(teacher consistency, arXiv 2604.13010); `lopd.client.consistency` checks that before training.
"""

from __future__ import annotations

from typing import Literal

import torch

Normalize = Literal["token", "sequence"]


def lightning_opd_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    old_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    has_rollout_logprobs: torch.Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    tis_cap: float | None = None,
    normalize: Normalize = "token",
    token_count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy-gradient loss with the teacher's log-probs as per-token reward.

    All tensors are [B, T] and aligned as `collate_batch` and `token_logprobs` align them (a
    log-prob at the position of the token it scores). Per masked token:

        A   = (teacher - student).detach()
        r   = exp(student - old)                  old = student.detach() when not given (r == 1)
        w   = min(exp(old - rollout), tis_cap)    detached; 1 without tis_cap/rollout log-probs
        l_t = -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) * w

    `normalize="token"`: the sum of l_t over masked tokens divided by their number (or by
    `token_count`, to make gradient-accumulation micro-batches add up to the mean over the whole
    batch); `"sequence"`: the mean over sequences of each sequence's token mean. Rows with
    `has_rollout_logprobs` False get w = 1.

    Returns `(loss, metrics)`; metrics are detached 0-d tensors (call `.item()` when logging):
    `mean_advantage`, `reverse_kl` (mean of student - teacher, a Monte Carlo estimate of
    KL(student || teacher) on the student's own samples), `clip_frac` (share of tokens whose
    gradient the clipping removed), `mean_importance_weight`, `tokens`.
    """
    if not (student_logprobs.shape == teacher_logprobs.shape == response_mask.shape):
        raise ValueError(
            f"shapes differ: student {tuple(student_logprobs.shape)}, teacher {tuple(teacher_logprobs.shape)}, "
            f"mask {tuple(response_mask.shape)}"
        )
    if normalize not in ("token", "sequence"):
        raise ValueError(f"normalize is {normalize!r}; use 'token' or 'sequence'")
    dtype = torch.float32
    student = student_logprobs.to(dtype)
    teacher = teacher_logprobs.to(dtype)
    mask = response_mask.to(dtype)
    old = student.detach() if old_logprobs is None else old_logprobs.to(dtype).detach()

    # Masked positions may hold anything (padding, -inf); select them away rather than multiply
    # by 0, so no inf or nan leaks into the loss or the gradient.
    on = mask > 0
    zeros = torch.zeros_like(student)
    advantage = torch.where(on, teacher - student, zeros).detach()
    log_ratio = torch.where(on, student - old, zeros)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    weight = torch.ones_like(student)
    if tis_cap is not None and rollout_logprobs is not None:
        log_w = torch.where(on, old - rollout_logprobs.to(dtype), zeros)
        weight = torch.clamp(torch.exp(log_w), max=tis_cap).detach()
        if has_rollout_logprobs is not None:
            present = has_rollout_logprobs.to(torch.bool)
            if present.dim() == 1:
                present = present[:, None].expand_as(weight)
            weight = torch.where(present, weight, torch.ones_like(weight))
    per_token = torch.where(on, -torch.minimum(ratio * advantage, clipped * advantage) * weight, zeros)

    n_tokens = mask.sum()
    if normalize == "token":
        if token_count is None:
            denom = n_tokens.clamp(min=1.0)
        else:
            denom = torch.as_tensor(token_count, dtype=dtype, device=student.device)
        loss = per_token.sum() / denom
    else:
        per_seq_tokens = mask.sum(dim=-1)
        seq_mean = per_token.sum(dim=-1) / per_seq_tokens.clamp(min=1.0)
        has_tokens = (per_seq_tokens > 0).to(dtype)
        loss = (seq_mean * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)

    with torch.no_grad():
        n = n_tokens.clamp(min=1.0)
        mean_adv = (advantage * mask).sum() / n
        was_clipped = ((ratio < 1.0 - clip_eps_low) & (advantage < 0)) | (
            (ratio > 1.0 + clip_eps_high) & (advantage > 0)
        )
        metrics = {
            "mean_advantage": mean_adv,
            "reverse_kl": -mean_adv,
            "clip_frac": (was_clipped.to(dtype) * mask).sum() / n,
            "mean_importance_weight": (weight * mask).sum() / n,
            "tokens": n_tokens,
        }
    return loss, metrics
