"""EpochSampler with excluded indices (a held-out set), as properties: every remaining sample
exactly once per epoch and never an excluded one, exact resume, and refusal of other exclusions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lopd.client.errors import ResumeMismatch
from lopd.client.sampler import EpochSampler


@st.composite
def setups(draw: st.DrawFn) -> tuple[int, int, int, int, list[int]]:
    n = draw(st.integers(2, 120))
    excluded = draw(st.lists(st.integers(0, n - 1), max_size=n - 1, unique=True))
    remaining = n - len(excluded)
    ws = draw(st.integers(1, min(5, remaining)))
    return n, draw(st.integers(1, 17)), ws, draw(st.integers(0, ws - 1)), excluded


@settings(max_examples=150, deadline=None)
@given(setup=setups(), epoch=st.integers(0, 3))
def test_every_remaining_sample_exactly_once_per_epoch_and_no_excluded_one(setup, epoch):
    n, bs, ws, _, excluded = setup
    samplers = [EpochSampler(n, bs, seed=3, rank=r, world_size=ws).excluding(excluded) for r in range(ws)]
    seen = np.concatenate([np.concatenate(s.epoch_batches(epoch)) for s in samplers]).tolist()
    assert sorted(seen) == sorted(set(range(n)) - set(excluded))
    for s in samplers:
        assert len(s) == len(s.epoch_batches(epoch)) and s.epoch_size == n - len(excluded)


@settings(max_examples=150, deadline=None)
@given(setup=setups(), data=st.data())
def test_resume_from_mid_epoch_yields_exactly_the_rest_in_order(setup, data):
    n, bs, ws, rank, excluded = setup

    def make() -> EpochSampler:
        return EpochSampler(n, bs, seed=7, rank=rank, world_size=ws, content_hash="sha256:x").excluding(excluded)

    expected = [b.tolist() for b in make().epoch_batches(0)] + [b.tolist() for b in make().epoch_batches(1)]
    cut = data.draw(st.integers(0, len(expected)))
    first = make()
    got = [b.tolist() for _, _, b in itertools.islice(first.positions(2), cut)]
    first.advance(cut)
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # it must survive JSON
    assert got + [b.tolist() for _, _, b in resumed.positions(2 - resumed.epoch)] == expected


def test_no_exclusion_keeps_the_order_and_the_state_of_a_plain_sampler():
    plain = EpochSampler(50, 4, seed=1)
    assert np.array_equal(plain.excluding([]).permutation(3), plain.permutation(3))
    assert plain.state_dict()["excluded"] is None
    EpochSampler(50, 4, seed=1).load_state_dict({k: v for k, v in plain.state_dict().items() if k != "excluded"})


def test_resume_refuses_other_exclusions():
    state = EpochSampler(40, 4, seed=1).excluding([1, 5, 9]).state_dict()
    assert state["num_excluded"] == 3
    for other in (EpochSampler(40, 4, seed=1), EpochSampler(40, 4, seed=1).excluding([1, 5, 10])):
        with pytest.raises(ResumeMismatch, match="left out 3 samples.*--eval-samples"):
            other.load_state_dict(state)
    EpochSampler(40, 4, seed=1).excluding([9, 5, 1]).load_state_dict(state)  # order does not matter


def test_exclusion_validation_says_how_to_fix():
    with pytest.raises(ValueError, match="leaves none to draw"):
        EpochSampler(3, 2, exclude=[0, 1, 2])
    with pytest.raises(ValueError, match=r"outside 0\.\.2"):
        EpochSampler(3, 2, exclude=[3])
    with pytest.raises(ValueError, match="2 samples to draw, fewer than world_size 3"):
        EpochSampler(4, 1, rank=2, world_size=3, exclude=[0, 1])
