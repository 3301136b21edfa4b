"""Collation puts each log-prob at the position of the token it scores; token_logprobs agrees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lopd.client.collate import collate_arrays, collate_batch
from lopd.client.loader import OPDLoader
from lopd.client.logprobs import token_logprobs
from lopd.storage.schema import build_table


def _reference(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(out[:, :1]), out], dim=1)


def test_collate_layout_by_hand():
    table = build_table(
        ["a", "b"],
        [np.array([1, 2, 3]), np.array([4])],
        [np.array([5, 6]), np.array([7, 8, 9])],
        [np.array([-0.5, -0.25], np.float32), np.array([-1.0, -2.0, -3.0], np.float32)],
        [None, np.array([-1.5, -2.5, -3.5], np.float32)],
    )
    b = collate_batch(table, pad_id=99, pad_to_multiple_of=8, indices=[10, 3])
    assert b["input_ids"].tolist() == [[1, 2, 3, 5, 6, 99, 99, 99], [4, 7, 8, 9, 99, 99, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    assert b["response_mask"].tolist() == [
        [False, False, False, True, True, False, False, False],
        [False, True, True, True, False, False, False, False],
    ]
    assert b["teacher_logprobs"].tolist() == [[0, 0, 0, -0.5, -0.25, 0, 0, 0], [0, -1, -2, -3, 0, 0, 0, 0]]
    assert b["rollout_logprobs"].tolist() == [[0] * 8, [0, -1.5, -2.5, -3.5, 0, 0, 0, 0]]
    assert b["has_rollout_logprobs"].tolist() == [False, True]
    assert b["prompt_lengths"].tolist() == [3, 1] and b["response_lengths"].tolist() == [2, 3]
    assert b["index"].tolist() == [10, 3] and b["sample_id"] == ["a", "b"]
    with pytest.raises(ValueError, match="empty batch"):
        collate_batch(table.slice(0, 0))
    # A sliced table (non-zero Arrow offsets) collates the rows it shows.
    assert collate_batch(table.slice(1, 1))["input_ids"].tolist() == [[4, 7, 8, 9]]

    # The numpy batch (no torch needed) holds the same values in the same dtypes.
    arrays = collate_arrays(table, pad_id=99, pad_to_multiple_of=8, indices=[10, 3])
    assert arrays.keys() == b.keys()
    for key, value in b.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(arrays[key], np.ndarray) and arrays[key].dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(arrays[key], value.numpy())
    assert arrays["input_ids"].dtype == np.int64 and arrays["response_mask"].dtype == np.bool_


def test_token_logprobs_is_still_importable_from_collate():
    from lopd.client import collate

    assert collate.token_logprobs is token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_token_logprobs_matches_log_softmax_values_and_gradients(dtype, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(3, 7, 11) * 3).to(dtype).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 7))
    upstream = torch.randn(3, 7)
    ours = token_logprobs(logits, ids, temperature=temperature, chunk_tokens=4)  # several chunks
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = _reference(ref_logits, ids, temperature)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ours.dtype == torch.float32 and ours.shape == (3, 7)
    assert torch.all(ours[:, 0] == 0)
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), atol=tol, rtol=tol)


def test_token_logprobs_gradcheck():
    logits = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 6, (2, 5))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, ids, chunk_tokens=3), (logits,))


def test_teacher_logprobs_sit_where_token_logprobs_puts_the_same_token(served, tiny_llama_dir):
    """End to end: the store's teacher log-probs (scored one sequence at a time by the tiny Llama)
    come back through HTTP + collation at the positions where token_logprobs(model(batch)) has them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    with served.client() as client:
        batches = list(OPDLoader(client, "scored", 7, seed=1, pad_id=0))
    checked = 0
    for b in batches:
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ours = token_logprobs(logits, b["input_ids"])
        mask = b["response_mask"]
        torch.testing.assert_close(ours[mask], b["teacher_logprobs"][mask], atol=1e-4, rtol=1e-4)
        assert torch.all(b["teacher_logprobs"][~mask] == 0)
        # The guard that makes the test bite: without the shift the numbers do not line up.
        unshifted = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][..., None]).squeeze(-1)
        assert not torch.allclose(unshifted[mask], b["teacher_logprobs"][mask], atol=1e-2)
        checked += int(mask.sum())
    assert checked == sum(len(r) for r in served.store.samples["scored"]["responses"])
