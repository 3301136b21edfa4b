"""The top-k distillation losses against hand derivations, and the student's top-k log-probs."""

from __future__ import annotations

import math

import pytest
import torch

from lopd.client.logprobs import gather_logprobs, token_logprobs
from lopd.client.topk_loss import (
    forward_kl_topk,
    generalized_jsd_topk,
    reverse_kl_topk,
    topk_distillation_loss,
)

ln = math.log
# One position, K = 2. Teacher: p_T = (1/2, 1/4) on its top 2 (tail 1/4). Student at those ids: (1/4, 1/4).
# Renormalised over the top 2: q_T = (2/3, 1/3), q_S = (1/2, 1/2).
TEACHER = torch.tensor([[ln(1 / 2), ln(1 / 4)]], dtype=torch.float64)
STUDENT = torch.tensor([[ln(1 / 4), ln(1 / 4)]], dtype=torch.float64)


def test_forward_kl_topk_unnormalised_as_verl() -> None:
    # 1/2 ln((1/2)/(1/4)) + 1/4 ln((1/4)/(1/4)) = ln(2) / 2: the tail is dropped, nothing renormalised.
    assert forward_kl_topk(STUDENT, TEACHER).item() == pytest.approx(ln(2) / 2, abs=1e-6)
    # The student putting more mass on the top K than the teacher makes it negative (verl clamps at 0 later):
    # p_S = (3/4, 1/8): 1/2 ln(2/3) + 1/4 ln(2) = -0.0295.
    more = torch.tensor([[ln(3 / 4), ln(1 / 8)]], dtype=torch.float64)
    assert forward_kl_topk(more, TEACHER).item() == pytest.approx(0.5 * ln(2 / 3) + 0.25 * ln(2), abs=1e-6)
    # log_prob_min clamps both first: student ln(1/8) -> ln(1/5) gives 1/2 ln(2/3) + 1/4 ln(5/4).
    clamped = forward_kl_topk(more, TEACHER, log_prob_min=ln(1 / 5)).item()
    assert clamped == pytest.approx(0.5 * ln(2 / 3) + 0.25 * ln(5 / 4), abs=1e-6)


def test_forward_kl_topk_renormalised() -> None:
    # KL(q_T || q_S) = 2/3 ln((2/3)/(1/2)) + 1/3 ln((1/3)/(1/2)) = 2/3 ln(4/3) + 1/3 ln(2/3) = 0.05663
    want = 2 / 3 * ln(4 / 3) + 1 / 3 * ln(2 / 3)
    assert forward_kl_topk(STUDENT, TEACHER, renormalize=True).item() == pytest.approx(want, abs=1e-6)


def test_reverse_kl_topk() -> None:
    # KL(q_S || q_T) = 1/2 ln((1/2)/(2/3)) + 1/2 ln((1/2)/(1/3)) = 1/2 ln(9/8) = 0.05889
    assert reverse_kl_topk(STUDENT, TEACHER).item() == pytest.approx(0.5 * ln(9 / 8), abs=1e-6)
    # Unnormalised: 1/4 ln((1/4)/(1/2)) + 1/4 ln(1) = -ln(2)/4.
    assert reverse_kl_topk(STUDENT, TEACHER, renormalize=False).item() == pytest.approx(-ln(2) / 4, abs=1e-6)


