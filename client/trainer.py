"""A reference Lightning OPD trainer for Hugging Face causal LMs, readable top to bottom.

One process per device: one, or many under torchrun (DDP or FSDP2; `distributed.py` defines the global
batch, the ranks' partitions and what the checkpoint holds). The data comes from a `lopd serve`
endpoint through `OPDLoader`; the objective is `lightning_opd_loss`, computed in float32
whatever the forward's precision; everything needed to continue a run exactly (the model or its
LoRA adapter, optimizer, loss scaler, step, RNG and the loader's position in its epoch, for
every rank) is one checkpoint dict. The student's setup (precision, LoRA, gradient
checkpointing) is `student.py`, the evaluation on held-out samples `evaluation.py`, the files of
the run directory `rundir.py`, and the loss of one batch `objective.py`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lopd._faults import crash_point
from lopd.config import flag
from lopd.errors import Conflict, InvalidInput, NotFound
from lopd.http_contract import SERVED_COLUMNS, TOPK_COLUMNS

from .config import TrainConfig
from .consistency import check_dataset_for_training
from .distributed import (
    check_world_size,
    init_ranks,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    step_samples,
    weigh_fillers,
)
from .evaluation import HeldOut, evaluate, held_out_indices
from .http import StoreClient
from .loader import OPDLoader
from .objective import opd_batch_loss, to_device
from .rundir import (
    ADAPTER_DIR,
    CHECKPOINT,
    EVAL,
    EVAL_COLUMNS,
    METRIC_COLUMNS,
    METRICS,
    MODEL_DIR,
    STEPS,
    CSVLog,
    JSONLog,
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

__all__ = ["CHECKPOINT", "EVAL", "METRICS", "METRIC_COLUMNS", "MODEL_DIR", "STEPS", "TrainConfig", "TrainResult"]
__all__ += ["opd_batch_loss", "train_student"]

# Settings that shape the run itself (the trained parameters, the training samples): a resumed
# run with other values would not be a continuation.
# The parallelism too: the optimizer state is saved in its own layout.
RESUME_FIXED = ("lora_rank", "lora_alpha", "lora_target_modules", "eval_samples", "parallelism")


@dataclass
class TrainResult:
    step: int
    out: Path
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    rank: int = 0  # under torchrun, only rank 0 has written anything


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
    """Say it, once and before training, when `--ratio-reference rollout` or `--tis-cap` has nothing to refer to."""
    source = (info.raw.get("provenance") or {}).get("rollout_logprobs_source")
    if source != "none":
        return
    if cfg.ratio_reference == "current":
        if cfg.tis_cap:
            log.warning(
                "dataset %s v%s stores no rollout log-probs, so --tis-cap %s has nothing to weigh with: every "
                "token gets weight 1. Store them (lopd precompute ... --rollout-policy DIR) for the importance weights",
                info.name, info.version, cfg.tis_cap,
            )  # fmt: skip
        return
    log.warning(
        "dataset %s v%s stores no rollout log-probs, so --ratio-reference rollout falls back to ratio 1: the plain "
        "policy gradient, with no trust region (clip fraction 0%s). To train with a trust region around the "
        "policy that sampled the rollouts, store its log-probs: lopd precompute ... --rollout-policy DIR. "
        "Pass --ratio-reference current to ask for the plain policy gradient explicitly",
        info.name, info.version, "; --tis-cap has no effect either" if cfg.tis_cap else "",
    )  # fmt: skip


# -- the run -------------------------------------------------------------------------------------


def train_student(
    cfg: TrainConfig,
    echo: Callable[[str], None] = log.info,
    client: StoreClient | None = None,
    on_step: Callable[[int, Any], None] | None = None,
) -> TrainResult:
    """Train `cfg.student` on `cfg.dataset` for `cfg.steps` optimizer steps (continuing with `resume`).

    Under torchrun, every rank calls this; only rank 0 echoes and writes (`distributed.py`).
    `client` replaces the `StoreClient` built from `cfg.url` / `cfg.token` (custom transports).
    `on_step(step, model)` runs on rank 0 after every optimizer step with the model in eval mode
    (evaluation during training); its time is excluded from the step time in metrics.csv. It is
    refused under `--parallelism fsdp` on many processes, where a forward needs every rank.
    """
    from transformers import AutoTokenizer

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {cfg.device!r} asked for, but torch sees no CUDA device; use --device cpu")
    if cfg.parallelism == "fsdp" and cfg.lora_rank:
        raise InvalidInput(
            "--parallelism fsdp does not train LoRA adapters; use --parallelism ddp with --lora-rank (the adapter is "
            "small, and the frozen base can be held in --dtype bfloat16)"
        )
    ranks = init_ranks(cfg.device, cfg.parallelism)
    if ranks.sharded and on_step is not None:
        raise InvalidInput("on_step runs on rank 0 alone, which cannot run a forward of an FSDP-sharded student")
    device = ranks.device
    if not ranks.is_main:
        echo = _quiet
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.out / CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise NotFound(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        _check_resumable(cfg, ckpt["config"])
        check_world_size(int(ckpt.get("world_size", 1)), ranks)
    elif ckpt_path.exists():
        raise Conflict(f"{cfg.out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    # Fail on a missing optional package before anything slow.
    sinks = open_sinks(
        cfg.out, tensorboard=cfg.tensorboard and ranks.is_main, wandb=cfg.wandb and ranks.is_main,
        wandb_project=cfg.wandb_project, config=cfg.to_json(),
    )  # fmt: skip
    torch.manual_seed(cfg.seed)  # the same on every rank: LoRA's initialisation must agree

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
    columns = None  # the contract's default columns: Lightning OPD fetches no top-k bytes
    if cfg.loss != "lightning-opd":
        if not info.top_k:
            raise InvalidInput(
                f"--loss {cfg.loss} distils the teacher's top-k, and {info.name!r} v{info.version} has none: build "
                "the dataset with `lopd precompute --top-k K`, or train with --loss lightning-opd"
            )
        columns = (*SERVED_COLUMNS, *TOPK_COLUMNS)
    if info.temperature not in (None, 1.0) and ranks.is_main:
        log.warning("the teacher scored at temperature %s; the student is scored at 1.0", info.temperature)
    if ranks.is_main:
        _warn_if_no_trust_region(cfg, info)
    echo(f"dataset {info.name} v{info.version}: {info.num_samples} samples, {info.verdict}")

    # The student: the weights AdamW updates are float32, the forward runs in --dtype (student.py).
    model = load_student(cfg, device)
    # DDP on many processes (evaluation and export use the bare `model`), or FSDP, which shards
    # `model` itself in place: before the optimizer is built, so that it holds the shards.
    train_model = ranks.wrap(model)
    amp = autocast(cfg, device)
    scaler = grad_scaler(cfg, device)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_all = sum(p.numel() for p in model.parameters())
    what = f"LoRA rank {cfg.lora_rank} on {cfg.lora_target_modules}" if cfg.lora_rank else "every weight"
    echo(f"student: training {sum(p.numel() for p in params):,} of {n_all:,} parameters ({what}), forward in "
         f"{cfg.dtype}" + (", gradient checkpointing" if cfg.gradient_checkpointing else ""))  # fmt: skip
    if ranks.world_size > 1:
        g = cfg.batch_size * cfg.grad_accum * ranks.world_size
        sharded = ", student sharded (FSDP)" if ranks.sharded else ""
        echo(f"{ranks.world_size} processes ({device.type}): global batch {cfg.batch_size} x {cfg.grad_accum} x "
             f"{ranks.world_size} = {g} sequences per step{sharded}")  # fmt: skip

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = OPDLoader(
        client, cfg.dataset, cfg.batch_size, seed=cfg.seed, rank=ranks.rank, world_size=ranks.world_size,
        prefetch=cfg.prefetch, num_epochs=None, pad_id=pad_id, pin_memory=device.type == "cuda", info=info,
        columns=columns,
    )  # fmt: skip
    loader.sampler = loader.sampler.evened()  # the same number of passes on every rank (DDP), fillers weigh 0
    held_out: HeldOut | None = None
    if cfg.eval_samples:
        indices = held_out_indices(info.num_samples, cfg.eval_samples)
        loader.sampler = loader.sampler.excluding(indices)  # never trained on; part of the loader's resume state
        # Rank 0 evaluates alone, but under FSDP every rank runs the forward with it.
        held_out = (
            HeldOut(client, info, indices, cfg.batch_size, pad_id, columns) if ranks.is_main or ranks.sharded else None
        )
    step = 0
    if ckpt is not None:
        if ranks.sharded:
            load_model_state(ranks, model, ckpt["model"])  # every rank read it whole, and keeps its shard
        else:
            load_student_state(cfg, model, ckpt["model"])
        load_optimizer_state(ranks, model, optimizer, ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        # Each rank continues from its own position (refused: other content, batch size, seed, held-out set).
        loader.load_state_dict(ckpt.get("loaders", [ckpt["loader"]])[ranks.rank])
        torch.set_rng_state(ckpt.get("rngs", [ckpt["rng"]])[ranks.rank])
        cuda_rng = ckpt.get("cuda_rngs", [ckpt.get("cuda_rng")])[ranks.rank]
        if device.type == "cuda" and cuda_rng is not None:  # dropout on the GPU draws from it
            torch.cuda.set_rng_state(cuda_rng, device)
        step = int(ckpt["step"])
        echo(f"resumed from {ckpt_path} at step {step} (epoch {loader.sampler.epoch}, "
             f"batch {loader.sampler.batches_consumed} of {len(loader)})")  # fmt: skip
    metrics_csv = CSVLog(cfg.out / METRICS, METRIC_COLUMNS, resume_step=step) if ranks.is_main else None
    writes_eval = held_out is not None and ranks.is_main
    eval_csv = CSVLog(cfg.out / EVAL, EVAL_COLUMNS, resume_step=step) if writes_eval else None
    steps_log = JSONLog(cfg.out / STEPS, resume_step=step) if cfg.record_samples and ranks.is_main else None

    def batch_loss(net: Any, b: dict[str, Any], token_count: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return opd_batch_loss(cfg, net, amp, to_device(b, device), token_count)

    def run_eval(held_out: HeldOut) -> dict[str, float]:
        loss_fn = functools.partial(batch_loss, model)  # DDP: rank 0 alone, the bare model; FSDP: every rank
        result = {"step": step, **evaluate(model, held_out, loss_fn, normalize=cfg.normalize)}
        if eval_csv is not None:
            eval_csv.write(result)
        for sink in sinks:
            sink({"eval_loss": result["eval_loss"], "eval_reverse_kl": result["eval_reverse_kl"]}, step)
        echo(f"eval at step {step}: loss {result['eval_loss']:.4f}, reverse KL {result['eval_reverse_kl']:.4f} "
             f"({len(held_out.indices)} held-out samples, {int(result['eval_tokens'])} tokens)")  # fmt: skip
        return result

    def save_checkpoint() -> None:
        # Every rank's position and RNG, and under FSDP the gathered full state (collectives); rank 0 writes.
        loaders, rngs = ranks.gather(loader.state_dict()), ranks.gather(torch.get_rng_state())
        cuda_rngs = ranks.gather(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        model_sd = model_state(ranks, model) if ranks.sharded else student_state(cfg, model)  # LoRA: the adapter
        optimizer_sd = optimizer_state(ranks, model, optimizer)
        if not ranks.is_main:
            return
        atomic_torch_save(
            {
                "model": model_sd,
                "optimizer": optimizer_sd,
                "scaler": scaler.state_dict(),  # empty unless float16
                "config": cfg.to_json(),
                "step": step,
                "world_size": ranks.world_size,
                "loader": loaders[0],
                "loaders": loaders,
                "rng": rngs[0],
                "rngs": rngs,
                "cuda_rng": cuda_rngs[0],
                "cuda_rngs": cuda_rngs,
            },
            ckpt_path,
        )
        full = model_sd if ranks.sharded else None  # a sharded model cannot save itself
        export_student(cfg, model, tokenizer, cfg.out / MODEL_DIR, cfg.out / ADAPTER_DIR, state=full)

    if step >= cfg.steps:
        echo(f"already at step {step} of {cfg.steps}; nothing to do (raise --steps to train on)")
    batches = iter(loader)
    row: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    window_tokens, window_time, window_wait, window_steps = 0, 0.0, 0.0, 0  # since the last progress line
    try:
        if held_out is not None and step == 0 < cfg.steps:
            last_eval = run_eval(held_out)  # the starting point of the curve
        train_model.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = _lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # All micro-batches first (they are prefetched anyway): the losses are means over the
            # whole step on every rank, so each micro-batch is divided by the step's global counts.
            data_wait = 0.0
            micro = []
            for _ in range(cfg.grad_accum):
                tw = time.perf_counter()
                micro.append(weigh_fillers(next(batches), loader.sampler))
                data_wait += time.perf_counter() - tw
            sequences = [int((b["response_mask"].sum(-1) > 0).sum()) for b in micro]
            counts = ranks.sum([float(sum(int(b["response_mask"].sum()) for b in micro)), float(sum(sequences))])
            n_tokens, n_sequences = int(counts[0]), max(int(counts[1]), 1)

            loss_sum = torch.zeros((), device=device)
            adv_sum = torch.zeros((), device=device)
            clip_sum = torch.zeros((), device=device)
            weight_sum = torch.zeros((), device=device)
            for j, b in enumerate(micro):
                with ranks.no_sync(train_model, last=j == len(micro) - 1):
                    loss, m = batch_loss(train_model, b, max(n_tokens, 1))
                    if cfg.normalize == "sequence":  # this batch's sequence mean, weighed by its share
                        loss = loss * (sequences[j] / n_sequences)
                    # DDP averages gradients over ranks; the loss is already a share of the global mean.
                    # float16: scaled so small gradients do not underflow.
                    scaler.scale(loss * ranks.world_size).backward()
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
            # The step's one device sync, and (many processes) its sums over ranks.
            totals = ranks.sum(torch.stack([loss_sum, adv_sum, clip_sum, weight_sum]).tolist())
            data_wait = ranks.max(data_wait)  # the slowest rank sets the pace
            consumed = step_samples(micro, ranks) if cfg.record_samples else None  # a collective
            row = {
                "step": step,
                "loss": totals[0],
                "mean_advantage": totals[1] / n,
                "reverse_kl": -totals[1] / n,
                "clip_frac": totals[2] / n,
                "data_wait_s": data_wait,
                "step_time_s": time.perf_counter() - t0,
                "tokens": n_tokens,
                "mean_importance_weight": totals[3] / n,
                "lr": lr,
                "epoch": loader.sampler.epoch,
            }
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"loss is {row['loss']} at step {step}; lower --lr or check the data")
            if metrics_csv is not None:
                metrics_csv.write(row)
            if steps_log is not None and consumed is not None:
                steps_log.write({"step": step, **consumed})
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
            if on_step is not None and ranks.is_main:
                model.eval()
                on_step(step, model)
                model.train()
            crash_point("train-step")  # resume tests: LOPD_FAULT=train-step:N dies after step N + 1
    finally:
        batches.close()  # type: ignore[attr-defined]  # a generator: closing it stops the prefetch threads
        client.close()
        ranks.close()
    return TrainResult(step=step, out=cfg.out, last_metrics=row, last_eval=last_eval, rank=ranks.rank)


def _quiet(line: str) -> None:
    """The echo of ranks other than 0."""
