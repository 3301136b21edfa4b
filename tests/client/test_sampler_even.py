"""`EpochSampler(even_batches=True)`: the same number of batches on every rank (what DDP needs), fillers
only where a rank's share of the tail is empty, and still every sample exactly once per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lopd.client.errors import ResumeMismatch
from lopd.client.sampler import EpochSampler


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 120), bs=st.integers(1, 9), ws=st.integers(1, 5), epoch=st.integers(0, 3))
def test_even_batches_lockstep_and_exactly_once(n, bs, ws, epoch):
    if n < ws:
        with pytest.raises(ValueError, match="would get none"):
            EpochSampler(n, bs, rank=ws - 1, world_size=ws, even_batches=True)
        return
    samplers = [EpochSampler(n, bs, seed=2, rank=r, world_size=ws, even_batches=True) for r in range(ws)]
    plain = [EpochSampler(n, bs, seed=2, rank=r, world_size=ws) for r in range(ws)]
    assert len({len(s) for s in samplers}) == 1
    real = []
    for s, p in zip(samplers, plain, strict=True):
        batches = s.epoch_batches(epoch)
        assert len(batches) == len(s)
        kept = [b for k, b in enumerate(batches) if not s.is_filler(epoch, k)]
        assert [b.tolist() for b in kept] == [b.tolist() for b in p.epoch_batches(epoch)]  # fillers are extra
        assert sum(s.is_filler(epoch, k) for k in range(len(s))) == len(s) - len(p)
        real += [i for b in kept for i in b.tolist()]
    assert sorted(real) == list(range(n))


def test_even_batches_is_part_of_the_resume_state():
    state = EpochSampler(10, 3, world_size=2, even_batches=True).state_dict()
    assert state["even_batches"] is True
    with pytest.raises(ResumeMismatch, match="even_batches"):
        EpochSampler(10, 3, world_size=2).load_state_dict(state)
    evened = EpochSampler(10, 3, world_size=2).evened().excluding([4])
    assert evened.even_batches and evened.excluded.tolist() == [4]
    assert np.array_equal(evened.permutation(0), EpochSampler(10, 3, world_size=2, exclude=[4]).permutation(0))
