"""A reference Lightning OPD trainer for Hugging Face causal LMs, readable top to bottom.

One process, one device. The data comes from a `lopd serve` endpoint through `OPDLoader`; the
objective is `lightning_opd_loss`, computed in float32 whatever the forward's precision;
everything needed to continue a run exactly (the model or its LoRA adapter, optimizer, loss
scaler, step, RNG and the loader's position in its epoch) is one checkpoint dict. The student's
setup (precision, LoRA, gradient checkpointing) is `student.py`, the evaluation on held-out
samples `evaluation.py`, and the files of the run directory `rundir.py`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lopd.config import flag
from lopd.errors import Conflict, InvalidInput, NotFound

from .config import TrainConfig
from .consistency import check_dataset_for_training
from .evaluation import HeldOut, evaluate, held_out_indices
from .http import StoreClient
from .loader import OPDLoader
from .logprobs import token_logprobs
from .loss import lightning_opd_loss
from .rundir import (
    ADAPTER_DIR,
    CHECKPOINT,
    EVAL,
    EVAL_COLUMNS,
    METRIC_COLUMNS,
    METRICS,
    MODEL_DIR,
    CSVLog,
    atomic_torch_save,
    open_sinks,
)
from .student import (
    autocast,
    export_student,
    grad_scaler,
    load_student,
    load_student_state,
    student_state,
    trainable_parameters,
)
from .types import DatasetInfo

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT", "EVAL", "METRICS", "METRIC_COLUMNS", "MODEL_DIR", "TrainConfig", "TrainResult"]
__all__ += ["train_student"]

# Settings that shape the run itself (the trained parameters, the training samples): a resumed
# run with other values would not be a continuation.
RESUME_FIXED = ("lora_rank", "lora_alpha", "lora_target_modules", "eval_samples")


@dataclass
class TrainResult:
    step: int
    out: Path
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)


# -- small helpers the loop uses -----------------------------------------------------------------


def _lr_at(cfg: TrainConfig, step: int) -> float:
    # Linear warmup, then constant: distillation runs are short and the reference stays simple.
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def _check_resumable(cfg: TrainConfig, saved: dict[str, Any]) -> None:
    for key in RESUME_FIXED:
        theirs, ours = saved.get(key, TrainConfig.model_fields[key].default), getattr(cfg, key)
        if theirs != ours:
            raise InvalidInput(
                f"the checkpoint was trained with {flag(key)} {theirs}, not {ours}; resume with the same value"
            )


def _warn_if_no_trust_region(cfg: TrainConfig, info: DatasetInfo) -> None:
    """Say it, once and before training, when `--ratio-reference rollout` has nothing to refer to."""
    source = (info.raw.get("provenance") or {}).get("rollout_logprobs_source")
    if cfg.ratio_reference != "rollout" or source != "none":
        return
    log.warning(
        "dataset %s v%s stores no rollout log-probs, so --ratio-reference rollout falls back to ratio 1: the plain "
        "policy gradient, with no trust region (clip fraction 0%s). To train with a trust region around the "
        "policy that sampled the rollouts, store its log-probs: lopd precompute ... --rollout-policy DIR. "
        "Pass --ratio-reference current to ask for the plain policy gradient explicitly",
        info.name, info.version, "; --tis-cap has no effect either" if cfg.tis_cap else "",
    )  # fmt: skip


def _to(b: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}


def opd_batch_loss(
    cfg: TrainConfig, model: Any, amp: Any, b: dict[str, Any], token_count: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Lightning OPD loss of one batch (on the model's device) and its metrics, in float32.

    `amp` is the forward's precision context (`student.autocast`); `token_count` the token mean's
    denominator (all micro-batches of the step, so that their losses add up to the step's mean).
    """
    with amp:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    # Outside autocast: the log-probs are gathered in float32 from the (bf16) logits, chunk by chunk,
    # so the advantage, the ratio and the loss are float32 whatever --dtype is.
    student_lp = token_logprobs(logits, b["input_ids"])  # aligned with teacher_logprobs
    old = None
    if cfg.ratio_reference == "rollout":  # rows without rollout log-probs keep ratio 1
        has = b["has_rollout_logprobs"][:, None].expand_as(student_lp)
        old = torch.where(has, b["rollout_logprobs"], student_lp.detach())
    return lightning_opd_loss(
        student_lp,
        b["teacher_logprobs"],
        b["response_mask"],
        old_logprobs=old,
        rollout_logprobs=b["rollout_logprobs"],
        has_rollout_logprobs=b["has_rollout_logprobs"],
        clip_eps_low=cfg.clip_eps_low,
        clip_eps_high=cfg.clip_eps_high,
        tis_cap=cfg.tis_cap,
        normalize=cfg.normalize,  # type: ignore[arg-type]
        token_count=token_count if cfg.normalize == "token" else None,
    )


