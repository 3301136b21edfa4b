"""The Lightning OPD loss of one training batch: the student's forward, its log-probs, the loss (needs torch).

One function for every trainer of this package, so that `lopd train`, the Hugging Face `Trainer`
(`lopd.integrations.hf`) and a parity test compute the same number from the same batch. The
settings it reads (clipping, importance weights, the ratio's reference, the normalisation) are
`TrainConfig`'s fields; any object with those attributes will do.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol, cast

import torch

from .config import TopKLoss
from .logprobs import gather_logprobs, token_logprobs
from .loss import lightning_opd_loss
from .topk_loss import topk_distillation_loss


class LossSettings(Protocol):
    """What the loss reads of a trainer's settings (`TrainConfig` has these fields)."""

    @property
    def ratio_reference(self) -> str: ...
    @property
    def clip_eps_low(self) -> float: ...
    @property
    def clip_eps_high(self) -> float: ...
    @property
    def tis_cap(self) -> float | None: ...
    @property
    def normalize(self) -> str: ...


def opd_batch_loss(
    cfg: LossSettings,
    model: Any,
    amp: AbstractContextManager[Any] | None,
    b: dict[str, Any],
    token_count: float | torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Lightning OPD loss of one batch (on the model's device) and its metrics, in float32.

    `amp` is the forward's precision context (`student.autocast`; None: none); `token_count` the
    token mean's denominator (all micro-batches of the step on every rank, so that their losses
    add up to the step's mean). `cfg.loss` (default lightning-opd) picks the loss; the top-k ones
    read the batch's `teacher_topk_ids` / `teacher_topk_logprobs` (`topk_loss`).
    """
    with amp if amp is not None else nullcontext():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    # Outside autocast: the log-probs are gathered in float32 from the (bf16) logits, chunk by chunk,
    # so the advantage, the ratio and the loss are float32 whatever the forward's dtype is.
    student_lp = token_logprobs(logits, b["input_ids"])  # aligned with teacher_logprobs
    kind = getattr(cfg, "loss", "lightning-opd")
    if kind != "lightning-opd":
        if "teacher_topk_ids" not in b:
            raise ValueError(f"--loss {kind} needs the teacher's top-k in the batch: fetch it with the top-k columns")
        return topk_distillation_loss(
            cast(TopKLoss, kind),
            gather_logprobs(logits, b["teacher_topk_ids"]),
            b["teacher_topk_logprobs"],
            b["response_mask"],
            student_logprobs=student_lp,
            teacher_logprobs=b["teacher_logprobs"],
            beta=getattr(cfg, "jsd_beta", 0.5),
            normalize=cfg.normalize,  # type: ignore[arg-type]
            token_count=token_count if cfg.normalize == "token" else None,
        )
    old = None
    if cfg.ratio_reference == "rollout":  # rows without rollout log-probs keep ratio 1
        has = b["has_rollout_logprobs"][:, None].expand_as(student_lp)
        old = torch.where(has, b["rollout_logprobs"], student_lp.detach())
    return lightning_opd_loss(
        student_lp,
        b["teacher_logprobs"],
        b["response_mask"],
        old_logprobs=old,
        rollout_logprobs=b["rollout_logprobs"],
        has_rollout_logprobs=b["has_rollout_logprobs"],
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        tis_cap=cfg.tis_cap,
        normalize=cfg.normalize,  # type: ignore[arg-type]
        token_count=token_count if cfg.normalize == "token" else None,
    )


def to_device(b: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (other values as they are)."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
