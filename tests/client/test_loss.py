"""lightning_opd_loss: gradients against hand-derived formulas, clipping, importance weights, metrics."""

from __future__ import annotations

import pytest
import torch

from lopd.client.collate import token_logprobs
from lopd.client.loss import lightning_opd_loss


def _batch(seed: int = 0, b: int = 3, t: int = 9, v: int = 13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, v, (b, t), generator=g)
    teacher = -torch.rand(b, t, generator=g, dtype=torch.float64) * 4
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, 3:7] = True
    mask[1, 1:9] = True
    mask[2, 5:6] = True
    return logits, ids, teacher * mask, mask


def _hand_grad(logits, ids, teacher, mask, per_token_scale):
    """d loss / d logits[b, t-1] = -(A_t * scale_t) * (onehot(ids[b, t]) - softmax(logits[b, t-1]))."""
    with torch.no_grad():
        student = token_logprobs(logits, ids)
        adv = teacher - student
        grad = torch.zeros_like(logits)
        for b, t in mask.nonzero().tolist():
            p = torch.softmax(logits[b, t - 1], -1)
            onehot = torch.nn.functional.one_hot(ids[b, t], logits.shape[-1]).to(logits.dtype)
            grad[b, t - 1] = -(adv[b, t] * per_token_scale[b, t]) * (onehot - p)
    return grad


def test_token_normalised_gradient_matches_the_hand_derived_formula():
    logits, ids, teacher, mask = _batch()
    logits.requires_grad_(True)
    student = token_logprobs(logits, ids)
    loss, m = lightning_opd_loss(student, teacher, mask)
    loss.backward()
    n = mask.sum()
    expected = _hand_grad(logits.detach(), ids, teacher, mask, torch.full(mask.shape, 1.0 / n, dtype=torch.float64))
    torch.testing.assert_close(logits.grad, expected.to(logits.grad.dtype), atol=1e-5, rtol=1e-4)
    # On-policy (old = student), the loss value is the reverse-KL estimate itself.
    rkl = ((student.detach() - teacher) * mask).sum() / n
    torch.testing.assert_close(loss.double(), rkl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["reverse_kl"].double(), rkl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m["mean_advantage"], -m["reverse_kl"])
    assert m["clip_frac"] == 0 and m["mean_importance_weight"] == 1 and m["tokens"] == n


def test_sequence_normalised_gradient_weights_each_sequence_equally():
    logits, ids, teacher, mask = _batch(seed=1)
    logits.requires_grad_(True)
    loss, _ = lightning_opd_loss(token_logprobs(logits, ids), teacher, mask, normalize="sequence")
    loss.backward()
    per_seq = mask.sum(-1, keepdim=True).double()
    scale = (1.0 / per_seq / mask.shape[0]).expand(mask.shape)
    expected = _hand_grad(logits.detach(), ids, teacher, mask, scale)
    torch.testing.assert_close(logits.grad, expected.to(logits.grad.dtype), atol=1e-5, rtol=1e-4)


def test_token_count_makes_micro_batches_add_up_to_the_batch_mean():
    logits, ids, teacher, mask = _batch(seed=2)
    student = token_logprobs(logits, ids)
    whole, _ = lightning_opd_loss(student, teacher, mask)
    n = mask.sum()
    parts = [
        lightning_opd_loss(student[i : i + 1], teacher[i : i + 1], mask[i : i + 1], token_count=n)[0] for i in range(3)
    ]
    torch.testing.assert_close(sum(parts), whole)


def test_clipping_zeroes_the_gradient_only_where_the_ratio_left_the_trust_region():
    # Four tokens: (advantage sign, ratio) = (+, 1.5), (+, 0.5), (-, 0.5), (-, 1.5); eps = 0.2.
    student = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]], dtype=torch.float64)
    old = -torch.log(ratio)  # exp(student - old) == ratio
    teacher = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)  # A = teacher - 0
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = lightning_opd_loss(student, teacher, mask, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=0.2)
    loss.backward()
    # Unclipped tokens: d(-r * A)/d student = -r * A, over N = 4 tokens; clipped ones: 0.
    expected = torch.tensor([[0.0, -0.5 * 1.0, 0.0, -1.5 * -1.0]], dtype=torch.float64) / 4
    torch.testing.assert_close(student.grad, expected)
    assert m["clip_frac"].item() == pytest.approx(0.5)
    # The value uses the clipped ratio where clipping is active: -(1.2*1 + 0.5*1 + 0.8*-1 + 1.5*-1) / 4.
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.5) / 4)
    # Asymmetric bounds: with a wide upper bound, the first token is not clipped any more.
    student.grad = None
    _, m2 = lightning_opd_loss(student, teacher, mask, old_logprobs=old, clip_eps_low=0.2, clip_eps_high=1.0)
    assert m2["clip_frac"].item() == pytest.approx(0.25)


def test_truncated_importance_weights_are_capped_detached_and_skip_rows_without_rollouts():
    student = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.ones(2, 3, dtype=torch.float64)
    rollout = torch.log(torch.tensor([[0.5, 2.0, 0.1], [1.0, 1.0, 1.0]], dtype=torch.float64))
    mask = torch.ones(2, 3, dtype=torch.bool)
    has = torch.tensor([True, False])
    loss, m = lightning_opd_loss(
        student, teacher, mask, rollout_logprobs=rollout, has_rollout_logprobs=has, tis_cap=3.0
    )  # w = min(exp(0 - rollout), 3) = [2, 0.5, 3] for row 0; row 1 has none: 1
    loss.backward()
    w = torch.tensor([[2.0, 0.5, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(student.grad, -w / 6)
    assert m["mean_importance_weight"].item() == pytest.approx(w.mean().item())
    # Without a cap, rollout log-probs are ignored.
    _, m_off = lightning_opd_loss(student, teacher, mask, rollout_logprobs=rollout)
    assert m_off["mean_importance_weight"] == 1


def test_padding_never_leaks_nan_and_bad_arguments_are_refused():
    student = torch.tensor([[0.0, -1.0, float("-inf")]], requires_grad=True)
    teacher = torch.tensor([[0.0, -2.0, 0.0]])
    mask = torch.tensor([[False, True, False]])
    loss, m = lightning_opd_loss(student, teacher, mask, old_logprobs=torch.tensor([[0.0, -1.0, 5.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="shapes differ"):
        lightning_opd_loss(student, teacher[:, :2], mask)
    with pytest.raises(ValueError, match="normalize"):
        lightning_opd_loss(student, teacher, mask, normalize="batch")  # type: ignore[arg-type]
