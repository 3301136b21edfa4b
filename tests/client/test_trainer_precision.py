"""The trainer's student setup: mixed precision (float32 loss, float32 trained weights) and
gradient checkpointing, on the tiny Qwen2 on CPU; bfloat16 on CUDA where there is one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lopd.client.collate import collate_batch
from lopd.client.config import TrainConfig
from lopd.client.student import autocast, load_student
from lopd.client.trainer import opd_batch_loss
from tests.client.test_trainer import read_metrics, run_training, train_config

CPU = torch.device("cpu")


@pytest.fixture()
def batch(store_client):
    return collate_batch(store_client.fetch("scored", list(range(8))), indices=list(range(8)))


def _loss_and_grads(cfg: TrainConfig, batch) -> tuple[float, dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    model = load_student(cfg, CPU)
    model.train()
    loss, _ = opd_batch_loss(cfg, model, autocast(cfg, CPU), batch, float(batch["response_mask"].sum()))
    assert loss.dtype == torch.float32  # whatever the forward's precision
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, model


def _cfg(student: Path, tmp_path: Path, **kw) -> TrainConfig:
    return TrainConfig(url="http://unused", dataset="scored", student=student, out=tmp_path, **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_forward_keeps_float32_weights_and_a_close_float32_loss(dtype, tiny_qwen2_dir, tmp_path, batch):
    ref, ref_grads, _ = _loss_and_grads(_cfg(tiny_qwen2_dir, tmp_path), batch)
    low, grads, model = _loss_and_grads(_cfg(tiny_qwen2_dir, tmp_path, dtype=dtype), batch)
    assert math.isfinite(low) and low != ref  # the forward did run in low precision...
    assert low == pytest.approx(ref, rel=0.02, abs=0.02)  # ...and only rounding separates the losses
    # Mixed precision: the weights AdamW updates, and so their gradients, stay float32.
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {g.dtype for g in grads.values()} == {torch.float32} and grads.keys() == ref_grads.keys()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_qwen2_dir, tmp_path, batch):
    ref, ref_grads, _ = _loss_and_grads(_cfg(tiny_qwen2_dir, tmp_path), batch)
    cfg = _cfg(tiny_qwen2_dir, tmp_path, gradient_checkpointing=True)
    torch.manual_seed(0)
    model = load_student(cfg, CPU)
    model.train()
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    loss, _ = opd_batch_loss(cfg, model, autocast(cfg, CPU), batch, float(batch["response_mask"].sum()))
    loss.backward()
    assert len(calls) == 2  # attention ran again in the backward pass: checkpointing is on
    assert loss.item() == pytest.approx(ref, rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bfloat16_and_checkpointing_train_end_to_end(served, tiny_qwen2_dir, tmp_path, lora_rank):
    # ratio_reference="current": the loss is then the reverse KL, which rounding moves little (a
    # ratio against another model's rollout log-probs would amplify it).
    kw = dict(steps=2, grad_accum=1, ratio_reference="current")
    fp32 = run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "fp32", **kw))
    bf16 = run_training(
        served,
        train_config(
            served, tiny_qwen2_dir, tmp_path / "bf16", dtype="bfloat16", gradient_checkpointing=True,
            lora_rank=lora_rank, **kw,
        ),
    )  # fmt: skip
    assert bf16.step == fp32.step == 2
    rows_fp32, rows_bf16 = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert all(math.isfinite(float(r["loss"])) for r in rows_bf16)
    # Step 1 sees the same weights and data: only the forward's rounding separates the losses.
    a, b = float(rows_fp32[0]["loss"]), float(rows_bf16[0]["loss"])
    assert a != b and b == pytest.approx(a, rel=0.02, abs=0.02)
    # The checkpoint holds the float32 master weights (under LoRA: the adapter's).
    ckpt = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    assert ckpt["config"]["dtype"] == "bfloat16"


def test_float16_checkpoints_its_loss_scaler(served, tiny_qwen2_dir, tmp_path):
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "fp16", steps=2, dtype="float16"))
    ckpt = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"] > 0  # resumed runs continue with the scale reached
    resumed = run_training(
        served, train_config(served, tiny_qwen2_dir, tmp_path / "fp16", steps=3, dtype="float16", resume=True)
    )
    assert resumed.step == 3 and math.isfinite(resumed.last_metrics["loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_bfloat16_trains_on_cuda(served, tiny_qwen2_dir, tmp_path, lora_rank):
    kw = dict(steps=2, grad_accum=1, ratio_reference="current", device="cuda")
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "fp32", **kw))
    bf16 = run_training(
        served,
        train_config(
            served, tiny_qwen2_dir, tmp_path / "bf16", dtype="bfloat16", gradient_checkpointing=True,
            lora_rank=lora_rank, **kw,
        ),
    )  # fmt: skip
    assert bf16.step == 2 and math.isfinite(bf16.last_metrics["loss"])
    first_fp32, first_bf16 = read_metrics(tmp_path / "fp32")[0], read_metrics(tmp_path / "bf16")[0]
    assert float(first_bf16["loss"]) == pytest.approx(float(first_fp32["loss"]), rel=0.02, abs=0.02)
