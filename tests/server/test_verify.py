"""`lopd verify` confirms the teacher that scored a store, and catches one that did not."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.verify import VerifyConfig, verify_dataset
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
