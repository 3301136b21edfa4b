"""`lopd.integrations.slime.generate_rollout` against slime's `Sample` contract (THUDM/slime@624b824,
`slime_stub/`), as slime calls it and as slime consumes what it returns."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lopd.errors import InvalidInput
from tests.integrations.slime_contract import consume, slime_args


def test_a_rollout_is_what_slime_reads(slime, served, tiny_qwen2_dir):
    args = slime_args(served, tiny_qwen2_dir)
    out = slime.base.call_rollout_fn(slime.module.generate_rollout, args, 0, None, evaluation=False)
    assert isinstance(out, slime.base.RolloutFnTrainOutput)
    assert [len(g) for g in out.samples] == [2, 2, 2, 2]  # rollout_batch_size groups of n_samples_per_prompt
    Sample = slime.types.Sample  # noqa: N806
    stored = served.store.samples["scored"]
    indices = slime.module.rollout_indices(args, 0)
    flat = [s for g in out.samples for s in g]
    for s, i in zip(flat, indices, strict=True):
        assert isinstance(s, Sample) and s.status == Sample.Status.COMPLETED and s.reward == 0.0
        p, r = stored["prompts"][i], stored["responses"][i]
        assert s.tokens == [int(x) for x in np.concatenate([p, r])] and s.response_length == len(r)
        assert isinstance(s.teacher_log_probs, torch.Tensor) and s.teacher_log_probs.dtype == torch.float32
        assert s.teacher_log_probs.shape == (len(r),)
        assert np.array_equal(s.teacher_log_probs.numpy(), stored["teacher"][i])  # bit for bit
        assert s.metadata["lopd_index"] == i and s.metadata["lopd_sample_id"] == stored["ids"][i]
        assert s.rollout_id is None  # slime numbers rollouts itself (default shape, depth 2)
    train = consume(out, Sample)
    assert [len(t) for t in train["teacher_log_probs"]] == train["response_lengths"]
    assert "rollout_log_probs" not in train or all(
        len(t) == n for t, n in zip(train["rollout_log_probs"], train["response_lengths"], strict=True)
    )
    assert len(set(train["sample_indices"])) == 8


def test_rollout_log_probs_when_every_sample_has_them(slime, served, tiny_qwen2_dir):
    # One sample a rollout: in `scored`, every fourth sample has no rollout log-probs.
    args = slime_args(served, tiny_qwen2_dir, rollout_batch_size=1, n_samples_per_prompt=1)
    stored = served.store.samples["scored"]
    seen = set()
    for rollout_id in range(24):
        (s,) = [s for g in slime.module.generate_rollout(args, rollout_id, None).samples for s in g]
        i = s.metadata["lopd_index"]
        seen.add(i)
        if stored["rollout"][i] is None:
            assert s.rollout_log_probs is None
        else:
            assert s.rollout_log_probs == [float(x) for x in stored["rollout"][i]]
    assert seen == set(range(24))  # one epoch: every sample once


def test_deterministic_by_rollout_id_across_restarts(slime, served, tiny_qwen2_dir):
    args = slime_args(served, tiny_qwen2_dir)
    first = [slime.module.rollout_indices(args, k) for k in range(4)]
    tokens = [s.tokens for g in slime.module.generate_rollout(args, 2, None).samples for s in g]
    slime.module._sources.clear()  # a restarted job
    assert [slime.module.rollout_indices(args, k) for k in range(4)] == first
    assert [s.tokens for g in slime.module.generate_rollout(args, 2, None).samples for s in g] == tokens
    # 24 samples, rollouts of 8: rollouts 0-2 are one epoch (each sample once), 3 starts the next.
    assert sorted(i for k in range(3) for i in first[k]) == list(range(24))
    from lopd.client.sampler import EpochSampler

    assert first[3] == EpochSampler(24, 8, seed=0, drop_last=True).epoch_batches(1)[0].tolist()


def test_evaluation_and_refusals(slime, served, tiny_qwen2_dir, monkeypatch):
    args = slime_args(served, tiny_qwen2_dir)
    out = slime.base.call_rollout_fn(slime.module.generate_rollout, args, 0, None, evaluation=True)
    assert isinstance(out, slime.base.RolloutFnEvalOutput) and out.data == {}
    for var in ("LOPD_URL", "LOPD_DATASET"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(InvalidInput, match="lopd_url and lopd_dataset"):
        slime.module.generate_rollout(SimpleNamespace(rollout_batch_size=2), 0, None)
    with pytest.raises(InvalidInput, match="lower --rollout-batch-size"):
        slime.module.generate_rollout(slime_args(served, tiny_qwen2_dir, rollout_batch_size=13), 0, None)
    from lopd.errors import TokenizerMismatch

    with pytest.raises(TokenizerMismatch):  # alpha's tokenizer is not the student's
        slime.module.generate_rollout(
            slime_args(served, tiny_qwen2_dir, lopd_dataset="alpha", lopd_sft_teacher=None), 0, None
        )
