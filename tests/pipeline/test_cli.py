"""Each stage is a CLI step with files in and out, so a user can stop anywhere and bring their own piece."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lopd.cli import app
from lopd.fingerprint import model_fingerprint
from lopd.storage.reader import Store

runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_stages_chain_through_files_into_precompute(tmp_path: Path):
    tiny = ["--hidden", "16", "--layers", "1", "--steps", "5"]
    teacher, data, student = tmp_path / "teacher", tmp_path / "sft.jsonl", tmp_path / "student"
    rollouts = tmp_path / "rollouts.jsonl"
    _ok("pipeline", "train-teacher", str(teacher), "--style", "B", "--problems", "64", *tiny)
    _ok("pipeline", "sft-data", str(teacher), str(data), "--problems", "32", "--max-new-tokens", "12")
    provenance = json.loads((tmp_path / "sft_provenance.json").read_text())
    assert provenance["teacher_fingerprint"] == model_fingerprint(teacher)
    assert len(data.read_text().splitlines()) == 32
    _ok("pipeline", "sft", str(data), str(student), *tiny)
    assert json.loads((student / "sft_provenance.json").read_text()) == provenance
    _ok("pipeline", "rollouts", str(student), str(rollouts), "--problems", "16", "--max-new-tokens", "12")
    first = json.loads(rollouts.read_text().splitlines()[0])
    assert len(first["rollout_logprobs"]) == len(first["response_ids"])

    # The product's own command scores them; the SFT-data teacher comes from the student's provenance.
    store = tmp_path / "store"
    _ok("precompute", str(rollouts), "--teacher", str(teacher), "--sft-teacher", provenance["teacher_fingerprint"],
        "--store", str(store), "--dataset", "mine", "--rollout-tokenizer", str(student), "--no-progress")  # fmt: skip
    manifest = Store(store).open("mine").manifest
    assert manifest.num_samples == 16 and manifest.provenance.consistency.verdict == "consistent"

    out = _ok("pipeline", "evaluate", str(student), str(teacher), str(student), "--problems", "8", "--kl-samples", "4",
              "--max-new-tokens", "12")  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"accuracy", "reverse_kl", "kl_to_sft", "sampled_accuracy"} and 0 <= result["accuracy"] <= 1
    assert abs(result["kl_to_sft"]) < 1e-5  # the model against itself (sampling and scoring round differently)


def test_train_teacher_rejects_an_unknown_style(tmp_path: Path):
    result = runner.invoke(app, ["pipeline", "train-teacher", str(tmp_path / "t"), "--style", "C"])
    assert result.exit_code != 0 and "A or B" in result.output


def test_tune_refuses_bad_numbers(tmp_path: Path):
    result = runner.invoke(app, ["pipeline", "tune", str(tmp_path), "--lrs", "1e-5,fast"])
    assert result.exit_code != 0 and "comma-separated numbers" in result.output


def test_report_needs_a_run_directory(tmp_path: Path):
    result = runner.invoke(app, ["pipeline", "report", str(tmp_path)])
    assert result.exit_code != 0 and "results.json" in result.output
