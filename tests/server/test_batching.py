"""Length-bucketed batch planning: a partition of the indices that respects both budgets."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lopd.server.batching import plan_batches

lengths_st = st.lists(st.integers(min_value=0, max_value=2000), max_size=200)
tokens_st = st.integers(min_value=1, max_value=5000)
size_st = st.integers(min_value=1, max_value=64)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, max_tokens=tokens_st, max_batch_size=size_st)
def test_plan_is_a_partition_within_budget(lengths: list[int], max_tokens: int, max_batch_size: int) -> None:
    batches = plan_batches(lengths, max_tokens, max_batch_size)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    for batch in batches:
        assert 1 <= len(batch) <= max_batch_size
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= max_tokens or len(batch) == 1
    assert plan_batches(lengths, max_tokens, max_batch_size) == batches  # deterministic
    assert plan_batches(list(lengths), max_tokens, max_batch_size) == batches


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st, max_tokens=tokens_st, max_batch_size=size_st)
def test_plan_groups_similar_lengths(lengths: list[int], max_tokens: int, max_batch_size: int) -> None:
    """Batches come longest first and never interleave: that is what keeps padding low."""
    batches = plan_batches(lengths, max_tokens, max_batch_size)
    for earlier, later in zip(batches, batches[1:]):
        assert min(lengths[i] for i in earlier) >= max(lengths[i] for i in later)


def test_examples() -> None:
    assert plan_batches([], 10, 4) == []
    assert plan_batches([3, 1, 2], 100, 8) == [[0, 2, 1]]
    assert plan_batches([5, 5, 5], 10, 8) == [[0, 1], [2]]  # ties keep index order
    assert plan_batches([50, 1, 1], 10, 8) == [[0], [1, 2]]  # too long: alone
    assert plan_batches([1] * 5, 100, 2) == [[0, 1], [2, 3], [4]]
    assert plan_batches(np.array([2, 4]), 8, 8) == [[1, 0]]  # numpy integers are fine


@pytest.mark.parametrize(
    ("lengths", "max_tokens", "max_batch_size", "match"),
    [
        ([1], 0, 1, "max_tokens must be a positive integer"),
        ([1], -5, 1, "max_tokens"),
        ([1], 10, 0, "max_batch_size must be a positive integer"),
        ([1], 10.5, 1, "max_tokens"),
        ([-1], 10, 1, r"lengths\[0\]"),
        ([1, 2.5], 10, 1, r"lengths\[1\]"),
    ],
)
def test_invalid_arguments(lengths: list, max_tokens: int, max_batch_size: int, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        plan_batches(lengths, max_tokens, max_batch_size)
