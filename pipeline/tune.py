"""Choosing the OPD learning rate (and whether to use TIS) on the validation split, so that the reported
numbers never choose them.

For each candidate, the pipeline runs its two headline arms (Lightning OPD with the paper's
ratio-1 update, optionally with truncated importance weights, and online OPD, both with teacher
A) and evaluates on the validation problems. A run is *stable* when it ends no worse than its SFT
start in both accuracy and reverse KL to the teacher (a collapse fails both). The chosen setting
is the one with the best mean final validation accuracy among those where both arms are stable;
the rule is fixed here, before looking at any result. Each call adds its settings to the run
directory's `tuning.json`.
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
    tis_cap: float | None = None
    method: str
    sft_accuracy: float
    final_accuracy: float
    best_accuracy: float
    sft_reverse_kl: float
    final_reverse_kl: float
    stable: bool


Setting = tuple[float, float | None]  # (learning rate, TIS cap)


class Tuning(BaseModel):
    config: PipelineConfig
    rows: list[TuningRow]
    chosen: Setting | None = None


def is_stable(run: MethodRun) -> bool:
    start, end = run.curve[0], run.curve[-1]
    return end.accuracy >= start.accuracy and end.reverse_kl <= start.reverse_kl


def choose(rows: Sequence[TuningRow]) -> Setting | None:
    """The setting with the best mean final accuracy among those where every tuned method is stable."""
    by_setting: dict[Setting, list[TuningRow]] = {}
    for row in rows:
        by_setting.setdefault((row.lr, row.tis_cap), []).append(row)
    stable = {k: rs for k, rs in by_setting.items() if all(r.stable for r in rs)}
    if not stable:
        return None
    return max(stable, key=lambda k: statistics.fmean(r.final_accuracy for r in stable[k]))


def tune(cfg: PipelineConfig, lrs: Sequence[float], run_dir: Path, *, echo: Callable[[str], None] = print) -> str:
    """Run the headline arms at each rate (at `cfg.tis_cap`) on the validation split; add them to tuning.json /
    tuning.md; return the table."""
    cfg = cfg.model_copy(update={"split": "validation"})
    arms = [a for a in ARMS if a.method in TUNED_METHODS]
    rows = _earlier_rows(run_dir / "tuning.json", cfg)
    for lr in lrs:
        if any((r.lr, r.tis_cap) == (lr, cfg.tis_cap) for r in rows):
            echo(f"--- lr {lr:g}: kept from {run_dir / 'tuning.json'}")
            continue
        echo(f"--- lr {lr:g}, TIS cap {cfg.tis_cap} (validation split)")
        report = run_pipeline(cfg.model_copy(update={"opd_lr": lr}), run_dir, echo=echo, arms=arms, write=False)
        for seed in report.seeds:
            for run in seed.runs:
                rows.append(TuningRow(
                    lr=lr, tis_cap=cfg.tis_cap, method=run.method, sft_accuracy=run.curve[0].accuracy,
                    final_accuracy=run.curve[-1].accuracy,
                    best_accuracy=max(p.accuracy for p in run.curve), sft_reverse_kl=run.curve[0].reverse_kl,
                    final_reverse_kl=run.curve[-1].reverse_kl, stable=is_stable(run),
                ))  # fmt: skip
        # Written after every rate: a later call with more rates adds to it instead of starting over.
        (run_dir / "tuning.json").write_text(
            Tuning(config=cfg, rows=rows, chosen=choose(rows)).model_dump_json(indent=2) + "\n"
        )
    result = Tuning(config=cfg, rows=sorted(rows, key=lambda r: (r.tis_cap or 0, r.lr, r.method)), chosen=choose(rows))
    (run_dir / "tuning.json").write_text(result.model_dump_json(indent=2) + "\n")
    table = markdown(result)
    (run_dir / "tuning.md").write_text(table)
    return table


def _earlier_rows(path: Path, cfg: PipelineConfig) -> list[TuningRow]:
    """Rows of an earlier call with the same settings (the learning rate aside), to add to; else none."""
    if not path.is_file():
        return []
    earlier = Tuning.model_validate_json(path.read_text())
    tuned = {"opd_lr", "tis_cap"}
    same = earlier.config.model_dump(exclude=tuned) == cfg.model_dump(exclude=tuned)
    return list(earlier.rows) if same else []


def markdown(t: Tuning) -> str:
    cfg = t.config
    lines = [
        f"OPD learning rate, chosen on {cfg.test_problems} validation problems (seeds {cfg.seeds}, {cfg.opd_steps} "
        f"steps of {cfg.opd_batch_size}, {cfg.rollout_passes:g} rollout passes). Stable: ends no worse than the SFT "
        "start in accuracy and in reverse KL to the teacher.",
        "",
        "| lr | TIS cap | method | SFT accuracy | final accuracy | best accuracy | SFT reverse KL | final reverse KL "
        "| stable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.lr:g} | {r.tis_cap or '-'} | {r.method} | {r.sft_accuracy:.1%} | {r.final_accuracy:.1%} | "
        f"{r.best_accuracy:.1%} | "
        f"{r.sft_reverse_kl:.3f} | {r.final_reverse_kl:.3f} | {'yes' if r.stable else 'no'} |"
        for r in t.rows
    ]
    chosen = "none: no setting kept both stable" if t.chosen is None else f"lr {t.chosen[0]:g}, TIS cap {t.chosen[1]}"
    lines += ["", f"Chosen: {chosen}.", "", "```json", json.dumps({"chosen": t.chosen}), "```"]
    return "\n".join(lines) + "\n"
