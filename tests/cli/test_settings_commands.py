"""Commands are derived from settings models: a backend option is one field in one file.

The test plays the diff that adds an option to a backend (docs/architecture.md): a subclass with
one new field, registered with one line, gets its flag, help, default, `LOPD_*` variable and
validation, and is refused with every other backend, without touching the CLI or the jobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import typer
from pydantic import Field
from typer.testing import CliRunner

from lopd.cli.params import settings_command
from lopd.server.precompute import PrecomputeConfig
from lopd.server.teachers import BACKENDS
from lopd.server.teachers.transformers_backend import TransformersOptions


class WarmedOptions(TransformersOptions):
    """A made-up backend: transformers plus one new option."""

    name: ClassVar[str] = "warmed"
    summary: ClassVar[str] = "transformers after a few warm-up batches"

    warmup_batches: int = Field(2, ge=0, description="Batches scored and thrown away before the first part.")


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> tuple[typer.Typer, list[PrecomputeConfig]]:
    monkeypatch.setitem(BACKENDS, WarmedOptions.name, WarmedOptions)  # the one registration line
    seen: list[PrecomputeConfig] = []
    app = typer.Typer()
    app.command()(settings_command(PrecomputeConfig, seen.append))
    return app, seen


REQUIRED = ["rollouts.jsonl", "--teacher", "t", "--sft-teacher", "t", "--store", "s", "--dataset", "ds"]


def test_a_new_backend_option_gets_its_flag_help_default_env_and_checks(app, monkeypatch) -> None:
    cli, seen = app
    runner = CliRunner()
    help_text = runner.invoke(cli, ["--help"], env={"COLUMNS": "200"}).output
    assert "--warmup-batches" in help_text and "warmed: Batches scored and thrown away" in help_text
    assert "(default: 2)" in help_text

    ok = runner.invoke(cli, [*REQUIRED, "--backend", "warmed", "--warmup-batches", "5"])
    assert ok.exit_code == 0, ok.output
    assert isinstance(seen[-1].backend, WarmedOptions) and seen[-1].backend.warmup_batches == 5
    assert seen[-1].backend.precision() == "float32"  # everything else is transformers'

    from_env = runner.invoke(cli, [*REQUIRED, "--backend", "warmed"], env={"LOPD_WARMUP_BATCHES": "7"})
    assert from_env.exit_code == 0 and seen[-1].backend.warmup_batches == 7  # type: ignore[attr-defined]

    default = runner.invoke(cli, [*REQUIRED, "--backend", "warmed"])
    assert default.exit_code == 0 and seen[-1].backend.warmup_batches == 2  # type: ignore[attr-defined]

    elsewhere = runner.invoke(cli, [*REQUIRED, "--warmup-batches", "5"])
    assert elsewhere.exit_code == 2
    assert "--warmup-batches only applies to --backend warmed, not transformers" in elsewhere.output

    bad = runner.invoke(cli, [*REQUIRED, "--backend", "warmed", "--warmup-batches", "-1"])
    assert bad.exit_code == 2 and "--warmup-batches: Input should be greater than or equal to 0" in bad.output


def test_only_typed_values_override_the_environment_and_defaults(app) -> None:
    cli, seen = app
    runner = CliRunner()
    env = {"LOPD_SAMPLES_PER_PART": "7", "LOPD_BACKEND": "vllm"}
    out = runner.invoke(cli, [*REQUIRED, "--max-batch-size", "3"], env=env)
    assert out.exit_code == 0, out.output
    cfg = seen[-1]
    assert (cfg.samples_per_part, cfg.max_batch_size, cfg.backend.name) == (7, 3, "vllm")
    assert cfg.max_batch_tokens == PrecomputeConfig.model_fields["max_batch_tokens"].default
    assert cfg.rollouts == [Path("rollouts.jsonl")]
    typed = runner.invoke(cli, [*REQUIRED, "--samples-per-part", "9"], env=env)
    assert typed.exit_code == 0 and seen[-1].samples_per_part == 9


def test_missing_and_invalid_settings_name_the_flag(app) -> None:
    cli, _ = app
    runner = CliRunner()
    missing = runner.invoke(cli, ["r.jsonl", "--teacher", "t"])
    assert missing.exit_code == 2 and "--store is required; --dataset is required" in missing.output
    no_sft = runner.invoke(cli, ["r.jsonl", "--teacher", "t", "--store", "s", "--dataset", "d"])
    assert no_sft.exit_code == 2 and "--teacher and --sft-teacher are required (or --teacher-map FILE" in no_sft.output
    bad = runner.invoke(cli, [*REQUIRED, "--worker-index", "3", "--num-workers", "2"])
    assert bad.exit_code == 2 and "--worker-index must be in 0..1 (got 3)" in bad.output
    bad_name = runner.invoke(cli, [*REQUIRED[:-1], "../escape"])
    assert bad_name.exit_code == 2 and "error:" in bad_name.output
