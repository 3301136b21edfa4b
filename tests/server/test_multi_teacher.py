"""Multi-teacher datasets (`lopd precompute --teacher-map`): routing, refusals, per-teacher stats, filter, resume,
`lopd verify` route by route."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from lopd.cli import app
from lopd.client.consistency import check_dataset_for_training
from lopd.client.types import DatasetInfo
from lopd.errors import InvalidInput, TeacherMismatch
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers.transformers_backend import TransformersTeacher
from lopd.server.verify import VerifyConfig, verify_dataset
from lopd.stats_text import render_text
from lopd.storage import layout
from lopd.storage.reader import Store
from lopd.storage.stats import consistency, coverage
from tests.server.test_precompute import VOCAB, _shard_hashes

# Interleaved domains, sizes not multiples of the part size: parts span routes.
SOURCES = ["math", "code", "math", "math", "code", "math", "code", "math", "math", "code", "math", "math", "code"]


def _rollouts(path: Path, sources=SOURCES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i, src in enumerate(sources):
            rec = {
                "id": f"r{i:03d}",
                "prompt_ids": rng.integers(3, VOCAB, int(rng.integers(1, 20))).tolist(),
                "response_ids": rng.integers(3, VOCAB, int(rng.integers(1, 30))).tolist(),
            }
            if src is not None:
                rec["data_source"] = src
            f.write(json.dumps(rec) + "\n")
    return path


def _map(path: Path, routes: dict) -> Path:
    path.write_text(json.dumps({k: {"teacher": str(t), "sft_teacher": str(s)} for k, (t, s) in routes.items()}))
    return path


@pytest.fixture(scope="module")
def teachers(tiny_llama_dir, tiny_qwen2_dir):
    return {"math": tiny_llama_dir, "code": tiny_qwen2_dir}


def _cfg(tmp_path: Path, rollouts: Path, teacher_map: Path, **kw) -> PrecomputeConfig:
    base = dict(
        rollouts=[rollouts], teacher_map=teacher_map, store=tmp_path / "store", dataset="ds", samples_per_part=3,
        max_batch_tokens=512, progress=False,
    )  # fmt: skip
    return PrecomputeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory, teachers):
    root = tmp_path_factory.mktemp("multi")
    rollouts = _rollouts(root / "r.jsonl")
    teacher_map = _map(root / "map.json", {k: (t, t) for k, t in teachers.items()})
    result = run_precompute(_cfg(root, rollouts, teacher_map, top_k=3))
    return root, rollouts, teacher_map, result


def test_each_record_is_scored_by_its_routed_teacher(built, teachers) -> None:
    root, rollouts, _, result = built
    assert result.status == "published"
    ds = Store(root / "store").open("ds")
    prov = ds.manifest.provenance
    assert prov.teacher_key == "data_source" and [r.key for r in prov.routes] == ["code", "math"]
    assert [(r.start, r.num_samples) for r in prov.routes] == [(0, 5), (5, 8)]  # ordered by route, sorted keys
    assert prov.consistency.verdict == "consistent" and all(r.consistency.teacher_consistent for r in prov.routes)
    table = ds.read_all()
    records = {json.loads(line)["id"]: json.loads(line) for line in rollouts.read_text().splitlines()}
    ids = table["sample_id"].to_pylist()
    for route in prov.routes:
        rows = ids[route.start : route.start + route.num_samples]
        assert all(records[i]["data_source"] == route.key for i in rows)
        assert rows == sorted(rows)  # input order within a route
        teacher = TransformersTeacher(teachers[route.key], top_k=3)
        got = teacher.score_topk([records[i]["prompt_ids"] for i in rows], [records[i]["response_ids"] for i in rows])
        teacher.close()
        for k, g in enumerate(got):
            stored = table["teacher_logprobs"][route.start + k].as_py()
            np.testing.assert_allclose(stored, g.logprobs, atol=1e-5, rtol=0)
            assert table["teacher_topk_ids"][route.start + k].as_py() == g.ids.ravel().tolist()
        assert route.teacher.fingerprint != prov.routes[0 if route.key == "math" else 1].teacher.fingerprint


def test_per_teacher_stats_and_the_training_gate(built) -> None:
    root, *_ = built
    stats = consistency(root / "store", "ds")
    per_teacher = [(t.key, t.samples, t.verdict) for t in stats.per_teacher]
    assert per_teacher == [("code", 5, "consistent"), ("math", 8, "consistent")]
    table = Store(root / "store").open("ds").read_all()
    lps = table["teacher_logprobs"].to_pylist()
    math_tokens = [x for row in lps[5:] for x in row]
    assert stats.per_teacher[1].tokens == len(math_tokens)
    assert stats.per_teacher[1].mean_teacher_logprob == pytest.approx(np.mean(math_tokens), abs=1e-5)
    assert sum(t.tokens for t in stats.per_teacher) == stats.teacher_logprobs.count
    manifest = json.loads((Store(root / "store").open("ds").path / layout.MANIFEST).read_text())
    info = DatasetInfo.from_json(manifest)
    assert check_dataset_for_training(info) == []
    assert info.teacher_indices(["math"]).tolist() == list(range(5, 13))
    with pytest.raises(ValueError, match="has no routed teacher 'chem' .its teachers: 'code', 'math'"):
        info.teacher_indices(["chem"])


def test_an_inconsistent_routed_teacher_is_refused_at_precompute_and_at_training(tmp_path, teachers) -> None:
    rollouts = _rollouts(tmp_path / "r.jsonl")
    bad = _map(
        tmp_path / "map.json",
        {"math": (teachers["math"], teachers["math"]), "code": (teachers["code"], teachers["math"])},
    )
    with pytest.raises(TeacherMismatch, match="routed teacher 'code': refusing to score with teacher"):
        run_precompute(_cfg(tmp_path, rollouts, bad))
    assert not (tmp_path / "store").exists()
    result = run_precompute(_cfg(tmp_path, rollouts, bad, allow_teacher_mismatch=True))
    prov = result.manifest.provenance
    assert prov.consistency.verdict == "inconsistent"
    assert {r.key: r.consistency.verdict for r in prov.routes} == {"code": "inconsistent", "math": "consistent"}
    info = DatasetInfo.from_json(json.loads(result.manifest.model_dump_json()))
    with pytest.raises(TeacherMismatch, match=r"routed teacher 'code' .* is not the model that generated"):
        check_dataset_for_training(info)
    stats = consistency(tmp_path / "store", "ds")
    assert [(t.key, t.verdict) for t in stats.per_teacher] == [("code", "inconsistent"), ("math", "consistent")]
    assert "routed teacher(s) 'code'" in stats.explanation


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (
            ["math", "chem", "code"],
            r"record 'r001' has data_source 'chem', which --teacher-map .* does not route "
            r"\(it routes 'code', 'math'\)\. Add \"chem\"",
        ),
        (["math", None], r"record 'r001' has no 'data_source' field"),
    ],
    ids=["unknown-key", "missing-field"],
)
def test_a_record_whose_key_has_no_teacher_is_refused(tmp_path, teachers, sources, message) -> None:
    rollouts = _rollouts(tmp_path / "r.jsonl", sources)
    teacher_map = _map(tmp_path / "map.json", {k: (t, t) for k, t in teachers.items()})
    with pytest.raises(InvalidInput, match=message):
        run_precompute(_cfg(tmp_path, rollouts, teacher_map))
    assert not layout.dataset_dir(tmp_path / "store", "ds").exists() or not any(
        layout.dataset_dir(tmp_path / "store", "ds").glob("v*")
    )


def test_settings_refusals(tmp_path, teachers, tiny_llama_dir) -> None:
    from pydantic import ValidationError

    teacher_map = _map(tmp_path / "map.json", {"math": (tiny_llama_dir, tiny_llama_dir)})
    with pytest.raises(ValidationError, match="leave out --teacher and --sft-teacher"):
        _cfg(tmp_path, tmp_path, teacher_map, teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir))
    with pytest.raises(ValidationError, match="--teacher and --sft-teacher are required .or --teacher-map"):
        PrecomputeConfig(rollouts=[tmp_path], store=tmp_path / "s", dataset="d")
    # A server backend has one --teacher-url: it would score every route with the same model, silently.
    with pytest.raises(ValidationError, match="every route would be scored by the same served model"):
        _cfg(tmp_path, tmp_path, teacher_map, backend={"name": "openai", "teacher_url": "http://127.0.0.1:1"})
    (tmp_path / "bad.json").write_text('{"math": {"teacher": "/x"}}')
    with pytest.raises(InvalidInput, match="the entry for 'math' needs a teacher and an sft_teacher .sft_teacher"):
        run_precompute(_cfg(tmp_path, _rollouts(tmp_path / "r.jsonl"), tmp_path / "bad.json"))
    # YAML works the same as JSON.
    (tmp_path / "map.yaml").write_text(f"math:\n  teacher: {tiny_llama_dir}\n  sft_teacher: {tiny_llama_dir}\n")
    result = run_precompute(_cfg(tmp_path, _rollouts(tmp_path / "y.jsonl", ["math"] * 4), tmp_path / "map.yaml"))
    assert [r.key for r in result.manifest.provenance.routes] == ["math"]


def test_workers_and_a_killed_run_give_the_uninterrupted_store(tmp_path, built) -> None:
    root, rollouts, teacher_map, reference = built
    args = [
        sys.executable, "-m", "lopd", "precompute", str(rollouts), "--teacher-map", str(teacher_map),
        "--store", str(tmp_path / "store"), "--dataset", "ds", "--samples-per-part", "3", "--max-batch-tokens",
        "512", "--top-k", "3", "--no-progress",
    ]  # fmt: skip
    crashed = subprocess.run(args, env={**os.environ, "LOPD_FAULT": "during_part_write:2"}, capture_output=True)
    assert crashed.returncode == 137, crashed.stderr[-2000:]
    # The rest by two workers (the second publishes), then compare with the uninterrupted run.
    for worker in ("0", "1"):
        out = subprocess.run([*args, "--num-workers", "2", "--worker-index", worker], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    assert _shard_hashes(tmp_path / "store") == _shard_hashes(root / "store")
    got = Store(tmp_path / "store").open("ds").manifest
    assert got.content_hash == reference.manifest.content_hash and got.run_key == reference.manifest.run_key
    assert got.provenance.routes == reference.manifest.provenance.routes


def test_served_consistency_per_teacher_and_the_loader_filter(built) -> None:
    import httpx

    from lopd.client.http import StoreClient
    from lopd.client.loader import OPDLoader
    from tests.client.conftest import _real_server

    root, *_ = built
    with _real_server(root / "store") as url:
        body = httpx.get(f"{url}/v1/datasets/ds/consistency").json()
        assert [(t["key"], t["samples"], t["verdict"]) for t in body["per_teacher"]] == [
            ("code", 5, "consistent"),
            ("math", 8, "consistent"),
        ]
        with StoreClient(url) as client:
            loader = OPDLoader(client, "ds", 3, arrays="numpy", teachers=["code"], num_epochs=1)
            ids = [sid for batch in loader for sid in batch["sample_id"]]
            table = Store(root / "store").open("ds").read_all()
            assert sorted(ids) == sorted(table["sample_id"].to_pylist()[:5])  # each code sample once, nothing else
            with pytest.raises(ValueError, match="has no routed teacher 'chem'"):
                OPDLoader(client, "ds", 3, arrays="numpy", teachers=["chem"])


def test_each_route_is_rescored_with_the_teacher_its_route_records(built, teachers) -> None:
    root, *_ = built
    report = verify_dataset(VerifyConfig(store=root / "store", dataset="ds", samples=3))
    assert report.passed and report.fingerprint_matches and report.teacher_key == "data_source"
    assert [(r.key, r.teacher, r.samples) for r in report.routes] == [
        ("code", str(teachers["code"]), 3), ("math", str(teachers["math"]), 3)
    ]  # fmt: skip
    assert all(r.passed and r.tokens > 0 and r.max_abs_diff < 1e-4 for r in report.routes)
    assert report.samples == 6 and report.tokens == sum(r.tokens for r in report.routes)
    # More than a route holds: all of it (5 code, 8 math samples).
    whole = verify_dataset(VerifyConfig(store=root / "store", dataset="ds", samples=100))
    assert [r.samples for r in whole.routes] == [5, 8] and whole.passed
    assert whole.tokens == Store(root / "store").open("ds").manifest.num_response_tokens


def test_a_route_whose_log_probs_differ_fails_and_is_named(built, teachers, monkeypatch) -> None:
    """The code route's stored log-probs no longer match its teacher: that route fails, the math route passes."""
    root, *_ = built
    cfg = VerifyConfig(store=root / "store", dataset="ds", samples=4)
    real_load = type(cfg.backend).load

    class Shifted:  # the code teacher, 0.5 nats off
        def __init__(self, scorer):
            self.scorer = scorer

        def score(self, prompts, responses):
            return [lp + 0.5 for lp in self.scorer.score(prompts, responses)]

        def close(self):
            self.scorer.close()

    def load(self, teacher, job):
        scorer = real_load(self, teacher, job)
        return Shifted(scorer) if teacher == teachers["code"] else scorer

    monkeypatch.setattr(type(cfg.backend), "load", load)
    report = verify_dataset(cfg)
    assert not report.passed and [(r.key, r.passed) for r in report.routes] == [("code", False), ("math", True)]
    code_ids = Store(root / "store").open("ds").read_all(["sample_id"])["sample_id"].to_pylist()[:5]
    assert report.worst_sample_id in code_ids and report.routes[0].worst_sample_id in code_ids
    assert report.routes[0].max_abs_diff == pytest.approx(0.5, abs=1e-4) and report.routes[1].max_abs_diff < 1e-4

    done = CliRunner().invoke(app, ["verify", str(root / "store"), "--dataset", "ds", "--samples", "4"])
    assert done.exit_code == 1, done.output
    lines = done.output.strip().splitlines()
    assert lines[0].startswith("FAILED: ds v1, 8 samples") and len(lines) == 3
    assert lines[1].startswith("  route 'code': FAILED, 4 samples") and f"teacher {teachers['code']};" in lines[1]
    assert lines[2].startswith("  route 'math': PASSED, 4 samples")
    out = json.loads(CliRunner().invoke(app, ["verify", str(root / "store"), "--dataset", "ds", "--json"]).output)
    assert [(r["key"], r["passed"]) for r in out["routes"]] == [("code", False), ("math", True)]
    assert out["teacher_key"] == "data_source" and out["passed"] is False


