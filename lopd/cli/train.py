"""`lopd train`: the reference trainer; its flags are `TrainConfig`'s fields (torch loads when it runs);
on N processes: `torchrun --nproc-per-node N -m lopd train ...`.
`lopd plot`: a run's metrics as a PNG (matplotlib loads when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lopd.client.config import TrainConfig

from .params import cli_errors, settings_command


def _train(cfg: TrainConfig) -> None:
    """Distil a student from a served dataset of precomputed teacher log-probs (Lightning OPD)."""
    from lopd.client.trainer import train_student

    result = train_student(cfg, echo=typer.echo)
    if result.rank == 0:  # under torchrun, rank 0 wrote the run directory
        typer.echo(
            f"done: step {result.step}; checkpoint {result.out / 'checkpoint.pt'}, metrics {result.out / 'metrics.csv'}"
        )


train_command = settings_command(TrainConfig, _train, extra="train")


def plot_command(
    run_dir: Annotated[Path, typer.Argument(help="A `lopd train` run directory (its --out).")],
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: RUN_DIR/metrics.png).")] = None,
) -> None:
    """Plot a training run: loss, mean advantage, reverse KL, clip fraction, data wait, held-out evaluation."""
    from lopd.client.plot import plot_run

    with cli_errors():
        plot = plot_run(run_dir, out)
    skipped = f" (not recorded: {', '.join(plot.missing)})" if plot.missing else ""
    typer.echo(f"wrote {plot.path}: {', '.join(plot.panels)}{skipped}")
