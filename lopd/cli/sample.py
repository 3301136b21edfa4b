"""`lopd sample`: sample rollouts from the SFT student on prompts, in `lopd precompute`'s input format.

The command is its settings model (`SampleConfig`, `lopd.server.sample`) behind `settings_command`: flags,
help, defaults and `LOPD_*` variables come from the model's fields. Heavy modules are imported when it runs.
"""

from __future__ import annotations

import typer

from lopd.server.sample import SampleConfig

from .params import settings_command
from .scoring import quiet_transformers


def _sample(cfg: SampleConfig) -> None:
    """Sample rollouts from a policy on prompts: token ids as sampled, with their log-probs (resumable; split it
    over --num-workers). The output directory feeds `lopd precompute` unchanged."""
    from lopd.server.sample import run_sample

    quiet_transformers()
    result = run_sample(cfg)
    if result.parts_missing:
        typer.echo(
            f"worker {cfg.worker_index + 1}/{cfg.num_workers}: {result.parts_sampled} parts sampled "
            f"({result.samples_written} samples) into {result.out}; {len(result.parts_missing)} parts are left to "
            "other workers"
        )
    else:
        from lopd.server.sample import read_sampling

        plan = read_sampling(result.out) or {}
        typer.echo(
            f"sampled: {result.out} is complete ({result.parts_sampled} parts, {result.samples_written} samples "
            f"written now). Score it with: lopd precompute {result.out} --teacher TEACHER --sft-teacher TEACHER "
            f"--store STORE --dataset NAME (it reads the policy, tokenizer and "
            f"temperature {plan.get('temperature')} from {result.out}/_sampling.json)"
        )


sample_command = settings_command(SampleConfig, _sample, extra="teacher")
