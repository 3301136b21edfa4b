"""`lopd demo` (the paper's pipeline end to end on CPU) and `lopd tiny-model` (a model to try things on)."""

from __future__ import annotations

from enum import Enum
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated

import typer

from .params import cli_errors, fail
from .scoring import quiet_transformers


class Preset(str, Enum):
    fast = "fast"
    default = "default"
    full = "full"


def demo_command(
    run_dir: Annotated[
        Path, typer.Option(help="Working directory: models, data, the store and the results (a re-run starts afresh).")
    ] = Path("demo-run"),
    preset: Annotated[
        Preset, typer.Option(help="fast: seconds, tiny (CI); default: one seed, minutes; full: three seeds.")
    ] = Preset.default,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds (overrides the preset's).")] = None,
) -> None:
    """The paper's pipeline on CPU: teachers, SFT, rollouts, precompute, serve, Lightning vs online OPD, results."""
    seed_list = None
    if seeds is not None:
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise typer.BadParameter(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    # The plot comes last: a missing matplotlib must not cost the whole run.
    missing = [m for m in ("torch", "transformers", "fastapi", "uvicorn", "matplotlib") if find_spec(m) is None]
    if missing:
        fail(f"`lopd demo` needs {', '.join(missing)} (not installed): pip install 'lightning-opd[demo]'")
    with cli_errors(extra="demo"):
        from lopd.pipeline.config import PipelineConfig
        from lopd.pipeline.run import run_pipeline

        quiet_transformers()
        cfg = PipelineConfig.preset_config(preset.value, seed_list)
        run_pipeline(cfg, run_dir, echo=typer.echo)


def tiny_model_command(
    out_dir: Annotated[Path, typer.Argument(help="Where to save the model and its tokenizer.")],
    arch: Annotated[str, typer.Option(help="llama, qwen2 or mistral.")] = "llama",
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 2,
) -> None:
    """Build a tiny random causal LM with a char-level tokenizer (for trying things out offline)."""
    from lopd.testing.tiny_models import build_tiny_model

    with cli_errors(extra="teacher"):
        quiet_transformers()
        try:
            # Vocabulary = tokenizer (no padding rows): whatever samples from it produces ids precompute accepts.
            path = build_tiny_model(out_dir, arch, seed=seed, hidden=hidden, layers=layers, pad_vocab=False)
        except ValueError as e:
            fail(e)
    typer.echo(str(path))
