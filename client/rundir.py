"""What `lopd train` writes into its run directory, and the names `lopd plot` reads back.

`checkpoint.pt` (one dict: model, optimizer, scaler, config, step, loader state, RNG),
`metrics.csv` (one row per optimizer step), `steps.jsonl` (with `--record-samples`: the samples each
step trained on), `eval.csv` (one row per evaluation on the held-out
samples), `model/` (a `save_pretrained` directory) and, with LoRA, `adapter/`. No torch at import:
`lopd plot` needs none.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lopd.errors import InvalidInput

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
EVAL = "eval.csv"
STEPS = "steps.jsonl"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
METRIC_COLUMNS = (
    "step", "loss", "mean_advantage", "reverse_kl", "clip_frac", "data_wait_s", "step_time_s", "tokens",
    "mean_importance_weight", "lr", "epoch",
)  # fmt: skip
# eval_reverse_kl: mean over the held-out response tokens of log p_student - log p_teacher.
EVAL_COLUMNS = ("step", "eval_loss", "eval_reverse_kl", "eval_tokens", "eval_time_s")

Sink = Callable[[dict[str, float], int], None]


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, fsync, rename: a crash leaves the old checkpoint or the new one."""
    import torch

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


class CSVLog:
    """A CSV of one row per step; on resume, rows after the checkpoint's step are dropped (they
    belong to steps that will be trained again)."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int) -> None:
        self.path = path
        self.columns = tuple(columns)
        kept: list[dict[str, str]] = []
        if resume_step > 0 and path.exists():
            with open(path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(row)


class JSONLog:
    """A JSON Lines file of one object per step (each with a `step`); on resume, lines after the
    checkpoint's step are dropped, like `CSVLog`'s rows."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept: list[str] = []
        if resume_step > 0 and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def open_sinks(out: Path, *, tensorboard: bool, wandb: bool, wandb_project: str, config: dict[str, Any]) -> list[Sink]:
    """Optional TensorBoard / W&B logging, imported only when asked for."""
    sinks: list[Sink] = []
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise InvalidInput("--tensorboard needs the tensorboard package: pip install tensorboard") from e
        writer = SummaryWriter(log_dir=str(out / "tensorboard"))

        def to_tensorboard(m: dict[str, float], step: int) -> None:
            for k, v in m.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
            writer.flush()

        sinks.append(to_tensorboard)
    if wandb:
        try:
            import wandb as wandb_module
        except ImportError as e:
            raise InvalidInput("--wandb needs the wandb package: pip install wandb") from e
        run = wandb_module.init(project=wandb_project, config=config, dir=str(out))
        sinks.append(lambda m, step: run.log(m, step=step))
    return sinks
