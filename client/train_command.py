"""`lopd train`: the reference trainer behind a command line.

Registered in `lopd.cli` as `app.command("train")(train)`. Only typer is imported here at module
level: `lopd --help` must not pay for torch and transformers.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lopd.errors import LopdError


class RatioReference(str, Enum):
    current = "current"
    rollout = "rollout"


class Normalization(str, Enum):
    token = "token"
    sequence = "sequence"


def train(
    url: Annotated[str, typer.Option(help="Base URL of a `lopd serve` endpoint, e.g. http://host:8000.")],
    dataset: Annotated[str, typer.Option(help="Dataset name on the server.")],
    student: Annotated[Path, typer.Option(help="Student model directory (Hugging Face format, with tokenizer).")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoint.pt, metrics.csv, model/.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps to train to (counted from the run's start).")] = 100,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warmup steps.")] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient-norm clipping (0: off).")] = 1.0,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the data order and of torch.")] = 0,
    version: Annotated[int | None, typer.Option(help="Dataset version (default: the latest, pinned).")] = None,
    sft_teacher: Annotated[
        str | None,
        typer.Option(help="Fingerprint (or directory) of the model that generated the student's SFT data."),
    ] = None,
    allow_inconsistent: Annotated[
        bool, typer.Option("--allow-inconsistent", help="Train even if teacher or tokenizer consistency fails.")
    ] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run saved in --out.")] = False,
    token: Annotated[
        str | None, typer.Option(help="Bearer token for the server (or set LOPD_TOKEN).", show_default=False)
    ] = None,
    log_every: Annotated[int, typer.Option(help="Print a progress line every N steps.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = 100,
    prefetch: Annotated[int, typer.Option(help="Batches fetched ahead of the trainer.")] = 4,
    clip_eps: Annotated[float, typer.Option(help="PPO ratio clipping epsilon (low and high).")] = 0.2,
    tis_cap: Annotated[
        float | None, typer.Option(help="Truncated importance weight cap over rollout log-probs (off by default).")
    ] = None,
    ratio_reference: Annotated[
        RatioReference,
        typer.Option(help="PPO ratio against the current policy (plain policy gradient) or the rollout policy."),
    ] = RatioReference.rollout,
    normalize: Annotated[Normalization, typer.Option(help="Loss mean over tokens or over sequences.")] = (
        Normalization.token
    ),
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also log to TensorBoard (out/tensorboard).")] = (
        False
    ),
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases.")] = False,
) -> None:
    """Distil a student from a served dataset of precomputed teacher log-probs (Lightning OPD)."""
    from lopd.client.trainer import TrainConfig, train_student

    cfg = TrainConfig(
        url=url,
        dataset=dataset,
        student=student,
        out=out,
        steps=steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm or None,
        device=device,
        seed=seed,
        version=version,
        sft_teacher=sft_teacher,
        allow_inconsistent=allow_inconsistent,
        resume=resume,
        token=token if token is not None else os.environ.get("LOPD_TOKEN"),
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        prefetch=prefetch,
        clip_eps_low=clip_eps,
        clip_eps_high=clip_eps,
        tis_cap=tis_cap,
        ratio_reference=ratio_reference.value,
        normalize=normalize.value,
        tensorboard=tensorboard,
        wandb=wandb,
    )
    try:
        result = train_student(cfg, echo=typer.echo)
    except LopdError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(
        f"done: step {result.step}; checkpoint {result.out / 'checkpoint.pt'}, metrics {result.out / 'metrics.csv'}"
    )
