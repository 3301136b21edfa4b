"""A reference Lightning OPD trainer for Hugging Face causal LMs, readable top to bottom.

One process, one device. The data comes from a `lopd serve` endpoint through `OPDLoader`; the
objective is `lightning_opd_loss`; everything needed to continue a run exactly (model,
optimizer, step, RNG and the loader's position in its epoch) is one checkpoint dict.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lopd.errors import Conflict, InvalidInput, NotFound

from .collate import token_logprobs
from .config import TrainConfig
from .consistency import check_dataset_for_training
from .http import StoreClient
from .loader import OPDLoader
from .loss import lightning_opd_loss

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
MODEL_DIR = "model"
METRIC_COLUMNS = (
    "step", "loss", "mean_advantage", "reverse_kl", "clip_frac", "data_wait_s", "step_time_s", "tokens",
    "mean_importance_weight", "lr", "epoch",
)  # fmt: skip


@dataclass
class TrainResult:
    step: int
    out: Path
    last_metrics: dict[str, float] = field(default_factory=dict)


# -- small helpers the loop uses -----------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a crash leaves the old checkpoint or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _export_model(model: Any, tokenizer: Any, dest: Path) -> None:
    """save_pretrained into a fresh directory, then swap it in, so `dest` is never half-written."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    old = dest.with_name(f".{dest.name}.old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


class MetricsCSV:
    """metrics.csv, one row per optimizer step; on resume, rows after the checkpoint's step are
    dropped (they belong to steps that will be trained again)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept: list[dict[str, str]] = []
        if resume_step > 0 and path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore").writerow(row)


def _open_sinks(cfg: TrainConfig) -> list[Callable[[dict[str, float], int], None]]:
    """Optional TensorBoard / W&B logging, imported only when asked for."""
    sinks: list[Callable[[dict[str, float], int], None]] = []
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InvalidInput("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        writer = SummaryWriter(log_dir=str(cfg.out / "tensorboard"))

        def to_tensorboard(m: dict[str, float], step: int) -> None:
            for k, v in m.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
            writer.flush()

        sinks.append(to_tensorboard)
    if cfg.wandb:
        try:
            import wandb
        except ImportError as e:
            raise InvalidInput("--wandb needs the wandb package: pip install wandb") from e
        run = wandb.init(project=cfg.wandb_project, config=cfg.to_json(), dir=str(cfg.out))
        sinks.append(lambda m, step: run.log(m, step=step))
    return sinks


def _lr_at(cfg: TrainConfig, step: int) -> float:
    # Linear warmup, then constant: distillation runs are short and the reference stays simple.
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput(f"device {cfg.device!r} asked for, but torch sees no CUDA device; use --device cpu")
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_path = cfg.out / CHECKPOINT
    ckpt: dict[str, Any] | None = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise NotFound(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    elif ckpt_path.exists():
        raise Conflict(f"{cfg.out} already holds a checkpoint; pass --resume to continue it, or choose another --out")
    sinks = _open_sinks(cfg)  # fail on a missing optional package before anything slow
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
    echo(f"dataset {info.name} v{info.version}: {info.num_samples} samples, {info.verdict}")

    model: Any = AutoModelForCausalLM.from_pretrained(str(cfg.student), dtype=torch.float32).to(device)  # type: ignore[arg-type]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = OPDLoader(
        client, cfg.dataset, cfg.batch_size, seed=cfg.seed, prefetch=cfg.prefetch, num_epochs=None,
        pad_id=pad_id, pin_memory=device.type == "cuda", info=info,
    )  # fmt: skip
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])  # refuses other content, other batch size, other seed
        torch.set_rng_state(ckpt["rng"])
        step = int(ckpt["step"])
        echo(f"resumed from {ckpt_path} at step {step} (epoch {loader.sampler.epoch}, "
             f"batch {loader.sampler.batches_consumed} of {len(loader)})")  # fmt: skip
    metrics_csv = MetricsCSV(cfg.out / METRICS, resume_step=step)

    def save_checkpoint() -> None:
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "config": cfg.to_json(),
                "step": step,
                "loader": loader.state_dict(),
                "rng": torch.get_rng_state(),
            },
            ckpt_path,
        )
        _export_model(model, tokenizer, cfg.out / MODEL_DIR)

    if step >= cfg.steps:
        echo(f"already at step {step} of {cfg.steps}; nothing to do (raise --steps to train on)")
    batches = iter(loader)
    model.train()
    row: dict[str, float] = {}
    try:
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
                b = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                student_lp = token_logprobs(logits, b["input_ids"])  # aligned with teacher_logprobs
                old = None
                if cfg.ratio_reference == "rollout":  # rows without rollout log-probs keep ratio 1
                    has = b["has_rollout_logprobs"][:, None].expand_as(student_lp)
                    old = torch.where(has, b["rollout_logprobs"], student_lp.detach())
                loss, m = lightning_opd_loss(
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
                    token_count=max(n_tokens, 1) if cfg.normalize == "token" else None,
                )
                if cfg.normalize == "sequence":
                    loss = loss / cfg.grad_accum
                loss.backward()
                del logits  # the [B, T, V] logits are the largest activation; drop them before the next forward
                loss_sum += loss.detach()
                adv_sum += m["mean_advantage"] * m["tokens"]
                clip_sum += m["clip_frac"] * m["tokens"]
                weight_sum += m["mean_importance_weight"] * m["tokens"]
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
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
            if step % cfg.log_every == 0 or step == cfg.steps:
                echo(
                    f"step {step}/{cfg.steps}: loss {row['loss']:.4f}, reverse KL {row['reverse_kl']:.4f}, "
                    f"clip {row['clip_frac']:.3f}, data wait {data_wait * 1e3:.1f} ms, "
                    f"step {row['step_time_s']:.2f} s"
                )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
            if on_step is not None:
                model.eval()
                on_step(step, model)
                model.train()
    finally:
        batches.close()  # type: ignore[attr-defined]  # a generator: closing it stops the prefetch threads
        client.close()
    return TrainResult(step=step, out=cfg.out, last_metrics=row)
