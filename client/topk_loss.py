"""Distillation losses on the teacher's stored top-k: forward KL, reverse KL, generalised JSD (needs torch).

Lightning OPD needs one number per token; logit distillation (verl, TRL's GKD, DistillKit) wants
the teacher's distribution. A store built with `lopd precompute --top-k K` holds its K most likely
next tokens at every response position, so these losses compare the student with the teacher on
that support, per response token of the student's own rollouts. The inputs are [B, T, K]:

    teacher = batch["teacher_topk_logprobs"]                     full-vocabulary log-probs, descending
    student = gather_logprobs(logits, batch["teacher_topk_ids"])  the student's, at the same ids

Conventions, stated because the references differ in them (the mass outside the top K, the tail,
is never seen):

* `forward_kl_topk` (verl's `forward_kl_topk`, `verl/trainer/distillation/fsdp/losses.py`):
  `sum_k p_T(k) (log p_T(k) - log p_S(k))` with both log-probs taken over the full vocabulary and
  NOT renormalised: the tail is dropped, so the value is not a divergence (it can be negative when
  the student puts more mass on the top K than the teacher; verl clamps the loss at 0 downstream).
  `log_prob_min` clamps both log-probs from below first (verl's `log_prob_min_clamp`).
  `renormalize=True` renormalises both over the K ids instead: the KL of the two distributions
  restricted to the teacher's top K, >= 0.
* `reverse_kl_topk`: `sum_k q_S(k) (log q_S(k) - log q_T(k))`, q renormalised over the teacher's
  top K (a reverse KL needs the student's distribution; on the top K that is its renormalised
  restriction). `renormalize=False` uses the unnormalised log-probs like `forward_kl_topk`.
* `generalized_jsd_topk` (GKD, Agarwal et al. 2024; TRL's `GKDTrainer.generalized_jsd_loss`):
  with q renormalised over the top K and `M = beta * q_T + (1 - beta) * q_S`,
  `beta * KL(q_T || M) + (1 - beta) * KL(q_S || M)`; `beta = 0` is taken as KL(q_T || q_S) and
  `beta = 1` as KL(q_S || q_T), as TRL does (the mixture formula tends to 0 at both ends).
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from .config import TopKLoss
from .loss import Normalize

TOPK_LOSSES: tuple[TopKLoss, ...] = get_args(TopKLoss)


def _renormalized(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)


def forward_kl_topk(
    student: torch.Tensor, teacher: torch.Tensor, *, renormalize: bool = False, log_prob_min: float | None = None
) -> torch.Tensor:
    """Per position [..., K] -> [...]: `sum_k p_T (log p_T - log p_S)` (verl's convention; see the module)."""
    s, t = student.float(), teacher.float()
    if renormalize:
        s, t = _renormalized(s), _renormalized(t)
    if log_prob_min is not None:
        s, t = s.clamp_min(log_prob_min), t.clamp_min(log_prob_min)
    return (t.exp() * (t - s)).sum(dim=-1)


def reverse_kl_topk(student: torch.Tensor, teacher: torch.Tensor, *, renormalize: bool = True) -> torch.Tensor:
    """Per position [..., K] -> [...]: `sum_k q_S (log q_S - log q_T)` over the teacher's top K."""
    s, t = student.float(), teacher.float()
    if renormalize:
        s, t = _renormalized(s), _renormalized(t)
    return (s.exp() * (s - t)).sum(dim=-1)


def generalized_jsd_topk(student: torch.Tensor, teacher: torch.Tensor, *, beta: float = 0.5) -> torch.Tensor:
    """Per position [..., K] -> [...]: GKD's generalised JSD on the top K, both renormalised (see the module)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta is {beta}; it must be in [0, 1]")
    s, t = _renormalized(student.float()), _renormalized(teacher.float())
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(dim=-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(dim=-1)
    m = torch.logsumexp(torch.stack([s + math.log1p(-beta), t + math.log(beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(dim=-1) + (1.0 - beta) * (s.exp() * (s - m)).sum(dim=-1)


def topk_distillation_loss(
    kind: TopKLoss,
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    student_logprobs: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    beta: float = 0.5,
    normalize: Normalize = "token",
    token_count: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean of a per-position top-k loss over response tokens, and metrics (`lightning_opd_loss`'s keys).

    [B, T, K] log-probs, [B, T] mask; `normalize` and `token_count` as in `lightning_opd_loss`.
    Metrics: `topk_divergence` (the mean per-token value), `teacher_mass` and `student_mass` (the
    probability each puts on the top K), and, from the sampled tokens' [B, T] log-probs when given,
    `mean_advantage` = mean(teacher - student) and `reverse_kl` = its negative, as the Lightning OPD
    loss reports them; `clip_frac` 0 and `mean_importance_weight` 1 (no ratio here).
    """
    if (
        student_topk_logprobs.shape != teacher_topk_logprobs.shape
        or teacher_topk_logprobs.shape[:2] != response_mask.shape
    ):
        raise ValueError(
            f"shapes differ: student {tuple(student_topk_logprobs.shape)}, "
            f"teacher {tuple(teacher_topk_logprobs.shape)}, mask {tuple(response_mask.shape)}"
        )
    if kind == "forward-kl-topk":
        per_pos = forward_kl_topk(student_topk_logprobs, teacher_topk_logprobs)
    elif kind == "reverse-kl-topk":
        per_pos = reverse_kl_topk(student_topk_logprobs, teacher_topk_logprobs)
    elif kind == "jsd-topk":
        per_pos = generalized_jsd_topk(student_topk_logprobs, teacher_topk_logprobs, beta=beta)
    else:
        raise ValueError(f"unknown top-k loss {kind!r}; use one of {', '.join(TOPK_LOSSES)}")
    on = response_mask > 0
    mask = on.to(torch.float32)
    per_token = torch.where(on, per_pos, torch.zeros_like(per_pos))  # padding may hold anything
    n_tokens = mask.sum()
    if normalize == "token":
        denom = n_tokens.clamp(min=1.0) if token_count is None else torch.as_tensor(token_count, dtype=torch.float32)
        loss = per_token.sum() / denom
    elif normalize == "sequence":
        per_seq = mask.sum(dim=-1)
        has = (per_seq > 0).to(torch.float32)
        loss = (per_token.sum(dim=-1) / per_seq.clamp(min=1.0) * has).sum() / has.sum().clamp(min=1.0)
    else:
        raise ValueError(f"normalize is {normalize!r}; use 'token' or 'sequence'")

    with torch.no_grad():
        n = n_tokens.clamp(min=1.0)
        zeros = torch.zeros_like(per_token)

        def mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(on, x.float(), zeros).sum() / n

        advantage = zeros
        if student_logprobs is not None and teacher_logprobs is not None:
            advantage = teacher_logprobs.float() - student_logprobs.float()
        metrics = {
            "topk_divergence": mean(per_pos.detach()),
            "teacher_mass": mean(teacher_topk_logprobs.float().exp().sum(dim=-1)),
            "student_mass": mean(student_topk_logprobs.detach().float().exp().sum(dim=-1)),
            "mean_advantage": mean(advantage.detach()),
            "reverse_kl": -mean(advantage.detach()),
            "clip_frac": torch.zeros((), device=per_token.device),
            "mean_importance_weight": torch.ones((), device=per_token.device),
            "tokens": n_tokens,
        }
    return loss, metrics
