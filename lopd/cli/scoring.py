"""`lopd precompute`, `finalize`, `verify` and `fingerprint`: scoring rollouts with a teacher, once.

Each command is its settings model (`PrecomputeConfig`, `VerifyConfig`) behind `settings_command`:
flags, help, defaults and `LOPD_*` variables come from the model's fields, the teacher backend's
from its options class. Heavy modules are imported when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lopd.server.precompute import PrecomputeConfig
from lopd.server.verify import VerifyConfig

from .params import cli_errors, fail, settings_command


def quiet_transformers() -> None:
    """transformers draws a bar for every weight load; ours are the ones that mean progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _precompute(cfg: PrecomputeConfig) -> None:
    """Score rollouts with a teacher, once, into an immutable dataset (resumable; split it over --num-workers)."""
    from lopd.server.precompute import run_precompute

    quiet_transformers()
    result = run_precompute(cfg)
    for notice in result.notices:
        typer.secho(f"note: {notice}", fg=typer.colors.YELLOW, err=True)
    if result.manifest is not None:
        m = result.manifest
        verb = "published" if result.status == "published" else "already published (nothing to do)"
        typer.echo(
            f"{verb}: {m.name} v{m.version}: {m.num_samples} samples, {m.num_response_tokens} response tokens, "
            f"{len(m.files)} parts, {m.provenance.consistency.verdict}"
        )
    else:
        typer.echo(
            f"worker {cfg.worker_index + 1}/{cfg.num_workers} done ({result.parts_scored} parts scored); waiting "
            f"for {len(result.parts_missing)} parts from other workers. The last worker to finish publishes, "
            "or run `lopd finalize`."
        )


def _verify(cfg: VerifyConfig, *, as_json: bool = False) -> None:
    """Re-score a random sample with its teacher (per route, multi-teacher); exit 1 if it differs beyond tolerance."""
    from lopd.server.verify import verify_dataset

    quiet_transformers()
    report = verify_dataset(cfg)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        typer.echo(report.summary())
        if not report.fingerprint_matches:
            typer.echo(
                f"note: this teacher's fingerprint {report.teacher_fingerprint} is not the manifest's "
                f"{report.manifest_teacher_fingerprint}"
            )
    if not report.passed:
        raise typer.Exit(code=1)


precompute_command = settings_command(PrecomputeConfig, _precompute)
verify_command = settings_command(VerifyConfig, _verify, json_flag=True)


def finalize_command(
    store: Annotated[str, typer.Argument(help="Store: a directory or s3://BUCKET/PREFIX.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
) -> None:
    """Publish finished runs of a dataset whose workers did not publish (e.g. --no-publish)."""
    from lopd.storage.layout import check_store_path
    from lopd.storage.publish import finalize

    with cli_errors():
        outcomes = finalize(check_store_path(store), dataset)
    for line in outcomes:
        typer.echo(line)


def fingerprint_command(
    model_dir: Annotated[Path, typer.Argument(help="Model directory.")],
    tokenizer: Annotated[bool, typer.Option("--tokenizer", help="Fingerprint the tokenizer instead.")] = False,
) -> None:
    """Print a model's fingerprint (config + every weight tensor), usable wherever a model is asked for."""
    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint

    with cli_errors():
        typer.echo(tokenizer_fingerprint(str(model_dir)) if tokenizer else model_fingerprint(model_dir))


__all__ = ["fail", "finalize_command", "fingerprint_command", "precompute_command", "verify_command"]
