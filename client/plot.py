"""`lopd plot RUN_DIR`: a run's metrics.csv (and eval.csv) as one PNG of small panels.

Reads the CSVs with the standard library; matplotlib (the `demo` extra) is imported only to draw.
A column a run did not record (an older trainer, a hand-made CSV) leaves its panel out rather
than failing: the panels drawn are returned.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput, NotFound

from .rundir import EVAL, METRICS

# (title, y-axis label, metrics.csv column, eval.csv column drawn on the same axes)
PANELS: tuple[tuple[str, str, str, str | None], ...] = (
    ("loss", "loss", "loss", "eval_loss"),
    ("mean advantage", "log p_teacher - log p_student", "mean_advantage", None),
    ("reverse KL", "KL(student || teacher), nats/token", "reverse_kl", "eval_reverse_kl"),
    ("clip fraction", "share of tokens", "clip_frac", None),
    ("data wait", "share of the step time, %", "data_wait_s", None),
)
PNG = "metrics.png"


@dataclass
class Plot:
    path: Path
    panels: list[str]  # titles of the panels drawn, in order
    missing: list[str]  # titles of the panels left out: their column is not in metrics.csv


def _read(path: Path) -> dict[str, list[float]]:
    """CSV columns as float lists (blank or unparsable cells become NaN, so lines break there)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, list[float]] = {}
    for name in rows[0] if rows else []:
        values = []
        for row in rows:
            try:
                values.append(float(row[name]))
            except (TypeError, ValueError):
                values.append(math.nan)
        columns[name] = values
    return columns


def _import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise InvalidInput("`lopd plot` needs matplotlib: pip install 'lightning-opd[demo]'") from e
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path, out: Path | None = None) -> Plot:
    """Draw `run_dir/metrics.csv` (and `eval.csv` when present) into `out` (default `run_dir/metrics.png`)."""
    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        raise NotFound(f"no {METRICS} in {run_dir}; is it the --out directory of a `lopd train` run?")
    metrics = _read(metrics_path)
    if not metrics.get("step"):
        raise InvalidInput(f"{metrics_path} has no rows yet (or no step column); plot it after the first step")
    evals = _read(run_dir / EVAL) if (run_dir / EVAL).is_file() else {}
    if "data_wait_s" in metrics and "step_time_s" in metrics:
        metrics["data_wait_s"] = [
            100 * w / t if t > 0 else math.nan for w, t in zip(metrics["data_wait_s"], metrics["step_time_s"])
        ]
    drawn = [p for p in PANELS if p[2] in metrics or (p[3] is not None and p[3] in evals)]
    missing = [p[0] for p in PANELS if p not in drawn]
    if not drawn:
        raise InvalidInput(f"{metrics_path} has none of the columns {', '.join(p[2] for p in PANELS)}")

    plt = _import_pyplot()
    cols = min(3, len(drawn))
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, ylabel, column, eval_column) in zip(axes.flat, drawn):
        if column in metrics:
            ax.plot(metrics["step"], metrics[column], lw=1, label="train")
        if eval_column is not None and eval_column in evals and evals.get("step"):
            ax.plot(evals["step"], evals[eval_column], "o-", ms=3, lw=1, label="held-out")
            ax.legend(fontsize=8)
        if title == "data wait" and "step_time_s" not in metrics:
            ylabel = "seconds per step"  # no step time to take a share of
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn) :]:
        ax.axis("off")
    fig.suptitle(f"lopd train: {run_dir.resolve().name}", fontsize=11)
    fig.tight_layout()
    out = out if out is not None else run_dir / PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Plot(path=out, panels=[p[0] for p in drawn], missing=missing)
