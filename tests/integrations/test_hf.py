"""`LightningOPDTrainer` (a transformers Trainer) on a tiny student, one process, from the served store:
it trains, resumes exactly from a `checkpoint-N` folder, and checks consistency first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from lopd.client.rundir import STEPS  # noqa: E402
from lopd.errors import TokenizerMismatch  # noqa: E402
from lopd.integrations.hf import LOADER_STATE, LightningOPDConfig, LightningOPDTrainer  # noqa: E402


def hf_args(served, out: Path, **kw) -> LightningOPDConfig:
    base = dict(
        output_dir=str(out), store_url=served.url, dataset_name="scored", sft_teacher=served.store.teacher_fingerprint,
        max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3, seed=0,
        logging_steps=1, save_steps=2, report_to="none", record_samples=True, prefetch=2, max_grad_norm=1.0,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, disable_tqdm=True,
    )  # fmt: skip
    base.update(kw)
    return LightningOPDConfig(**base)


def final_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"checkpoint-{step}" / "model.safetensors"))


@pytest.mark.slow
def test_trains_and_resumes_exactly_from_a_checkpoint(served, tiny_qwen2_dir, tmp_path):
    straight = LightningOPDTrainer(model=str(tiny_qwen2_dir), args=hf_args(served, tmp_path / "a"))
    straight.train()
    losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(h.get("reverse_kl") is not None for h in straight.state.log_history[:4])
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / LOADER_STATE).read_text())
    position = (saved["loaders"][0]["epoch"], saved["loaders"][0]["batches_consumed"])
    assert saved["world_size"] == 1 and position == (0, 4)

    # Stop after 2 steps (a run killed after its checkpoint), then resume from checkpoint-2.
    first = LightningOPDTrainer(model=str(tiny_qwen2_dir), args=hf_args(served, tmp_path / "b", max_steps=2))
    first.train()
    resumed = LightningOPDTrainer(model=str(tiny_qwen2_dir), args=hf_args(served, tmp_path / "b"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    steps_a = (tmp_path / "a" / STEPS).read_text().splitlines()
    steps_b = (tmp_path / "b" / STEPS).read_text().splitlines()
    assert steps_a == steps_b and len(steps_a) == 4
    a, b = final_state(tmp_path / "a", 4), final_state(tmp_path / "b", 4)
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0)
    resumed_losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    assert resumed_losses[-2:] == pytest.approx(losses[-2:], rel=1e-6)


def test_train_refuses_an_inconsistent_dataset_before_fetching(served, tiny_qwen2_dir, tmp_path):
    trainer = LightningOPDTrainer(
        model=str(tiny_qwen2_dir), args=hf_args(served, tmp_path / "c", dataset_name="alpha", sft_teacher=None)
    )
    with pytest.raises(TokenizerMismatch):
        trainer.train()
    assert not (tmp_path / "c" / "checkpoint-2").exists()


def test_config_needs_the_store_and_max_steps(served, tmp_path):
    with pytest.raises(ValueError, match="store_url and dataset_name"):
        LightningOPDConfig(output_dir=str(tmp_path), max_steps=3)
    with pytest.raises(ValueError, match="max_steps > 0"):
        LightningOPDConfig(output_dir=str(tmp_path), store_url=served.url, dataset_name="scored")
    with pytest.raises(ValueError):
        hf_args(served, tmp_path, normalize="tokens")