def test_refusals_name_the_route_and_the_fix(built, teachers, tmp_path, tiny_llama_b_dir) -> None:
    root, *_ = built
    store = root / "store"
    with pytest.raises(InvalidInput, match=r"has 2 routed teachers \(code, math\): leave out --teacher"):
        verify_dataset(VerifyConfig(store=store, dataset="ds", teacher=teachers["math"]))
    wrong = _map(tmp_path / "wrong.json", {"math": (tiny_llama_b_dir, tiny_llama_b_dir)})
    wrong_fp = r"route 'math': the teacher at .* \(--teacher-map .*wrong.json\) has fingerprint sha256:\w+, not "
    with pytest.raises(InvalidInput, match=wrong_fp + r"sha256:\w+, the model that scored it"):
        verify_dataset(VerifyConfig(store=store, dataset="ds", teacher_map=wrong))
    other = _map(tmp_path / "other.json", {"chem": (teachers["math"], teachers["math"])})
    with pytest.raises(InvalidInput, match=r"routes 'chem', which this dataset has no route for \(its routes: 'code'"):
        verify_dataset(VerifyConfig(store=store, dataset="ds", teacher_map=other))
    with pytest.raises(ValidationError, match="give one"):
        VerifyConfig(store=store, dataset="ds", teacher=teachers["math"], teacher_map=other)


