"""The precompute job end to end on tiny real models: exactness, the consistency gate, bad records,
rollout-policy log-probs, sharded workers and resumption after crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lopd.errors import BadRecords, TeacherMismatch, TokenizerMismatch
from lopd.fingerprint import model_fingerprint
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers.base import DEFAULT_MAX_BATCH_SIZE
from lopd.storage import layout
from lopd.storage.reader import Store
from tests.utils.naive import naive_logprobs

VOCAB = 100  # the tiny tokenizer has 105 tokens; stay inside it


def write_rollouts(path: Path, n: int, seed: int = 0, *, with_logprobs_every: int = 0, long: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            p = int(rng.integers(1, 30 if not long else 200))
            r = int(rng.integers(1, 60 if not long else 300))
            rec: dict = {
                "id": f"r{i:04d}",
                "prompt_ids": rng.integers(3, VOCAB, p).tolist(),
                "response_ids": rng.integers(3, VOCAB, r).tolist(),
            }
            if with_logprobs_every and i % with_logprobs_every == 0:
                rec["rollout_logprobs"] = (-rng.gamma(1.0, 1.0, r)).astype(np.float32).tolist()
            f.write(json.dumps(rec) + "\n")
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _cfg(tmp_path: Path, rollouts: Path, teacher: Path, **kw) -> PrecomputeConfig:
    base = dict(
        rollouts=[rollouts],
        teacher=teacher,
        sft_teacher=str(teacher),
        store=tmp_path / "store",
        dataset="ds",
        samples_per_part=8,
        max_batch_tokens=512,
        progress=False,
    )
    base.update(kw)
    return PrecomputeConfig(**base)


@pytest.fixture(scope="module")
def rollouts_file(tmp_path_factory) -> Path:
    return write_rollouts(tmp_path_factory.mktemp("rollouts") / "r.jsonl", 30, seed=1, with_logprobs_every=4)


def test_consistent_run_stores_exact_teacher_logprobs(tmp_path, rollouts_file, tiny_llama_dir, llama):
    result = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir))
    assert result.status == "published"
    ds = Store(tmp_path / "store").open("ds")
    table = ds.read_all()
    records = _records(rollouts_file)
    assert table["sample_id"].to_pylist() == [r["id"] for r in records]  # dataset order == input order
    for i, rec in enumerate(records):
        assert table["prompt_ids"][i].as_py() == rec["prompt_ids"]
        assert table["response_ids"][i].as_py() == rec["response_ids"]
        got = np.asarray(table["teacher_logprobs"][i].values, dtype=np.float32)
        want = naive_logprobs(llama, rec["prompt_ids"], rec["response_ids"])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        rollout = table["rollout_logprobs"][i].as_py()
        if "rollout_logprobs" in rec:  # passed through exactly as given, in float32
            assert np.array(rollout, np.float32).tobytes() == np.array(rec["rollout_logprobs"], np.float32).tobytes()
        else:
            assert rollout is None
    m = ds.manifest
    prov = m.provenance
    assert prov.consistency.verdict == "consistent" and not prov.consistency.mismatch_allowed
    assert prov.teacher.fingerprint == prov.sft_teacher_fingerprint == model_fingerprint(tiny_llama_dir)
    assert prov.rollout_logprobs_source == "mixed" and prov.temperature == 1.0 and prov.dtype == "float32"
    assert prov.rollouts.records == 30 and m.coverage.skipped == 0
    assert len(m.files) == 4  # 30 samples in parts of 8


def test_vllm_request_outputs_precompute_like_the_equivalent_flat_file(tmp_path, rollouts_file, tiny_llama_dir):
    """vLLM `RequestOutput` dumps (3 sampled outputs per prompt, some with per-token logprobs dicts) give the
    same dataset as the flat records a conversion script would have written."""
    records = _records(rollouts_file)
    nested, flat = [], []
    for q in range(0, len(records), 3):
        prompt = records[q]["prompt_ids"]
        outputs = []
        for j, rec in enumerate(records[q : q + 3]):
            lps = rec.get("rollout_logprobs")
            logprobs = (
                None if lps is None else [{t: {"logprob": lp, "rank": 1}} for t, lp in zip(rec["response_ids"], lps)]
            )
            outputs.append({"index": j, "text": "", "token_ids": rec["response_ids"], "logprobs": logprobs})
            flat.append({"id": f"{q}/{j}", "prompt_ids": prompt, "response_ids": rec["response_ids"]})
            if lps is not None:
                flat[-1]["rollout_logprobs"] = lps
        nested.append({"request_id": str(q), "prompt": "", "prompt_token_ids": prompt, "outputs": outputs})
    for name, recs in (("nested", nested), ("flat", flat)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
        assert run_precompute(_cfg(tmp_path / name, path, tiny_llama_dir)).status == "published"
    got, want = (Store(tmp_path / name / "store").open("ds").read_all() for name in ("nested", "flat"))
    assert got["sample_id"].to_pylist() == [r["id"] for r in flat]
    for column in ("prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs"):
        assert got[column].to_pylist() == want[column].to_pylist(), column
    assert got["rollout_logprobs"].null_count == want["rollout_logprobs"].null_count < len(flat)


def test_rerun_is_a_no_op_and_sft_teacher_may_be_a_fingerprint(tmp_path, rollouts_file, tiny_llama_dir):
    first = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir))
    again = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, sft_teacher=model_fingerprint(tiny_llama_dir)))
    assert again.status == "already_published" and again.manifest.version == first.manifest.version
    assert Store(tmp_path / "store").versions("ds") == [1]


def test_teacher_mismatch_is_refused_and_nothing_is_written(tmp_path, rollouts_file, tiny_llama_dir, tiny_llama_b_dir):
    cfg = _cfg(tmp_path, rollouts_file, tiny_llama_b_dir, sft_teacher=str(tiny_llama_dir))
    with pytest.raises(TeacherMismatch, match="teacher consistency"):
        run_precompute(cfg)
    assert not (tmp_path / "store").exists()


def test_teacher_mismatch_allowed_is_marked_inconsistent(tmp_path, rollouts_file, tiny_llama_dir, tiny_llama_b_dir):
    cfg = _cfg(tmp_path, rollouts_file, tiny_llama_b_dir, sft_teacher=str(tiny_llama_dir), allow_teacher_mismatch=True)
    result = run_precompute(cfg)
    c = result.manifest.provenance.consistency
    assert (c.verdict, c.teacher_consistent, c.mismatch_allowed) == ("inconsistent", False, True)
    assert any("INCONSISTENT" in n for n in result.notices)


def test_tokenizer_mismatch_is_refused(tmp_path, rollouts_file, tiny_llama_dir):
    from lopd.testing import build_tokenizer

    other = build_tokenizer()
    other.add_tokens(["<extra>"])  # one more id than the teacher knows
    other.save_pretrained(str(tmp_path / "other-tok"))
    with pytest.raises(TokenizerMismatch, match="differs from the teacher's"):
        run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, rollout_tokenizer=str(tmp_path / "other-tok")))
    assert not (tmp_path / "store").exists()


def _bad_rollouts(tmp_path: Path) -> Path:
    path = write_rollouts(tmp_path / "bad.jsonl", 12, seed=3)
    with path.open("a") as f:
        f.write(json.dumps({"id": "empty", "prompt_ids": [5], "response_ids": []}) + "\n")
        f.write(json.dumps({"id": "oov", "prompt_ids": [5], "response_ids": [7, 100000]}) + "\n")
        f.write(json.dumps({"id": "r0001", "prompt_ids": [5], "response_ids": [7]}) + "\n")  # duplicate id
        f.write(json.dumps({"id": "long", "prompt_ids": [5] * 1000, "response_ids": [7] * 100}) + "\n")
        f.write("{not json\n")
    return path


def test_bad_records_stop_the_job_before_anything_is_written(tmp_path, tiny_llama_dir):
    with pytest.raises(BadRecords) as err:
        run_precompute(_cfg(tmp_path, _bad_rollouts(tmp_path), tiny_llama_dir))
    ids = {rid for rid, _ in err.value.problems}
    assert {"empty", "oov", "r0001", "long"} <= ids
    assert "nothing was written" in str(err.value)
    assert not (tmp_path / "store").exists()


def test_bad_records_skipped_are_reported_in_coverage(tmp_path, tiny_llama_dir):
    from lopd.storage import stats

    result = run_precompute(_cfg(tmp_path, _bad_rollouts(tmp_path), tiny_llama_dir, on_bad_record="skip"))
    m = result.manifest
    assert m.coverage.input_records == 17
    assert m.coverage.skipped == 5  # empty, oov, the second r0001, long, bad json
    assert m.num_samples == 12
    table = Store(tmp_path / "store").open("ds").read_all()
    ids = table["sample_id"].to_pylist()
    assert ids.count("r0001") == 1 and len(table["response_ids"][ids.index("r0001")].as_py()) > 1  # the first one
    assert sum(stats.coverage(tmp_path / "store", "ds").skipped_by_reason.values()) == 5
    skipped = dict(zip(*pq.read_table(tmp_path / "store" / "ds" / "v1" / "skipped.parquet").to_pydict().values()))
    assert skipped["r0001"] == "duplicate id: bad.jsonl:15 repeats the id of bad.jsonl:2 (kept)"


def test_rollout_policy_fills_missing_rollout_logprobs(tmp_path, rollouts_file, tiny_llama_dir, tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).eval()
    result = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, rollout_policy=tiny_qwen2_dir))
    prov = result.manifest.provenance
    assert prov.rollout_logprobs_source == "mixed"
    assert prov.rollout_policy.fingerprint == model_fingerprint(tiny_qwen2_dir)
    table = Store(tmp_path / "store").open("ds").read_all()
    for i, rec in enumerate(_records(rollouts_file)):
        got = np.array(table["rollout_logprobs"][i].as_py(), np.float32)
        if "rollout_logprobs" in rec:
            want = np.array(rec["rollout_logprobs"], np.float32)
        else:
            want = naive_logprobs(policy, rec["prompt_ids"], rec["response_ids"])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_many_workers_build_the_same_dataset_as_one_worker(tmp_path, rollouts_file, tiny_llama_dir):
    single = run_precompute(_cfg(tmp_path / "one", rollouts_file, tiny_llama_dir)).manifest
    results = [
        run_precompute(_cfg(tmp_path / "many", rollouts_file, tiny_llama_dir, num_workers=3, worker_index=k))
        for k in (2, 0, 1)
    ]
    assert [r.status for r in results] == ["waiting_for_workers", "waiting_for_workers", "published"]
    assert results[0].parts_missing == [0, 1, 3]  # worker 2 of 3 owns part 2 of parts 0..3
    sharded = results[-1].manifest
    assert sharded.content_hash == single.content_hash
    assert [f.sha256 for f in sharded.files] == [f.sha256 for f in single.files]


def test_resume_same_command_is_byte_identical_other_batch_budget_is_recorded(tmp_path, rollouts_file, tiny_llama_dir):
    """Bug 2: the same command resumes to the same bytes; other batch budgets resume too, recorded per part."""
    from lopd.stats_text import render_text
    from lopd.storage import stats

    reference = run_precompute(_cfg(tmp_path / "ref", rollouts_file, tiny_llama_dir)).manifest
    half = dict(num_workers=2, worker_index=0, publish=False)  # parts 0 and 2, then "killed"
    run_precompute(_cfg(tmp_path / "same", rollouts_file, tiny_llama_dir, **half))
    same = run_precompute(_cfg(tmp_path / "same", rollouts_file, tiny_llama_dir))
    assert same.parts_scored == 2
    assert [f.sha256 for f in same.manifest.files] == [f.sha256 for f in reference.files]
    assert same.manifest.content_hash == reference.content_hash

    first = run_precompute(_cfg(tmp_path / "other", rollouts_file, tiny_llama_dir, **half))
    assert first.status == "waiting_for_workers"
    final = run_precompute(_cfg(tmp_path / "other", rollouts_file, tiny_llama_dir, max_batch_tokens=64))
    assert final.status == "published" and final.parts_scored == 2
    assert final.manifest.num_samples == 30 and final.manifest.run_key == reference.run_key
    ds = Store(tmp_path / "other" / "store").open("ds")
    big, small = ({"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "max_batch_tokens": t} for t in (512, 64))
    assert ds.scored_with() == [big, small, big, small]
    got = ds.read_all()["teacher_logprobs"].to_pylist()
    want = Store(tmp_path / "ref" / "store").open("ds").read_all()["teacher_logprobs"].to_pylist()
    diff = max(float(np.max(np.abs(np.subtract(g, w)))) for g, w in zip(got, want))
    assert diff < 1e-4  # parts scored with another budget may differ, within float rounding
    cov = stats.coverage(tmp_path / "other" / "store", "ds")
    assert [(g.settings, g.parts) for g in cov.scored_with] == [(big, [0, 2]), (small, [1, 3])]
    text = render_text(cov, None)
    assert f"scored with       max_batch_size={DEFAULT_MAX_BATCH_SIZE} max_batch_tokens=64 (parts 1, 3)" in text
    assert "may differ within float rounding" in text


def test_equal_content_equal_hash_whatever_the_input_file(tmp_path, rollouts_file, tiny_llama_dir):
    """Bug 8: the same records from ids.jsonl and ids.jsonl.gz are other runs, but the same content."""
    import gzip

    packed = tmp_path / "ids.jsonl.gz"
    packed.write_bytes(gzip.compress(rollouts_file.read_bytes()))
    plain = run_precompute(_cfg(tmp_path / "plain", rollouts_file, tiny_llama_dir)).manifest
    gz = run_precompute(_cfg(tmp_path / "gz", packed, tiny_llama_dir)).manifest
    assert plain.run_key != gz.run_key and plain.files[0].sha256 != gz.files[0].sha256  # footers name the run
    tables = [Store(tmp_path / d / "store").open("ds").read_all() for d in ("plain", "gz")]
    assert tables[0].equals(tables[1])
    assert plain.content_hash == gz.content_hash


# ---- crashes: a real process, killed, then re-run with the same arguments ----


def _cli(tmp_path: Path, rollouts: Path, teacher: Path, store: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lopd", "precompute", str(rollouts),
        "--teacher", str(teacher), "--sft-teacher", str(teacher), "--store", str(store), "--dataset", "ds",
        "--samples-per-part", "8", "--max-batch-tokens", "512", "--no-progress", *extra,
    ]  # fmt: skip


def _shard_hashes(store: Path) -> list[str]:
    return [f.sha256 for f in Store(store).open("ds").manifest.files]


@pytest.fixture(scope="module")
def reference_hashes(tmp_path_factory, rollouts_file, tiny_llama_dir) -> list[str]:
    store = tmp_path_factory.mktemp("ref") / "store"
    subprocess.run(_cli(store.parent, rollouts_file, tiny_llama_dir, store), check=True, capture_output=True)
    return _shard_hashes(store)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after_part:1", "during_part_write:2", "during_part_write:0"])
def test_crash_then_rerun_gives_the_uninterrupted_dataset(
    tmp_path, rollouts_file, tiny_llama_dir, reference_hashes, fault
):
    store = tmp_path / "store"
    cmd = _cli(tmp_path, rollouts_file, tiny_llama_dir, store)
    crashed = subprocess.run(cmd, env={**os.environ, "LOPD_FAULT": fault}, capture_output=True, text=True)
    assert crashed.returncode == 137, crashed.stderr
    assert not (layout.dataset_dir(store, "ds") / "v1").exists()  # nothing published yet
    subprocess.run(cmd, check=True, capture_output=True)
    assert _shard_hashes(store) == reference_hashes
    assert not (layout.staging_root(store, "ds")).exists() or not any(layout.staging_root(store, "ds").iterdir())


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_loses_and_duplicates_nothing(tmp_path, tiny_llama_dir):
    rollouts = write_rollouts(tmp_path / "big.jsonl", 160, seed=5, long=True)
    store_ref, store = tmp_path / "ref", tmp_path / "store"
    subprocess.run(_cli(tmp_path, rollouts, tiny_llama_dir, store_ref), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(tmp_path, rollouts, tiny_llama_dir, store), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    staging = layout.staging_root(store, "ds")
    while time.monotonic() < deadline:
        parts = list(staging.glob("*/part-*.parquet")) if staging.exists() else []
        if len(parts) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(staging.glob("*/part-*.parquet")))
    assert 3 <= done_before < 20  # killed mid-run, not after it
    subprocess.run(_cli(tmp_path, rollouts, tiny_llama_dir, store), check=True, capture_output=True)
    got = Store(store).open("ds").read_all()
    assert got["sample_id"].to_pylist() == [f"r{i:04d}" for i in range(160)]
    assert _shard_hashes(store) == _shard_hashes(store_ref)
