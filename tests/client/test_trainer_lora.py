"""LoRA in the reference trainer: only the adapter trains, resume is exact, the exported model
is a plain (merged) model directory, and a missing peft fails fast with the extra to install."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from lopd.client.config import TrainConfig
from lopd.client.student import load_student
from lopd.client.trainer import CHECKPOINT, MODEL_DIR
from lopd.errors import InvalidInput
from tests.client.test_trainer import read_metrics, run_training, train_config

pytest.importorskip("peft")

LORA = dict(lora_rank=4, lora_target_modules="q_proj,v_proj,down_proj")


def test_only_the_adapter_trains_and_the_merged_model_is_what_was_trained(served, tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    seen: dict[str, Any] = {}
    lines: list[str] = []
    result = run_training(
        served,
        train_config(served, tiny_qwen2_dir, tmp_path / "lora", steps=2, **LORA),
        lines,
        on_step=lambda step, model: seen.update(model=model),
    )
    assert result.step == 2
    model = seen["model"]
    initial = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).state_dict()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" not in name:  # every base weight is exactly the student's
            key = name.replace(".base_layer", "")
            assert torch.equal(tensor, initial[key]), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at 0
    assert any("LoRA rank 4" in line and "parameters" in line for line in lines)

    # The checkpoint keeps the adapter only; the base is the student directory, reloaded on resume.
    ckpt = torch.load(tmp_path / "lora" / CHECKPOINT, weights_only=True)
    assert set(ckpt["model"]) == trained
    # adapter/ is the peft adapter; model/ a plain model directory with the adapter merged in.
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "lora" / MODEL_DIR / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / MODEL_DIR)).eval()
    ids = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged.lm_head.weight, merged.lm_head.weight * 0)  # a real model, not zeros


@pytest.mark.slow
def test_lora_resume_ends_identical_to_an_uninterrupted_run(served, tiny_qwen2_dir, tmp_path):
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "straight", steps=4, **LORA))
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=2, **LORA))
    lines: list[str] = []
    resumed = run_training(
        served, train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=4, resume=True, **LORA), lines
    )
    assert resumed.step == 4 and any("resumed from" in line for line in lines)
    for a, b in zip(read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split"), strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-7), a["step"]
    final_a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    final_b = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert final_a["model"].keys() == final_b["model"].keys() and final_a["loader"] == final_b["loader"]
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_with_other_lora_settings_is_refused(served, tiny_qwen2_dir, tmp_path):
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=1, **LORA))
    with pytest.raises(InvalidInput, match="--lora-rank 4, not 8"):
        run_training(
            served,
            train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=2, resume=True, **{**LORA, "lora_rank": 8}),
        )
    with pytest.raises(InvalidInput, match="--lora-rank 4, not 0"):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=2, resume=True))


def test_bfloat16_lora_holds_the_frozen_base_in_bfloat16_and_the_adapter_in_float32(tiny_qwen2_dir, tmp_path):
    cfg = TrainConfig(url="u", dataset="d", student=tiny_qwen2_dir, out=tmp_path, dtype="bfloat16", **LORA)
    model = load_student(cfg, torch.device("cpu"))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_unknown_target_modules_are_refused_with_the_flag(tiny_qwen2_dir, tmp_path):
    cfg = TrainConfig(
        url="u", dataset="d", student=tiny_qwen2_dir, out=tmp_path, lora_rank=4, lora_target_modules="nope"
    )
    with pytest.raises(InvalidInput, match="--lora-target-modules nope"):
        load_student(cfg, torch.device("cpu"))


def test_missing_peft_names_the_extra_before_loading_weights(served, tiny_qwen2_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(InvalidInput, match=r"pip install 'lightning-opd\[train\]'"):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", **LORA))
