"""Top-k scoring with the transformers backend against a naive full log-softmax plus `topk`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lopd.server.teachers.base import TopKScores, order_topk
from lopd.server.teachers.transformers_backend import TransformersTeacher, _topk_lowest_id_on_ties

ATOL = 1e-4
N_TOKENS = 99
# Very different lengths in one batch (padding must not leak into short rows).
MIXED = [(1, 60), (5, 1), (40, 7), (1, 1), (30, 50)]


def _records(spec: list[tuple[int, int]], seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, N_TOKENS, p).tolist() for p, _ in spec], [
        rng.integers(0, N_TOKENS, r).tolist() for _, r in spec
    ]


def naive_topk(
    model: Any, prompt: list[int], response: list[int], k: int, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Full float32 log-softmax of one unbatched forward, then every position's values sorted (desc, then id)."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : len(prompt) + len(response) - 1].numpy()
    all_ids = np.broadcast_to(np.arange(lp.shape[1]), lp.shape)
    ordered_ids, ordered = order_topk(all_ids, lp)
    return ordered_ids[:, :k], ordered[:, :k]


def assert_topk_matches(got: TopKScores, ref_ids: np.ndarray, ref_lps: np.ndarray, k: int) -> None:
    assert got.ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
    assert got.ids.shape == got.topk_logprobs.shape == ref_ids.shape == (len(got.logprobs), k)
    np.testing.assert_allclose(got.topk_logprobs, ref_lps, atol=ATOL, rtol=0)
    # The same ids, except where the reference's values tie within the tolerance (then either order is right).
    differ = got.ids != ref_ids
    if differ.any():
        near = np.abs(got.topk_logprobs[differ] - ref_lps[differ]) <= ATOL
        assert near.all(), "ids differ where the values do not tie"
    assert (np.diff(got.topk_logprobs, axis=1) <= 0).all()


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("k", [1, 8, 105])
def test_topk_exact_on_mixed_lengths(arch_dir: str, k: int, request: pytest.FixtureRequest) -> None:
    # k=105 is the whole vocabulary of the tiny tokenizer; the chunk holds 3 rows, so chunks split records.
    teacher = TransformersTeacher(
        request.getfixturevalue(arch_dir), top_k=k, temperature=0.8, head_chunk_bytes=3 * 128 * 4
    )
    prompts, responses = _records(MIXED, seed=k)
    got = teacher.score_topk(prompts, responses)
    plain = teacher.score(prompts, responses)
    for p, r, g, lp in zip(prompts, responses, got, plain):
        ref_ids, ref_lps = naive_topk(teacher.model, p, r, k, 0.8)
        assert_topk_matches(g, ref_ids, ref_lps, k)
        np.testing.assert_array_equal(g.logprobs, lp)  # the sampled tokens' log-probs: exactly what score gives
        in_top = g.ids == np.asarray(r)[:, None]
        np.testing.assert_array_equal(g.topk_logprobs[in_top], g.logprobs[in_top.any(axis=1)])


def test_ties_go_to_the_lower_id() -> None:
    logits = torch.tensor(
        [[0.0, 5.0, 1.0, 5.0, 5.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0], [9.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    )
    vals, idx = _topk_lowest_id_on_ties(logits, 2)
    assert sorted(idx[0].tolist()) == [1, 3] and sorted(idx[1].tolist()) == [0, 1] and idx[2].tolist() == [0, 5]
    ids, lps = order_topk(np.array([[4, 1, 3]]), np.array([[-1.0, -1.0, -0.5]], dtype=np.float32))
    assert ids.tolist() == [[3, 1, 4]] and lps.tolist() == [[-0.5, -1.0, -1.0]]


def test_without_top_k_score_topk_refuses(tiny_llama_dir: Path) -> None:
    teacher = TransformersTeacher(tiny_llama_dir)
    with pytest.raises(ValueError, match="top_k"):
        teacher.score_topk([[1, 2]], [[3]])
