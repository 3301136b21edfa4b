"""Choosing the OPD learning rate on the validation split, so that the reported numbers never choose it.

For each candidate, the pipeline runs its two headline arms (Lightning OPD with the paper's
ratio-1 update, and online OPD, both with teacher A) and evaluates on the validation problems.
A run is *stable* when it ends no worse than its SFT start in both accuracy and reverse KL to
the teacher (a collapse fails both). The chosen rate is the one with the best mean final
validation accuracy among those where both arms are stable; the rule is fixed here, before
looking at any result.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel

from .config import PipelineConfig
from .report import MethodRun
from .run import ARMS, run_pipeline

TUNED_METHODS = ("lightning_opd", "online_opd")


class TuningRow(BaseModel):
    lr: float
    method: str
    sft_accuracy: float
    final_accuracy: float
    best_accuracy: float
    sft_reverse_kl: float
    final_reverse_kl: float
    stable: bool


class Tuning(BaseModel):
    config: PipelineConfig
    rows: list[TuningRow]
    chosen_lr: float | None


def is_stable(run: MethodRun) -> bool:
    start, end = run.curve[0], run.curve[-1]
    return end.accuracy >= start.accuracy and end.reverse_kl <= start.reverse_kl


def choose(rows: Sequence[TuningRow]) -> float | None:
    """The rate with the best mean final accuracy among those where every tuned method is stable."""
    by_lr: dict[float, list[TuningRow]] = {}
    for row in rows:
        by_lr.setdefault(row.lr, []).append(row)
    stable = {lr: rs for lr, rs in by_lr.items() if all(r.stable for r in rs)}
    if not stable:
        return None
    return max(stable, key=lambda lr: statistics.fmean(r.final_accuracy for r in stable[lr]))


def tune(cfg: PipelineConfig, lrs: Sequence[float], run_dir: Path, *, echo: Callable[[str], None] = print) -> str:
    """Run the headline arms at each rate on the validation split; write tuning.json / tuning.md; return the table."""
    cfg = cfg.model_copy(update={"split": "validation"})
    arms = [a for a in ARMS if a.method in TUNED_METHODS]
    rows: list[TuningRow] = []
    for lr in lrs:
        echo(f"--- lr {lr:g} (validation split)")
        report = run_pipeline(cfg.model_copy(update={"opd_lr": lr}), run_dir, echo=echo, arms=arms, write=False)
        for seed in report.seeds:
            for run in seed.runs:
                rows.append(TuningRow(
                    lr=lr, method=run.method, sft_accuracy=run.curve[0].accuracy, final_accuracy=run.curve[-1].accuracy,
                    best_accuracy=max(p.accuracy for p in run.curve), sft_reverse_kl=run.curve[0].reverse_kl,
                    final_reverse_kl=run.curve[-1].reverse_kl, stable=is_stable(run),
                ))  # fmt: skip
    result = Tuning(config=cfg, rows=rows, chosen_lr=choose(rows))
    (run_dir / "tuning.json").write_text(result.model_dump_json(indent=2) + "\n")
    table = markdown(result)
    (run_dir / "tuning.md").write_text(table)
    return table


def markdown(t: Tuning) -> str:
    cfg = t.config
    lines = [
        f"OPD learning rate, chosen on {cfg.test_problems} validation problems (seeds {cfg.seeds}, {cfg.opd_steps} "
        f"steps of {cfg.opd_batch_size}, {cfg.rollout_passes:g} rollout passes). Stable: ends no worse than the SFT "
        "start in accuracy and in reverse KL to the teacher.",
        "",
        "| lr | method | SFT accuracy | final accuracy | best accuracy | SFT reverse KL | final reverse KL | stable |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.lr:g} | {r.method} | {r.sft_accuracy:.1%} | {r.final_accuracy:.1%} | {r.best_accuracy:.1%} | "
        f"{r.sft_reverse_kl:.3f} | {r.final_reverse_kl:.3f} | {'yes' if r.stable else 'no'} |"
        for r in t.rows
    ]
    chosen = "none: no rate kept both stable" if t.chosen_lr is None else f"{t.chosen_lr:g}"
    lines += ["", f"Chosen: {chosen}.", "", "```json", json.dumps({"chosen_lr": t.chosen_lr}), "```"]
    return "\n".join(lines) + "\n"
