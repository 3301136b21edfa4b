"""The `lopd` command line as a user runs it: a real process, real exit codes and output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lopd.fingerprint import model_fingerprint
from tests.server.test_precompute import write_rollouts


def lopd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lopd", *args], capture_output=True, text=True, timeout=300)


def test_fingerprint_command_prints_the_model_fingerprint(tiny_llama_dir):
    out = lopd("fingerprint", str(tiny_llama_dir))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == model_fingerprint(tiny_llama_dir)


def test_fingerprint_of_a_non_model_fails_clearly(tmp_path):
    out = lopd("fingerprint", str(tmp_path))
    assert out.returncode == 2
    assert "no config.json" in out.stderr


@pytest.fixture(scope="module")
def published_store(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("cli")
    rollouts = write_rollouts(root / "r.jsonl", 20, seed=7, with_logprobs_every=2)
    store = root / "store"
    out = lopd(
        "precompute", str(rollouts), "--teacher", str(tiny_llama_dir),
        "--sft-teacher", model_fingerprint(tiny_llama_dir), "--store", str(store),
        "--dataset", "cli", "--samples-per-part", "8", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "published: cli v1: 20 samples" in out.stdout
    return store


def test_stats_json_reports_coverage_and_consistency(published_store):
    out = lopd("stats", str(published_store), "--dataset", "cli", "--json")
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert stats["coverage"]["scored"] == 20 and stats["coverage"]["shards"] == 3
    assert stats["consistency"]["verdict"] == "consistent"
    assert stats["consistency"]["rollout_vs_teacher"]["tokens"] > 0


def test_stats_text_and_unknown_dataset(published_store):
    out = lopd("stats", str(published_store), "--dataset", "cli")
    assert out.returncode == 0 and "verdict           CONSISTENT" in out.stdout
    out = lopd("stats", str(published_store), "--dataset", "nope")
    assert out.returncode == 2 and "no dataset 'nope'" in out.stderr


def test_stats_detects_a_corrupt_shard(tmp_path, published_store):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(published_store, store)
    shard = sorted((store / "cli" / "v1").glob("part-*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = lopd("stats", str(store), "--dataset", "cli")
    assert out.returncode == 2 and "does not match the manifest" in out.stderr


def test_precompute_refuses_a_teacher_mismatch_with_exit_code_2(tmp_path, tiny_llama_dir, tiny_llama_b_dir):
    rollouts = write_rollouts(tmp_path / "r.jsonl", 4)
    out = lopd(
        "precompute", str(rollouts), "--teacher", str(tiny_llama_b_dir), "--sft-teacher", str(tiny_llama_dir),
        "--store", str(tmp_path / "store"), "--dataset", "x", "--no-progress",
    )  # fmt: skip
    assert out.returncode == 2
    assert "teacher consistency" in out.stderr and "--allow-teacher-mismatch" in out.stderr
    assert not (tmp_path / "store").exists()


def test_sharded_workers_through_the_cli_and_finalize(tmp_path, tiny_llama_dir):
    rollouts = write_rollouts(tmp_path / "r.jsonl", 20, seed=2)
    common = [
        str(rollouts), "--teacher", str(tiny_llama_dir), "--sft-teacher", str(tiny_llama_dir),
        "--store", str(tmp_path / "store"), "--dataset", "sh", "--samples-per-part", "5", "--no-progress",
        "--num-workers", "2", "--no-publish",
    ]  # fmt: skip
    for k in ("0", "1"):
        out = lopd("precompute", *common, "--worker-index", k)
        assert out.returncode == 0 and "waiting for" in out.stdout, out.stderr
    out = lopd("finalize", str(tmp_path / "store"), "--dataset", "sh")
    assert out.returncode == 0 and "published: sh v1: 20 samples" in out.stdout, out.stderr


def test_precompute_with_a_server_backend_needs_its_url(tmp_path, tiny_llama_dir):
    rollouts = write_rollouts(tmp_path / "r.jsonl", 4)
    out = lopd(
        "precompute", str(rollouts), "--teacher", str(tiny_llama_dir), "--sft-teacher", str(tiny_llama_dir),
        "--store", str(tmp_path / "store"), "--dataset", "x", "--no-progress", "--backend", "sglang",
    )  # fmt: skip
    assert out.returncode == 2
    assert "--backend sglang needs --teacher-url: the address of the running server it scores through" in out.stderr
    assert not (tmp_path / "store").exists()
    out = lopd("verify", str(tmp_path / "store"), "--dataset", "x", "--teacher", str(tiny_llama_dir),
               "--teacher-url", "http://127.0.0.1:1")  # fmt: skip
    assert out.returncode == 2 and "--teacher-url only applies to --backend sglang or openai" in out.stderr