def test_generalized_jsd_topk() -> None:
    # beta = 1/2: M = (1/2)(2/3, 1/3) + (1/2)(1/2, 1/2) = (7/12, 5/12).
    # KL(q_T || M) = 2/3 ln(8/7) + 1/3 ln(4/5); KL(q_S || M) = 1/2 ln(6/7) + 1/2 ln(6/5) = 1/2 ln(36/35).
    want = 0.5 * (2 / 3 * ln(8 / 7) + 1 / 3 * ln(4 / 5)) + 0.5 * (0.5 * ln(36 / 35))
    assert generalized_jsd_topk(STUDENT, TEACHER, beta=0.5).item() == pytest.approx(want, abs=1e-7)
    # beta = 1/4: M = 1/4 q_T + 3/4 q_S = (13/24, 11/24); 1/4 KL(q_T || M) + 3/4 KL(q_S || M).
    kl_t = 2 / 3 * ln((2 / 3) / (13 / 24)) + 1 / 3 * ln((1 / 3) / (11 / 24))
    kl_s = 1 / 2 * ln((1 / 2) / (13 / 24)) + 1 / 2 * ln((1 / 2) / (11 / 24))
    assert generalized_jsd_topk(STUDENT, TEACHER, beta=0.25).item() == pytest.approx(
        0.25 * kl_t + 0.75 * kl_s, abs=1e-7
    )
    # The ends, as TRL takes them: beta 0 is KL(q_T || q_S), beta 1 is KL(q_S || q_T).
    assert generalized_jsd_topk(STUDENT, TEACHER, beta=0.0).item() == pytest.approx(
        2 / 3 * ln(4 / 3) + 1 / 3 * ln(2 / 3)
    )
    assert generalized_jsd_topk(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(0.5 * ln(9 / 8))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_topk(STUDENT, TEACHER, beta=1.5)


def test_full_vocabulary_forward_kl_gradient_is_student_minus_teacher() -> None:
    # With K = V the top-k forward KL is KL(p_T || softmax(z)), whose gradient w.r.t. z is softmax(z) - p_T.
    torch.manual_seed(0)
    v = 6
    logits = torch.randn(1, 3, v, dtype=torch.float64, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(1, 3, v, dtype=torch.float64), dim=-1)
    ids = torch.arange(v).expand(1, 3, v)
    student = gather_logprobs(logits, ids)  # position t is scored by logits[t - 1]
    mask = torch.tensor([[False, True, True]])
    loss, metrics = topk_distillation_loss("forward-kl-topk", student, teacher, mask)
    loss.backward()
    assert logits.grad is not None
    p_s = torch.softmax(logits.detach()[0, :2], dim=-1)
    want = (p_s - teacher[0, 1:].exp()) / 2  # the mean over the two response tokens
    torch.testing.assert_close(logits.grad[0, :2], want)
    torch.testing.assert_close(logits.grad[0, 2], torch.zeros(v, dtype=torch.float64))  # predicts nothing
    assert metrics["teacher_mass"].item() == pytest.approx(1.0) and metrics["tokens"].item() == 2


def test_gather_logprobs_is_log_softmax_shifted_and_its_gradient_is_exact() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5, 3))
    got = gather_logprobs(logits, ids, chunk_tokens=2)
    want = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:])
    torch.testing.assert_close(got[:, 1:], want)
    assert (got[:, 0] == 0).all()
    # K = 1 with the input ids is `token_logprobs`.
    input_ids = torch.randint(0, 11, (2, 5))
    torch.testing.assert_close(gather_logprobs(logits, input_ids[..., None])[..., 0], token_logprobs(logits, input_ids))
    assert torch.autograd.gradcheck(lambda x: gather_logprobs(x, ids, chunk_tokens=3), (logits,))


def test_masked_positions_do_not_leak_and_the_metrics() -> None:
    teacher = torch.cat([TEACHER, torch.tensor([[-math.inf, math.nan]], dtype=torch.float64)])[None]
    student = torch.cat([STUDENT, torch.tensor([[math.nan, 0.0]], dtype=torch.float64)])[None]
    mask = torch.tensor([[True, False]])
    s_lp, t_lp = torch.tensor([[-1.0, 5.0]]), torch.tensor([[-0.5, 9.0]])
    loss, m = topk_distillation_loss(
        "reverse-kl-topk", student, teacher, mask, student_logprobs=s_lp, teacher_logprobs=t_lp
    )
    assert loss.item() == pytest.approx(0.5 * ln(9 / 8), abs=1e-6)
    assert m["mean_advantage"].item() == pytest.approx(0.5) and m["reverse_kl"].item() == pytest.approx(-0.5)
    assert m["teacher_mass"].item() == pytest.approx(0.75) and m["student_mass"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown top-k loss"):
        topk_distillation_loss("kl", student, teacher, mask)  # type: ignore[arg-type]
