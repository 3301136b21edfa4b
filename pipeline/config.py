"""The pipeline's settings: one model, three presets (`fast` for CI, `default`, `full`).

Everything a run depends on is here and is written into the results JSON, so a table can be
traced back to the exact settings that produced it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Preset = Literal["fast", "default", "full"]


class ModelSize(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(gt=0)
    layers: int = Field(gt=0)


class PipelineConfig(BaseModel):
    """Sizes, steps and seeds of one pipeline run."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset = "default"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    digits: int = Field(3, ge=1, le=6, description="operand digits of the addition problems")
    train_problems: int = Field(4000, gt=0, description="prompts for teachers, SFT data and rollouts")
    test_problems: int = Field(500, gt=0, description="held-out problems for evaluation")
    teacher: ModelSize = ModelSize(hidden=128, layers=3)
    teacher_steps: int = Field(800, gt=0)
    student: ModelSize = ModelSize(hidden=64, layers=2)
    sft_examples: int = Field(3000, gt=0, description="teacher-A samples the student is fine-tuned on")
    sft_steps: int = Field(550, gt=0)
    rollouts: int = Field(4096, gt=0, description="student samples scored once for Lightning OPD")
    opd_steps: int = Field(300, gt=0, description="optimizer steps of each OPD run")
    opd_batch_size: int = Field(128, gt=0)
    opd_lr: float = Field(5e-5, gt=0)
    eval_every: int = Field(50, gt=0)
    kl_samples: int = Field(300, gt=0, description="held-out prompts sampled for the reverse KL")
    max_new_tokens: int = Field(48, gt=0)
    fit_batch_size: int = Field(64, gt=0)
    fit_lr: float = Field(3e-3, gt=0)

    @classmethod
    def preset_config(cls, preset: Preset, seeds: list[int] | None = None) -> PipelineConfig:
        """`fast`: tiny sizes and few steps (seconds; CI checks the artifacts, not the outcome).
        `default`: one seed, sized to show the effects in minutes on 2 CPU cores.
        `full`: the default sizes over 3 seeds, for means and spreads."""
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
                rollouts=48,
                opd_steps=4,
                opd_batch_size=8,
                eval_every=2,
                kl_samples=8,
                max_new_tokens=40,
                fit_batch_size=32,
            )
        elif preset == "full":
            cfg = cls(preset="full", seeds=[0, 1, 2])
        else:
            cfg = cls()
        if seeds is not None:
            cfg.seeds = seeds
        return cfg