def test_a_moved_teacher_is_refused_until_the_map_names_it(tmp_path, teachers) -> None:
    """The manifest records each route's teacher path; where one has moved, precompute's map (or one naming just
    that route) supplies it, and nothing is scored before every route's teacher is found."""
    code = shutil.copytree(teachers["code"], tmp_path / "code-teacher")
    teacher_map = _map(tmp_path / "map.json", {"code": (code, code), "math": (teachers["math"], teachers["math"])})
    run_precompute(_cfg(tmp_path, _rollouts(tmp_path / "r.jsonl", ["math", "code", "code", "math"]), teacher_map))
    moved = code.rename(tmp_path / "moved")
    cfg = VerifyConfig(store=tmp_path / "store", dataset="ds", samples=2)
    moved_away = r"route 'code': the manifest records .*code-teacher, which is not a model directory here; give its"
    with pytest.raises(InvalidInput, match=moved_away + " teacher in --teacher-map FILE"):
        verify_dataset(cfg)
    done = CliRunner().invoke(app, ["verify", str(tmp_path / "store"), "--dataset", "ds"])
    assert done.exit_code == 2 and "error: route 'code': the manifest records" in done.output
    only_code = _map(tmp_path / "code.json", {"code": (moved, moved)})
    report = verify_dataset(cfg.model_copy(update={"teacher_map": only_code}))
    assert report.passed and [(r.key, r.teacher) for r in report.routes] == [
        ("code", str(moved)), ("math", str(teachers["math"]))
    ]  # fmt: skip
    assert np.isclose(report.max_abs_diff, max(r.max_abs_diff for r in report.routes))


