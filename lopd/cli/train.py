"""`lopd train`: the reference trainer; its flags are `TrainConfig`'s fields (torch loads when it runs)."""

from __future__ import annotations

import typer

from lopd.client.config import TrainConfig

from .params import settings_command


def _train(cfg: TrainConfig) -> None:
    """Distil a student from a served dataset of precomputed teacher log-probs (Lightning OPD)."""
    from lopd.client.trainer import train_student

    result = train_student(cfg, echo=typer.echo)
    typer.echo(
        f"done: step {result.step}; checkpoint {result.out / 'checkpoint.pt'}, metrics {result.out / 'metrics.csv'}"
    )


train_command = settings_command(TrainConfig, _train)
