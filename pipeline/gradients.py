"""The paper's theory, measured: how far the offline gradient is from the online one.

Lightning OPD's gradient is taken on rollouts sampled once from the SFT student; online OPD's on
fresh samples from the current student. Under teacher consistency the paper bounds the gap
between them; without it, it predicts an irreducible bias. At a checkpoint this module takes
both gradients of the same loss (the paper's ratio-1 update, `online_opd.opd_loss`) for one
teacher: on a fixed batch of stored rollouts, and on fresh samples of the same prompts from the
current model, scored by the live teacher. Their cosine and norm ratio say how well the offline
gradient stands in for the online one.

A cosine below 1 is expected from sampling noise alone, so a second fresh batch (another seed)
gives the noise ceiling: the cosine of two online gradients. An offline gradient is as good as an
online one when its cosine to the online gradient reaches that ceiling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from . import lm
from .online_opd import opd_loss


@dataclass
class GradientComparison:
    cosine: float  # cos(offline gradient, online gradient)
    norm_ratio: float  # |offline| / |online|
    noise_cosine: float  # cos(online gradient, online gradient on another fresh batch): the ceiling

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class StoredBatch:
    """A fixed batch of stored rollouts with the teacher's log-probs of them (what the store holds)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    teacher_logprobs: list[np.ndarray]


def flat_gradient(model: Any, loss: torch.Tensor) -> torch.Tensor:
    """The loss's gradient over every trainable parameter, flattened (the model's `.grad` is not touched)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def compare_gradients(
    model: Any, tok: Any, stored: StoredBatch, teacher: Any, *, seed: int, max_new_tokens: int
) -> GradientComparison:
    """Offline against online gradient of `model` for `teacher` (a `Teacher`), and the online noise ceiling."""
    pad = tok.pad_token_id
    offline = flat_gradient(model, opd_loss(model, pad, stored.prompts, stored.responses, stored.teacher_logprobs))
    online = []
    for k in range(2):
        with torch.no_grad():
            responses, _ = lm.sample(model, tok, stored.prompts, max_new_tokens=max_new_tokens, seed=seed + k)
        scored = teacher.score(stored.prompts, responses)
        online.append(flat_gradient(model, opd_loss(model, pad, stored.prompts, responses, scored)))
    return GradientComparison(
        cosine=_cosine(offline, online[0]),
        norm_ratio=float(offline.norm() / online[0].norm().clamp_min(1e-30)),
        noise_cosine=_cosine(online[0], online[1]),
    )


def stored_batch(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], teacher: Any, n: int
) -> StoredBatch:
    """The first `n` rollouts, scored by `teacher` as `lopd precompute` scores them."""
    p, r = [list(x) for x in prompts[:n]], [list(x) for x in responses[:n]]
    return StoredBatch(p, r, teacher.score(p, r))
