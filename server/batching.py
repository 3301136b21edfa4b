"""Length-bucketed batching under a padded-token budget.

Teacher forward passes run on right-padded batches, so a batch costs
`len(batch) * longest_sequence_in_batch` token slots whether or not they hold real tokens.
Sorting by length before packing keeps sequences of similar length together, which bounds both
the memory of one batch (the budget) and the compute wasted on padding.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Split sequence indices into batches whose padded cost fits `max_tokens`.

    Indices are sorted by length, longest first (ties by index, so the plan is deterministic), then
    packed greedily: a batch grows while `len(batch) * longest <= max_tokens` and
    `len(batch) <= max_batch_size`. A sequence longer than `max_tokens` on its own gets a batch to
    itself. Every index appears in exactly one batch.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(
            f"max_tokens must be a positive integer, got {max_tokens!r}; "
            "pass the number of (padded) tokens one forward pass may hold, e.g. 16384"
        )
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size <= 0:
        raise ValueError(
            f"max_batch_size must be a positive integer, got {max_batch_size!r}; "
            "pass the most sequences one forward pass may hold, e.g. 256"
        )
    sizes: list[int] = []
    for i, n in enumerate(lengths):
        try:
            size = operator.index(n)  # accepts numpy integers, rejects floats
        except TypeError:
            size = -1
        if isinstance(n, bool) or size < 0:
            raise ValueError(f"lengths[{i}] must be a non-negative integer, got {n!r}")
        sizes.append(size)

    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        # Descending order: the first sequence of a batch is its longest.
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        if not current:
            longest = sizes[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches
