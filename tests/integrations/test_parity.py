"""The three consumers agree: `lopd train`, `LightningOPDTrainer` and the slime rollout function read
the same samples in the same order for the same seed and global batch, and `lopd train` and the
Trainer compute the same loss on the same batch, which is also the loss of slime's `Sample`s."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from lopd.client.collate import collate_batch
from lopd.client.objective import opd_batch_loss
from lopd.client.rundir import METRICS, STEPS
from lopd.client.trainer import TrainConfig, train_student
from lopd.http_contract import PROMPT_IDS, RESPONSE_IDS, ROLLOUT_LOGPROBS, SAMPLE_ID, TEACHER_LOGPROBS
from tests.integrations.slime_contract import slime_args

pytestmark = pytest.mark.slow

SEED, STEPS_N = 0, 3  # 24 samples, global batch 8: an epoch is 3 steps
# `current`: ratio 1, so the loss does not depend on which samples carry rollout log-probs (slime
# passes them only when every sample of a rollout has them).
LOSS = dict(ratio_reference="current", normalize="token")


def _indices(path) -> list[list[int]]:
    return [json.loads(line)["indices"] for line in (path / STEPS).read_text().splitlines()]


def _samples_to_batch(samples, pad_id: int) -> dict:
    """slime's `Sample`s back to the served columns, collated as every trainer here collates them."""
    rows = {SAMPLE_ID: [], PROMPT_IDS: [], RESPONSE_IDS: [], TEACHER_LOGPROBS: [], ROLLOUT_LOGPROBS: []}
    for s in samples:
        cut = len(s.tokens) - s.response_length
        rows[SAMPLE_ID].append(s.metadata["lopd_sample_id"])
        rows[PROMPT_IDS].append(s.tokens[:cut])
        rows[RESPONSE_IDS].append(s.tokens[cut:])
        rows[TEACHER_LOGPROBS].append(s.teacher_log_probs.tolist())
        rows[ROLLOUT_LOGPROBS].append(s.rollout_log_probs)
    table = pa.table({
        SAMPLE_ID: pa.array(rows[SAMPLE_ID]),
        PROMPT_IDS: pa.array(rows[PROMPT_IDS], pa.list_(pa.int32())),
        RESPONSE_IDS: pa.array(rows[RESPONSE_IDS], pa.list_(pa.int32())),
        TEACHER_LOGPROBS: pa.array(rows[TEACHER_LOGPROBS], pa.list_(pa.float32())),
        ROLLOUT_LOGPROBS: pa.array(rows[ROLLOUT_LOGPROBS], pa.list_(pa.float32())),
    })  # fmt: skip
    return collate_batch(table, pad_id=pad_id)


def test_lopd_train_hf_trainer_and_slime_agree(served, tiny_qwen2_dir, tmp_path, slime):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lopd.integrations.hf import LightningOPDConfig, LightningOPDTrainer

    # lopd train: 4 sequences x 2 micro-batches.
    cfg = TrainConfig(
        url=served.url, dataset="scored", student=tiny_qwen2_dir, out=tmp_path / "lopd", steps=STEPS_N, batch_size=4,
        grad_accum=2, seed=SEED, lr=1e-3, sft_teacher=served.store.teacher_fingerprint, record_samples=True,
        prefetch=2, **LOSS,
    )  # fmt: skip
    train_student(cfg, echo=lambda s: None, client=served.client(retries=2, backoff_s=0.01))
    # The Trainer: 2 sequences x 4 micro-batches, the same global batch of 8.
    args = LightningOPDConfig(
        output_dir=str(tmp_path / "hf"), store_url=served.url, dataset_name="scored", max_steps=STEPS_N,
        per_device_train_batch_size=2, gradient_accumulation_steps=4, seed=SEED, learning_rate=1e-3,
        sft_teacher=served.store.teacher_fingerprint, record_samples=True, logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, **LOSS,
    )  # fmt: skip
    trainer = LightningOPDTrainer(model=str(tiny_qwen2_dir), args=args)
    trainer.train()
    # slime: rollouts of 8 (8 prompts x 1 sample).
    s_args = slime_args(served, tiny_qwen2_dir, rollout_batch_size=8, n_samples_per_prompt=1, lopd_seed=SEED)
    rollouts = [slime.module.rollout_indices(s_args, k) for k in range(STEPS_N)]

    ours, hf = _indices(tmp_path / "lopd"), _indices(tmp_path / "hf")
    assert ours == hf == rollouts  # the same samples, in the same order, step by step
    assert sorted(i for step in ours for i in step) == list(range(24))

    # The same loss on the same batch (the first step's, before any update).
    with open(tmp_path / "lopd" / METRICS) as f:
        lopd_loss = float(f.readlines()[1].split(",")[1])
    hf_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    samples = [s for g in slime.module.generate_rollout(s_args, 0, None).samples for s in g]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen2_dir))
    batch = _samples_to_batch(samples, tokenizer.pad_token_id or 0)
    assert batch["sample_id"] == [f"scored-{i:04d}" for i in rollouts[0]]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    with torch.no_grad():
        slime_loss, _ = opd_batch_loss(cfg, model, None, batch, float(batch["response_mask"].sum()))
    print(f"step-1 loss: lopd train {lopd_loss!r}, Trainer {hf_loss!r}, slime's samples {slime_loss.item()!r}")
    assert hf_loss == pytest.approx(lopd_loss, rel=1e-5)
    assert slime_loss.item() == pytest.approx(lopd_loss, rel=1e-5)
    assert np.isfinite(lopd_loss) and lopd_loss != 0