# -- the run -------------------------------------------------------------------------------------


def train_student(
    cfg: TrainConfig,
    echo: Callable[[str], None] = log.info,
    client: StoreClient | None = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> TrainResult:
    """Train `cfg.student` on `cfg.dataset` for `cfg.steps` optimizer steps (continuing with `resume`).

    `client` replaces the `StoreClient` built from `cfg.url` / `cfg.token` (custom transports).
    `on_step(step, model)` runs after every optimizer step with the model in eval mode (evaluation
    during training); its time is excluded from the step time in metrics.csv.
    """
    from transformers import AutoTokenizer

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {cfg.device!r} asked for, but torch sees no CUDA device; use --device cpu")
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.out / CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise NotFound(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resumable(cfg, ckpt["config"])
    elif ckpt_path.exists():
        raise Conflict(f"{cfg.out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    # Fail on a missing optional package before anything slow.
    sinks = open_sinks(
        cfg.out, tensorboard=cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project, config=cfg.to_json()
    )
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)

    # The data: pin the version (the checkpoint's, when resuming) and check it before any step.
    if client is None:
        client = StoreClient(cfg.url, cfg.token, retries=cfg.retries, timeout=cfg.timeout_s)
    version = ckpt["loader"]["version"] if ckpt is not None else cfg.version
    if ckpt is not None and cfg.version is not None and cfg.version != version:
        raise InvalidInput(f"the checkpoint trained on version {version}; --version {cfg.version} cannot resume it")
    info = client.manifest(cfg.dataset, version)
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.student))
    check_dataset_for_training(
        info, student_tokenizer=tokenizer, sft_teacher=cfg.sft_teacher, allow_inconsistent=cfg.allow_inconsistent
    )
    if info.temperature not in (None, 1.0):
        log.warning("the teacher scored at temperature %s; the student is scored at 1.0", info.temperature)
    _warn_if_no_trust_region(cfg, info)
    echo(f"dataset {info.name} v{info.version}: {info.num_samples} samples, {info.verdict}")

    # The student: the weights AdamW updates are float32, the forward runs in --dtype (student.py).
    model = load_student(cfg, device)
    amp = autocast(cfg, device)
    scaler = grad_scaler(cfg, device)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_all = sum(p.numel() for p in model.parameters())
    what = f"LoRA rank {cfg.lora_rank} on {cfg.lora_target_modules}" if cfg.lora_rank else "every weight"
    echo(f"student: training {sum(p.numel() for p in params):,} of {n_all:,} parameters ({what}), forward in "
         f"{cfg.dtype}" + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))  # fmt: skip

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = OPDLoader(
        client, cfg.dataset, cfg.batch_size, seed=cfg.seed, prefetch=cfg.prefetch, num_epochs=None,
        pad_id=pad_id, pin_memory=device.type == "cuda", info=info,
    )  # fmt: skip
    held_out: HeldOut | None = None
    if cfg.eval_samples:
        indices = held_out_indices(info.num_samples, cfg.eval_samples)
        loader.sampler = loader.sampler.excluding(indices)  # never trained on; part of the loader's resume state
        held_out = HeldOut(client, info, indices, cfg.batch_size, pad_id)
    step = 0
    if ckpt is not None:
        load_student_state(cfg, model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        loader.load_state_dict(ckpt["loader"])  # refuses other content, batch size, seed or held-out set
        torch.set_rng_state(ckpt["rng"])
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:  # dropout on the GPU draws from it
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step = int(ckpt["step"])
        echo(f"resumed from {ckpt_path} at step {step} (epoch {loader.sampler.epoch}, "
             f"batch {loader.sampler.batches_consumed} of {len(loader)})")  # fmt: skip
    metrics_csv = CSVLog(cfg.out / METRICS, METRIC_COLUMNS, resume_step=step)
    eval_csv = CSVLog(cfg.out / EVAL, EVAL_COLUMNS, resume_step=step) if held_out is not None else None

    def batch_loss(b: dict[str, Any], token_count: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return opd_batch_loss(cfg, model, amp, _to(b, device), token_count)

    def run_eval(held_out: HeldOut) -> dict[str, float]:
        result = {"step": step, **evaluate(model, held_out, batch_loss, normalize=cfg.normalize)}
        if eval_csv is not None:
            eval_csv.write(result)
        for sink in sinks:
            sink({"eval_loss": result["eval_loss"], "eval_reverse_kl": result["eval_reverse_kl"]}, step)
        echo(f"eval at step {step}: loss {result['eval_loss']:.4f}, reverse KL {result['eval_reverse_kl']:.4f} "
             f"({len(held_out.indices)} held-out samples, {int(result['eval_tokens'])} tokens)")  # fmt: skip
        return result

    def save_checkpoint() -> None:
        atomic_torch_save(
            {
                "model": student_state(cfg, model),  # under LoRA, the adapter only
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),  # empty unless float16
                "config": cfg.to_json(),
                "step": step,
                "loader": loader.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            ckpt_path,
        )
        export_student(cfg, model, tokenizer, cfg.out / MODEL_DIR, cfg.out / ADAPTER_DIR)

    if step >= cfg.steps:
        echo(f"already at step {step} of {cfg.steps}; nothing to do (raise --steps to train on)")
    batches = iter(loader)
    row: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    window_tokens, window_time, window_wait, window_steps = 0, 0.0, 0.0, 0  # since the last progress line
    try:
        if held_out is not None and step == 0 < cfg.steps:
            last_eval = run_eval(held_out)  # the starting point of the curve
        model.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = _lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # All micro-batches first (they are prefetched anyway): the token-mean loss needs the
            # step's total token count, so that accumulated micro-batches sum to one batch's mean.
            data_wait = 0.0
            micro = []
            for _ in range(cfg.grad_accum):
                tw = time.perf_counter()
                micro.append(next(batches))
                data_wait += time.perf_counter() - tw
            n_tokens = sum(int(b["response_mask"].sum()) for b in micro)

            loss_sum = torch.zeros((), device=device)
            adv_sum = torch.zeros((), device=device)
            clip_sum = torch.zeros((), device=device)
            weight_sum = torch.zeros((), device=device)
            for b in micro:
                loss, m = batch_loss(b, max(n_tokens, 1))
                if cfg.normalize == "sequence":
                    loss = loss / cfg.grad_accum
                scaler.scale(loss).backward()  # float16: scaled so small gradients do not underflow
                loss_sum += loss.detach()
                adv_sum += m["mean_advantage"] * m["tokens"]
                clip_sum += m["clip_frac"] * m["tokens"]
                weight_sum += m["mean_importance_weight"] * m["tokens"]
            scaler.unscale_(optimizer)  # clip the true gradients
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)  # float16: skipped when gradients overflowed (the scale then drops)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # frees the gradients' memory until the next backward
            step += 1

            n = max(n_tokens, 1)
            mean_adv = adv_sum.item() / n  # the step's one device sync
            row = {
                "step": step,
                "loss": loss_sum.item(),
                "mean_advantage": mean_adv,
                "reverse_kl": -mean_adv,
                "clip_frac": clip_sum.item() / n,
                "data_wait_s": data_wait,
                "step_time_s": time.perf_counter() - t0,
                "tokens": n_tokens,
                "mean_importance_weight": weight_sum.item() / n,
                "lr": lr,
                "epoch": loader.sampler.epoch,
            }
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {step}; lower --lr or check the data")
            metrics_csv.write(row)
            for sink in sinks:
                sink(row, step)
            window_tokens += n_tokens
            window_time += row["step_time_s"]
            window_wait += data_wait
            window_steps += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                # Throughput over the steps since the last line, training steps only (no eval, no checkpoint).
                memory = ""
                if device.type == "cuda":
                    memory = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                echo(
                    f"step {step}/{cfg.steps}: loss {row['loss']:.4f}, reverse KL {row['reverse_kl']:.4f}, "
                    f"clip {row['clip_frac']:.3f} | {window_tokens / window_time:,.0f} response tokens/s, "
                    f"data wait {100 * window_wait / window_time:.1f}%, {window_time / window_steps:.2f} s/step"
                    + memory
                )
                window_tokens, window_time, window_wait, window_steps = 0, 0.0, 0.0, 0
            if held_out is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                last_eval = run_eval(held_out)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
            if on_step is not None:
                model.eval()
                on_step(step, model)
                model.train()
    finally:
        batches.close()  # type: ignore[attr-defined]  # a generator: closing it stops the prefetch threads
        client.close()
    return TrainResult(step=step, out=cfg.out, last_metrics=row, last_eval=last_eval)
