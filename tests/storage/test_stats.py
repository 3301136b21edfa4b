"""DuckDB stats against an independent numpy computation over the same samples."""

import math

import numpy as np
import pytest

from lopd.errors import NotFound
from lopd.storage import stats
from lopd.storage.staging import Staging
from tests.utils.factories import build_dataset, make_plan, random_samples, write_parts


def test_coverage_matches_numpy(tmp_path):
    skipped = [("bad-1", "empty response"), ("bad-2", "token id 5000 outside the vocabulary (size 1000)"),
               ("bad-3", "token id 7000 outside the vocabulary (size 1000)")]  # fmt: skip
    _, s = build_dataset(tmp_path, "ds", n=120, per_part=32, skipped=skipped)
    cov = stats.coverage(tmp_path, "ds")
    lengths = np.array([len(r) for r in s["responses"]])
    assert (cov.input_records, cov.scored, cov.skipped) == (123, 120, 3)
    assert cov.skipped_by_reason == {"empty response": 1, "token id N outside the vocabulary (size N)": 2}
    assert cov.num_response_tokens == lengths.sum()
    assert cov.response_length.min == lengths.min() and cov.response_length.max == lengths.max()
    assert cov.response_length.quantiles["p50"] == pytest.approx(np.quantile(lengths, 0.5))
    assert cov.shards == 4 and cov.bytes > 0 and cov.in_progress == []


def test_consistency_matches_numpy(tmp_path):
    _, s = build_dataset(tmp_path, "ds", n=90)
    con = stats.consistency(tmp_path, "ds")
    t = np.concatenate(s["teacher"]).astype(np.float64)
    assert con.verdict == "consistent" and con.teacher_consistent
    assert con.teacher_logprobs.count == t.size
    assert con.teacher_logprobs.mean == pytest.approx(t.mean(), rel=1e-6)
    assert con.share_below_log_1e_4 == pytest.approx(np.mean(t < math.log(1e-4)))
    assert sum(b.count for b in con.teacher_logprob_histogram) == t.size
    pairs = [(r, te) for r, te in zip(s["rollout"], s["teacher"]) if r is not None]
    r = np.concatenate([p[0] for p in pairs]).astype(np.float64)
    te = np.concatenate([p[1] for p in pairs]).astype(np.float64)
    assert con.rollout_vs_teacher.tokens == r.size
    assert con.rollout_vs_teacher.kl_rollout_teacher_estimate == pytest.approx(r.mean() - te.mean(), rel=1e-5)


def test_live_progress_of_an_unpublished_run(tmp_path):
    samples = random_samples(50)
    plan = make_plan(samples, run_key="5" * 64, dataset="live", per_part=10)
    staging = Staging(tmp_path, "live", plan.run_key)
    staging.open(plan)
    write_parts(staging, plan, samples, only={0, 2})
    cov = stats.coverage(tmp_path, "live")
    assert cov.version is None
    assert [(p.parts_done, p.parts_total, p.samples_done) for p in cov.in_progress] == [(2, 5, 20)]


def test_unknown_dataset(tmp_path):
    build_dataset(tmp_path, "ds", n=5)
    with pytest.raises(NotFound):
        stats.coverage(tmp_path, "other")
