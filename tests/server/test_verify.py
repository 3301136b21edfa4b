"""`lopd verify` confirms the teacher that scored a store, and catches one that did not."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from lopd.cli import app
from lopd.errors import InvalidInput
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.verify import VerifyConfig, verify_dataset
from lopd.storage.reader import Store
from tests.server.test_precompute import write_rollouts


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("verify")
    rollouts = write_rollouts(root / "r.jsonl", 24, seed=8)
    store = root / "store"
    cfg = dict(rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=store)
    run_precompute(PrecomputeConfig(dataset="t1", temperature=1.0, progress=False, **cfg))
    run_precompute(PrecomputeConfig(dataset="t07", temperature=0.7, progress=False, **cfg))
    return store


def test_the_scoring_teacher_reproduces_the_store(scored_store, tiny_llama_dir):
    report = verify_dataset(VerifyConfig(store=scored_store, dataset="t1", teacher=tiny_llama_dir, samples=10))
    assert report.passed and report.fingerprint_matches
    assert report.samples == 10 and report.tokens > 0 and report.max_abs_diff < 1e-4


def test_the_manifest_temperature_is_used(scored_store, tiny_llama_dir):
    report = verify_dataset(VerifyConfig(store=scored_store, dataset="t07", teacher=tiny_llama_dir, samples=10))
    assert report.passed and report.max_abs_diff < 1e-4


def test_another_teacher_is_caught(scored_store, tiny_llama_b_dir):
    report = verify_dataset(VerifyConfig(store=scored_store, dataset="t1", teacher=tiny_llama_b_dir, samples=10))
    assert not report.passed and not report.fingerprint_matches
    assert report.max_abs_diff > 0.1


def test_verify_command_exit_codes(scored_store, tiny_llama_dir, tiny_llama_b_dir):
    def run(teacher):
        cmd = [sys.executable, "-m", "lopd", "verify", str(scored_store), "--dataset", "t1", "--teacher", str(teacher)]
        return subprocess.run([*cmd, "--samples", "5", "--json"], capture_output=True, text=True, timeout=300)

    good, bad = run(tiny_llama_dir), run(tiny_llama_b_dir)
    assert good.returncode == 0 and json.loads(good.stdout)["passed"] is True, good.stderr
    assert bad.returncode == 1 and json.loads(bad.stdout)["fingerprint_matches"] is False


def test_identical_log_probs_name_no_worst_sample(scored_store, tiny_llama_dir, monkeypatch):
    """When every rescored log-prob equals the stored one, no sample is "worst" (argmax of zeros is not a finding)."""
    ds = Store(scored_store).open("t1")
    table = ds.read_all(["prompt_ids", "response_ids", "teacher_logprobs"])
    stored = {
        (tuple(p), tuple(r)): np.asarray(t, np.float32)
        for p, r, t in zip(*(table[c].to_pylist() for c in ("prompt_ids", "response_ids", "teacher_logprobs")))
    }

    class Exact:  # a teacher that reproduces the store bit for bit
        def score(self, prompts, responses):
            return [stored[(tuple(p.tolist()), tuple(r.tolist()))] for p, r in zip(prompts, responses)]

        def close(self):
            pass

    cfg = VerifyConfig(store=scored_store, dataset="t1", teacher=tiny_llama_dir, samples=10)
    monkeypatch.setattr(type(cfg.backend), "load", lambda self, teacher, job: Exact())
    same = verify_dataset(cfg)
    assert same.passed and same.max_abs_diff == 0 and same.worst_sample_id is None
    assert same.summary().endswith("(tolerance 0.001; all samples identical)") and "worst" not in same.summary()
    assert same.to_json()["worst_sample_id"] is None

    # The command prints that line.
    monkeypatch.setattr("lopd.server.verify.verify_dataset", lambda cfg: same)
    args = ["verify", str(scored_store), "--dataset", "t1", "--teacher", str(tiny_llama_dir)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert done.output.strip() == same.summary()


def test_a_differing_sample_is_named(scored_store, tiny_llama_b_dir):
    other = verify_dataset(VerifyConfig(store=scored_store, dataset="t1", teacher=tiny_llama_b_dir, samples=10))
    assert other.worst_sample_id is not None and other.summary().endswith(f"worst sample {other.worst_sample_id})")


def test_the_teacher_defaults_to_the_one_the_manifest_records(scored_store, tiny_llama_dir):
    report = verify_dataset(VerifyConfig(store=scored_store, dataset="t1", samples=5))
    assert report.passed and report.fingerprint_matches and report.max_abs_diff < 1e-4
    assert set(report.to_json()) == {
        "dataset",
        "version",
        "samples",
        "tokens",
        "max_abs_diff",
        "mean_abs_diff",
        "worst_sample_id",
        "tolerance",
        "teacher_fingerprint",
        "manifest_teacher_fingerprint",
        "fingerprint_matches",
        "passed",
    }  # fmt: skip  (one teacher: the report keeps its form, no routes)
    assert "\n" not in report.summary()
    with pytest.raises(InvalidInput, match="has one teacher: --teacher-map is for multi-teacher datasets"):
        verify_dataset(VerifyConfig(store=scored_store, dataset="t1", teacher_map=scored_store / "map.json"))


def test_a_recorded_teacher_that_moved_or_changed_is_refused(tmp_path, tiny_llama_dir, tiny_llama_b_dir):
    teacher = shutil.copytree(tiny_llama_dir, tmp_path / "teacher")
    cfg = dict(rollouts=[write_rollouts(tmp_path / "r.jsonl", 4, seed=3)], teacher=teacher, sft_teacher=str(teacher))
    run_precompute(PrecomputeConfig(store=tmp_path / "store", dataset="d", progress=False, **cfg))
    shutil.copy(tiny_llama_b_dir / "model.safetensors", teacher / "model.safetensors")  # other weights, same path
    with pytest.raises(InvalidInput, match=r"the teacher at .*teacher \(the manifest records it\) has fingerprint"):
        verify_dataset(VerifyConfig(store=tmp_path / "store", dataset="d"))
    shutil.rmtree(teacher)
    with pytest.raises(InvalidInput, match=r"which is not a model directory here; give the teacher with --teacher DIR"):
        verify_dataset(VerifyConfig(store=tmp_path / "store", dataset="d"))