def test_stats_text_has_a_block_per_routed_teacher(built) -> None:
    from lopd.storage.stats import RolloutVsTeacher

    root, *_ = built
    cov, con = coverage(root / "store", "ds"), consistency(root / "store", "ds")
    lines = render_text(cov, con).splitlines()
    start = lines.index("  per teacher       2 routed teachers (each on its own samples)")
    code, math = con.per_teacher
    assert lines[start + 1 : start + 7] == [
        f"    'code': CONSISTENT, 5 samples, {code.tokens} tokens, teacher log-prob mean "
        f"{code.mean_teacher_logprob:.4f}, p < 1e-4: {100 * code.share_below_log_1e_4:.2f}%",
        f"      teacher           {code.teacher_fingerprint}",
        f"      SFT-data teacher  {code.sft_teacher_fingerprint}",
        f"    'math': CONSISTENT, 8 samples, {math.tokens} tokens, teacher log-prob mean "
        f"{math.mean_teacher_logprob:.4f}, p < 1e-4: {100 * math.share_below_log_1e_4:.2f}%",
        f"      teacher           {math.teacher_fingerprint}",
        f"      SFT-data teacher  {math.sft_teacher_fingerprint}",
    ]
    assert lines[start + 7] == "  teacher log-prob histogram"  # the whole dataset's, as for one teacher
    # One teacher (no per_teacher): the same text less that block.
    single = render_text(cov, con.model_copy(update={"per_teacher": []})).splitlines()
    assert single == lines[:start] + lines[start + 7 :]
    # A route with rollout log-probs adds its KL estimate.
    rvt = RolloutVsTeacher(tokens=7, mean_rollout_logprob=-1.0, mean_teacher_logprob=-1.25,
                           kl_rollout_teacher_estimate=0.25)  # fmt: skip
    with_kl = con.model_copy(update={"per_teacher": [code.model_copy(update={"rollout_vs_teacher": rvt}), math]})
    assert "      KL(rollout || teacher) estimate 0.2500 nats/token (7 tokens)" in render_text(cov, with_kl)
