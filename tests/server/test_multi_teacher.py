"""Multi-teacher datasets (`lopd precompute --teacher-map`): routing, refusals, per-teacher stats, filter, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lopd.client.consistency import check_dataset_for_training
from lopd.client.types import DatasetInfo
from lopd.errors import InvalidInput, TeacherMismatch
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers.transformers_backend import TransformersTeacher
from lopd.storage import layout
from lopd.storage.reader import Store
from lopd.storage.stats import consistency
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
    assert [(t.key, t.samples, t.verdict) for t in stats.per_teacher] == [("code", 5, "consistent"), ("math", 8, "consistent")]
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
    bad = _map(tmp_path / "map.json", {"math": (teachers["math"], teachers["math"]), "code": (teachers["code"],
                                                                                                teachers["math"])})
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
        (["math", "chem", "code"], r"record 'r001' has data_source 'chem', which --teacher-map .* does not route "
                                   r"\(it routes 'code', 'math'\)\. Add \"chem\""),
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
            ("code", 5, "consistent"), ("math", 8, "consistent")
        ]
        with StoreClient(url) as client:
            loader = OPDLoader(client, "ds", 3, arrays="numpy", teachers=["code"], num_epochs=1)
            ids = [sid for batch in loader for sid in batch["sample_id"]]
            table = Store(root / "store").open("ds").read_all()
            assert sorted(ids) == sorted(table["sample_id"].to_pylist()[:5])  # each code sample once, nothing else
            with pytest.raises(ValueError, match="has no routed teacher 'chem'"):
                OPDLoader(client, "ds", 3, arrays="numpy", teachers=["chem"])
