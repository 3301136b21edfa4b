"""EpochSampler as properties: every sample exactly once per epoch, exact resume, exact sharding."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lopd.client.errors import ResumeMismatch
from lopd.client.sampler import EpochSampler

sizes = st.integers(min_value=1, max_value=120)
batch_sizes = st.integers(min_value=1, max_value=17)
world_sizes = st.integers(min_value=1, max_value=5)
workers = st.integers(min_value=1, max_value=4)


def _samplers(n: int, bs: int, ws: int, drop_last: bool = False, seed: int = 3, **kw) -> list[EpochSampler]:
    # Ranks that would get no sample at all refuse to start; the others must still cover everything.
    out = []
    for r in range(ws):
        if r >= n and not drop_last:
            with pytest.raises(ValueError, match="would get none"):
                EpochSampler(n, bs, rank=r, world_size=ws)
            continue
        out.append(
            EpochSampler(n, bs, seed=seed, rank=r, world_size=ws, drop_last=drop_last, content_hash="sha256:x", **kw)
        )
    return out


@settings(max_examples=150, deadline=None)
@given(n=sizes, bs=batch_sizes, ws=world_sizes)
def test_one_epoch_covers_every_sample_exactly_once_across_ranks(n, bs, ws):
    seen = np.concatenate([np.concatenate(s.epoch_batches(0)) for s in _samplers(n, bs, ws)])
    assert sorted(seen.tolist()) == list(range(n))
    for s in _samplers(n, bs, ws):
        assert len(s) == len(s.epoch_batches(0))
        assert all(1 <= len(b) <= bs for b in s.epoch_batches(0))


@settings(max_examples=100, deadline=None)
@given(n=sizes, bs=batch_sizes, ws=world_sizes)
def test_drop_last_keeps_ranks_in_lockstep_with_full_batches(n, bs, ws):
    if n < bs * ws:
        with pytest.raises(ValueError, match="lower batch_size"):
            EpochSampler(n, bs, world_size=ws, drop_last=True)
        return
    samplers = _samplers(n, bs, ws, drop_last=True)
    assert len({len(s) for s in samplers}) == 1
    seen = np.concatenate([np.concatenate(s.epoch_batches(0)) for s in samplers])
    assert len(seen) == len(set(seen.tolist())) == (n // (bs * ws)) * bs * ws
    assert all(len(b) == bs for s in samplers for b in s.epoch_batches(0))


def test_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(50, 4, seed=1), EpochSampler(50, 4, seed=1)
    assert np.array_equal(a.permutation(2), b.permutation(2))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), EpochSampler(50, 4, seed=2).permutation(0))
    assert np.array_equal(EpochSampler(9, 2, shuffle=False).permutation(0), np.arange(9))


@settings(max_examples=150, deadline=None)
@given(n=sizes, bs=batch_sizes, ws=world_sizes, data=st.data())
def test_resume_from_mid_epoch_yields_exactly_the_rest_in_order(n, bs, ws, data):
    rank = data.draw(st.integers(0, min(ws, n) - 1))
    full = EpochSampler(n, bs, seed=7, rank=rank, world_size=ws, content_hash="sha256:x")
    expected = [b.tolist() for b in full.epoch_batches(0)]
    cut = data.draw(st.integers(0, len(expected)))
    first = EpochSampler(n, bs, seed=7, rank=rank, world_size=ws, content_hash="sha256:x")
    got = [b.tolist() for b in itertools.islice(first, cut)]  # a yielded batch counts as consumed
    state = json.loads(json.dumps(first.state_dict()))  # it must survive JSON
    resumed = EpochSampler(n, bs, seed=7, rank=rank, world_size=ws, content_hash="sha256:x")
    resumed.load_state_dict(state)
    if cut == len(expected):  # a finished epoch resumes at the start of the next one
        assert (state["epoch"], state["batches_consumed"]) == (1, 0)
        assert [b.tolist() for b in resumed] == [b.tolist() for b in full.epoch_batches(1)]
        return
    assert got + [b.tolist() for b in resumed] == expected


@settings(max_examples=100, deadline=None)
@given(n=sizes, bs=batch_sizes, ws=world_sizes, w=workers, data=st.data())
def test_worker_split_round_robin_restores_the_single_process_order(n, bs, ws, w, data):
    s = EpochSampler(n, bs, seed=4, rank=data.draw(st.integers(0, min(ws, n) - 1)), world_size=ws)
    s.set_position(0, data.draw(st.integers(0, len(s))))
    epochs = data.draw(st.integers(1, 3))
    expected = [(e, k) for e, k, _ in s.positions(epochs)]
    per_worker = [[(e, k) for e, k, _ in s.worker_positions(i, w, epochs)] for i in range(w)]
    # DataLoader's collection: one from each worker in turn, skipping exhausted workers.
    merged, its = [], [iter(x) for x in per_worker]
    active = list(range(w))
    while active:
        for i in list(active):
            item = next(its[i], None)
            if item is None:
                active.remove(i)
            else:
                merged.append(item)
    assert merged == expected


def test_one_ranks_state_resumes_every_rank():
    ranks = _samplers(64, 4, 4)
    for r in ranks:
        for _ in range(2):
            next(iter(r))
    state0 = ranks[0].state_dict()
    for r in range(4):
        fresh = EpochSampler(64, 4, seed=3, rank=r, world_size=4, content_hash="sha256:x")
        fresh.load_state_dict(state0)
        assert [b.tolist() for b in fresh] == [b.tolist() for b in ranks[r]]


def test_resume_refuses_other_content_and_other_settings():
    s = EpochSampler(40, 4, seed=1, dataset="d", version=1, content_hash="sha256:aaa")
    state = s.state_dict()
    other = EpochSampler(40, 4, seed=1, dataset="d", version=2, content_hash="sha256:bbb")
    with pytest.raises(ResumeMismatch, match="sha256:aaa.*sha256:bbb"):
        other.load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="batch_size=4"):
        EpochSampler(40, 8, seed=1, content_hash="sha256:aaa").load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="seed=1"):
        EpochSampler(40, 4, seed=2, content_hash="sha256:aaa").load_state_dict(state)
    with pytest.raises(ResumeMismatch, match="had 40 samples, this one has 41"):
        EpochSampler(41, 4, seed=1).load_state_dict(state)
    assert isinstance(ResumeMismatch("x"), ValueError)


def test_validation_messages_say_how_to_fix():
    with pytest.raises(ValueError, match="rank is 2"):
        EpochSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size is 0"):
        EpochSampler(10, 0)
    with pytest.raises(ValueError, match="nothing to train on"):
        EpochSampler(0, 2)
