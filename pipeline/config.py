"""The pipeline's settings: one model, three presets (`fast` for CI, `default`, `full`).

Everything a run depends on is here and is written into the results JSON, so a table can be
traced back to the exact settings that produced it. The equivalence margins are settings too:
they are fixed before a run, never chosen after looking at its numbers.

How the OPD settings were chosen (`lopd pipeline tune`, on the validation split, which the
reported numbers never see): see `docs/results/tuning.md`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Preset = Literal["fast", "default", "full"]
Split = Literal["test", "validation"]
# The arms (`pipeline/run.py ARMS`, labels in `report.METHODS`). The default preset runs the four that test the
# paper's claims directly, to stay within minutes; `full` and `fast` run all seven.
ALL_ARMS = (
    "lightning_opd", "online_opd", "lightning_opd_trust_region", "lightning_opd_a_prime",
    "lightning_opd_inconsistent", "online_opd_inconsistent", "control_b",
)  # fmt: skip
CORE_ARMS = ("lightning_opd", "online_opd", "lightning_opd_inconsistent", "online_opd_inconsistent")


class ModelSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)


class PipelineConfig(BaseModel):
    """Sizes, steps, seeds and the statistics' margins of one pipeline run."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "default"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    arms: list[str] = Field(default_factory=lambda: list(CORE_ARMS), min_length=1, description="arms to run")
    digits: int = Field(3, ge=1, le=6, description="operand digits of the addition problems")
    train_problems: int = Field(4000, gt=0, description="prompts for teachers, SFT data and rollouts")
    test_problems: int = Field(500, gt=0, description="held-out problems for the reported evaluation")
    split: Split = Field("test", description="evaluate on the test split, or on the validation split (tuning)")
    teacher: ModelSize = ModelSize(hidden=128, layers=3)
    teacher_steps: int = Field(800, gt=0)
    student: ModelSize = ModelSize(hidden=64, layers=2)
    sft_examples: int = Field(3000, gt=0, description="teacher samples each student is fine-tuned on")
    sft_steps: int = Field(550, gt=0)
    opd_steps: int = Field(200, gt=0, description="optimizer steps of each consistent OPD run")
    inconsistent_steps_factor: int = Field(
        2, ge=1, description="inconsistent runs take this many times the steps ('regardless of training duration')"
    )
    opd_batch_size: int = Field(128, gt=0)
    opd_lr: float = Field(1e-5, gt=0, description="chosen on the validation split (docs/results/tuning.md)")
    rollout_passes: float = Field(
        2.0, gt=0, description="times a consistent offline run sees each stored rollout (the paper: about 2)"
    )
    tis_cap: float | None = Field(
        2.0, gt=0, description="truncated importance weight cap of Lightning OPD (chosen on the validation split)"
    )
    eval_every: int = Field(50, gt=0)
    kl_samples: int = Field(300, gt=0, description="held-out prompts sampled for the KL measurements")
    grad_samples: int = Field(128, gt=0, description="samples per gradient in the offline/online gradient comparison")
    max_new_tokens: int = Field(48, gt=0)
    fit_batch_size: int = Field(64, gt=0)
    fit_lr: float = Field(3e-3, gt=0)
    torch_threads: int = Field(2, gt=0, description="pinned so that float results do not depend on the machine's cores")
    margin_accuracy: float = Field(0.03, gt=0, description="equivalence margin of held-out accuracy (fixed in advance)")
    margin_kl: float = Field(0.05, gt=0, description="equivalence margin of reverse KL, nats/token (fixed in advance)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of every test")

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        unknown = [a for a in arms if a not in ALL_ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {', '.join(ALL_ARMS)}")
        return [a for a in ALL_ARMS if a in arms]  # in the canonical order

    @property
    def rollouts(self) -> int:
        """Rollouts sampled once and scored once: enough for `rollout_passes` passes of a consistent run."""
        return math.ceil(self.opd_steps * self.opd_batch_size / self.rollout_passes)

    @classmethod
    def preset_config(cls, preset: Preset, seeds: list[int] | None = None) -> PipelineConfig:
        """`fast`: tiny sizes and few steps (seconds; CI checks the artifacts, not the outcome).
        `default`: one seed and the four arms of the claims, sized to run in minutes on 2 CPU cores.
        `full`: the default sizes, every arm, three seeds (the claims' tests across seeds)."""
        if preset == "fast":
            cfg = cls(
                preset="fast",
                train_problems=300,
                test_problems=24,
                teacher=ModelSize(hidden=32, layers=1),
                teacher_steps=30,
                student=ModelSize(hidden=16, layers=1),
                sft_examples=200,
                sft_steps=20,
                opd_steps=4,
                opd_batch_size=8,
                eval_every=2,
                kl_samples=8,
                grad_samples=8,
                max_new_tokens=40,
                fit_batch_size=32,
                arms=list(ALL_ARMS),
            )
        elif preset == "full":
            cfg = cls(preset="full", seeds=[0, 1, 2], arms=list(ALL_ARMS))
        else:
            # Fewer evaluation points and KL samples than `full`, to stay near 10 minutes on 2 idle cores.
            cfg = cls(eval_every=100, kl_samples=200)
        if seeds is not None:
            cfg.seeds = seeds
        return cfg
