"""`lopd train` on 2 processes (torchrun, gloo on CPU): the exact partition, equality with one
process at the same global batch, and exact resume after a kill mid-epoch; the same two for
`--parallelism fsdp` (FSDP2, parameters sharded over the 2 ranks).

The run: 23 training samples (24, one held out), 1 sequence per micro-batch per rank, 5
micro-batches per step: a global batch of 10. An epoch is 12 micro-batches per rank (11 full
global micro-batches of 2, then a tail of 1, where rank 1 runs a zero-weight filler), so steps
straddle epochs and the tail is exercised.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lopd.client.evaluation import held_out_indices
from lopd.client.rundir import CHECKPOINT, METRICS, MODEL_DIR, STEPS
from lopd.client.sampler import EpochSampler
from lopd.client.trainer import TrainConfig, train_student
from lopd.errors import InvalidInput
from tests.utils.launch import output, torchrun

pytestmark = pytest.mark.slow

STEPS_N = 5
SHAPE = dict(steps=STEPS_N, grad_accum=5, eval_samples=1, eval_every=100, lr=1e-3, seed=3, checkpoint_every=2)
# Measured on CPU (float32), 5 steps: loss within 6.7e-7 relative, parameters within 2.7e-7 absolute
# (DDP) and 3.6e-7 (FSDP).
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-6


def _flags(served, student: Path, out: Path, **kw) -> list[str]:
    args = ["--url", served.url, "--dataset", "scored", "--student", str(student), "--out", str(out)]
    args += ["--sft-teacher", served.store.teacher_fingerprint, "--log-every", "1", "--record-samples"]
    args += ["--prefetch", "2", "--batch-size", "1"]
    for key, value in {**SHAPE, **kw}.items():
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def _train_2(served, student: Path, out: Path, env: dict[str, str] | None = None, **kw):
    return torchrun(["-m", "lopd", "train", *_flags(served, student, out, **kw)], env=env)


def _steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / STEPS).read_text().splitlines()]


def _metrics(out: Path) -> list[dict[str, str]]:
    with open(out / METRICS, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_process_run(served, tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    result = _train_2(served, tiny_qwen2_dir, out)
    assert result.returncode == 0, output(result)
    assert "2 processes (cpu): global batch 1 x 5 x 2 = 10 sequences per step" in result.stdout
    assert result.stdout.count("step 5/5") == 1  # rank 0 alone prints
    return out


@pytest.fixture(scope="module")
def one_process_run(served, tiny_qwen2_dir, tmp_path_factory) -> Path:
    """One process, batch 2 x 5 micro-batches: the same global batch of 10."""
    out = tmp_path_factory.mktemp("one") / "run"
    cfg = TrainConfig(
        url=served.url, dataset="scored", student=tiny_qwen2_dir, out=out, batch_size=2, prefetch=2,
        sft_teacher=served.store.teacher_fingerprint, record_samples=True, **SHAPE,
    )  # fmt: skip
    train_student(cfg, echo=lambda s: None, client=served.client(retries=2, backoff_s=0.01))
    return out


@pytest.fixture(scope="module")
def fsdp_run(served, tiny_qwen2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = _train_2(served, tiny_qwen2_dir, out, parallelism="fsdp")
    assert result.returncode == 0, output(result)
    assert "global batch 1 x 5 x 2 = 10 sequences per step, student sharded (FSDP)" in result.stdout
    return out


def _assert_matches_one_process(one: Path, two: Path, what: str) -> None:
    assert _steps(one) == _steps(two)  # the same samples, step by step, in the same order
    rows = list(zip(_metrics(one), _metrics(two), strict=True))
    for a, b in rows:
        for key in ("loss", "mean_advantage", "clip_frac", "tokens", "epoch"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=LOSS_RTOL, abs=1e-7), (a["step"], key)
    worst_loss = max(abs(float(b["loss"]) / float(a["loss"]) - 1) for a, b in rows)
    print(f"max relative loss difference one process vs {what}: {worst_loss:.1e}")
    model_one = torch.load(one / CHECKPOINT, weights_only=True)["model"]
    model_two = torch.load(two / CHECKPOINT, weights_only=True)["model"]
    assert set(model_two) <= set(model_one) and "model.embed_tokens.weight" in model_two
    worst = max(float((model_one[k] - v).abs().max()) for k, v in model_two.items())
    print(f"max |param difference| one process vs {what} after {STEPS_N} steps: {worst:.2e}")
    assert worst <= PARAM_ATOL


def test_every_sample_exactly_once_per_epoch_across_ranks(two_process_run):
    steps = _steps(two_process_run)
    assert [s["step"] for s in steps] == list(range(1, STEPS_N + 1))
    stream = [i for s in steps for i in s["indices"]]
    held_out = held_out_indices(24, 1)
    train = sorted(set(range(24)) - set(held_out.tolist()))
    assert len(stream) == STEPS_N * 10 - 2  # 5 steps of 10, less the fillers of epochs 0 and 1
    # Consecutive runs of 23 are whole epochs: each a permutation of the training samples, in the
    # sampler's order (whatever the world size), never a held-out one.
    sampler = EpochSampler(24, 1, seed=3, exclude=held_out)
    expected = np.concatenate([sampler.permutation(e) for e in range(3)])
    assert stream == expected[: len(stream)].tolist()
    for e in range(len(stream) // 23):
        assert sorted(stream[23 * e : 23 * (e + 1)]) == train
    ids = [i for s in steps for i in s["sample_ids"]]
    assert ids[:23] == [f"scored-{i:04d}" for i in stream[:23]]
    ckpt = torch.load(two_process_run / CHECKPOINT, weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["loaders"]) == 2 and len(ckpt["rngs"]) == 2
    assert [s["rank"] for s in ckpt["loaders"]] == [0, 1]
    # 25 micro-batches per rank consumed: epoch 2, batch 1 (12 per epoch).
    assert {(s["epoch"], s["batches_consumed"]) for s in ckpt["loaders"]} == {(2, 1)}


def test_two_processes_match_one_with_the_same_global_batch(two_process_run, one_process_run):
    _assert_matches_one_process(one_process_run, two_process_run, "two processes (DDP)")


def test_fsdp_matches_one_process_and_exports_the_full_model(fsdp_run, one_process_run):
    from transformers import AutoModelForCausalLM

    _assert_matches_one_process(one_process_run, fsdp_run, "two processes (FSDP)")
    ckpt = torch.load(fsdp_run / CHECKPOINT, weights_only=True)
    assert ckpt["config"]["parallelism"] == "fsdp"
    exported = AutoModelForCausalLM.from_pretrained(str(fsdp_run / MODEL_DIR)).state_dict()
    for name, tensor in ckpt["model"].items():  # model/ is the full, unsharded student
        assert torch.equal(exported[name], tensor), name


def _killed_and_resumed(served, student: Path, out: Path, **kw) -> None:
    # Both ranks die (as by SIGKILL) after step 3; the last checkpoint is step 2, mid-epoch (10 of 12 batches).
    killed = _train_2(served, student, out, env={"LOPD_FAULT": "train-step:2"}, **kw)
    assert killed.returncode != 0
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 2 and {(s["epoch"], s["batches_consumed"]) for s in ckpt["loaders"]} == {(0, 10)}
    resumed = _train_2(served, student, out, resume=True, **kw)
    assert resumed.returncode == 0, output(resumed)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout


def _assert_identical_runs(a: Path, b: Path) -> None:
    assert _steps(b) == _steps(a)
    assert _metrics(b) != [] and [r["step"] for r in _metrics(b)] == [str(s) for s in range(1, STEPS_N + 1)]
    for x, y in zip(_metrics(a), _metrics(b), strict=True):
        for key in ("loss", "mean_advantage", "clip_frac", "tokens", "epoch"):
            assert float(x[key]) == float(y[key]), (x["step"], key)  # exactly
    final_a = torch.load(a / CHECKPOINT, weights_only=True)
    final_b = torch.load(b / CHECKPOINT, weights_only=True)
    assert final_a["loaders"] == final_b["loaders"]
    assert final_a["model"].keys() == final_b["model"].keys()
    for name, tensor in final_a["model"].items():
        assert torch.equal(final_b["model"][name], tensor), name


def test_killed_mid_epoch_and_resumed_ends_identical(two_process_run, served, tiny_qwen2_dir, tmp_path):
    _killed_and_resumed(served, tiny_qwen2_dir, tmp_path / "killed")
    _assert_identical_runs(two_process_run, tmp_path / "killed")


def test_fsdp_killed_mid_epoch_and_resumed_ends_identical(fsdp_run, served, tiny_qwen2_dir, tmp_path):
    _killed_and_resumed(served, tiny_qwen2_dir, tmp_path / "killed", parallelism="fsdp")
    _assert_identical_runs(fsdp_run, tmp_path / "killed")
    final = torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)
    assert (
        final["optimizer"]["state"].keys()
        == torch.load(fsdp_run / CHECKPOINT, weights_only=True)["optimizer"]["state"].keys()
    )


def test_fsdp_with_lora_is_refused(served, tiny_qwen2_dir, tmp_path):
    cfg = TrainConfig(
        url=served.url, dataset="scored", student=tiny_qwen2_dir, out=tmp_path / "lora", batch_size=1,
        parallelism="fsdp", lora_rank=4, sft_teacher=served.store.teacher_fingerprint, **SHAPE,
    )  # fmt: skip
    with pytest.raises(InvalidInput, match="--parallelism fsdp does not train LoRA"):
        train_student(cfg, echo=lambda s: None, client=served.client())


def test_another_world_size_is_refused_before_the_model_loads(two_process_run, served, tiny_qwen2_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(two_process_run, out)
    cfg = TrainConfig(
        url=served.url, dataset="scored", student=tiny_qwen2_dir, out=out, batch_size=1, resume=True,
        sft_teacher=served.store.teacher_fingerprint, **{**SHAPE, "steps": 8},
    )  # fmt: skip
    with pytest.raises(InvalidInput, match=r"trained on 2 process\(es\), this run has 1.*torchrun --nproc-per-node 2"):
        train_student(cfg, echo=lambda s: None, client=served.client())
