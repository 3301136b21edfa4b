"""`lopd export --format verl|trl`: the top-k columns in the shapes verl's and TRL's distillation read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lopd.cli import app
from lopd.storage.reader import Store
from lopd.storage.schema import TOPK_IDS, TOPK_LOGPROBS
from tests.server.test_precompute import write_rollouts

K = 3


def _build(root: Path, teacher: Path, top_k: int) -> Path:
    from lopd.server.precompute import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(
        rollouts=[write_rollouts(root / "r.jsonl", 6, seed=2)], teacher=teacher, sft_teacher=str(teacher),
        store=root / "store", dataset="ds", samples_per_part=4, top_k=top_k, progress=False,
    )  # fmt: skip
    run_precompute(cfg)
    return root / "store"


@pytest.fixture(scope="module")
def topk_store(tmp_path_factory, tiny_llama_dir) -> Path:
    return _build(tmp_path_factory.mktemp("topk"), tiny_llama_dir, K)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_llama_dir) -> Path:
    return _build(tmp_path_factory.mktemp("plain"), tiny_llama_dir, 0)


def _stored(store: Path) -> tuple[dict, Store]:
    ds = Store(store).open("ds")
    t = ds.read_all()
    return {c: t[c].to_pylist() for c in t.column_names}, ds


def test_verl_layout_is_the_stored_top_k_as_r_by_k(tmp_path: Path, topk_store: Path) -> None:
    out = tmp_path / "verl.parquet"
    res = CliRunner().invoke(app, ["export", str(topk_store), "--dataset", "ds", "--out", str(out), "--format", "verl"])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out)
    assert got.column_names == ["sample_id", "prompt_ids", "response_ids", "teacher_ids", "teacher_logprobs",
                                "teacher_log_probs"]  # fmt: skip
    assert str(got.schema.field("teacher_ids").type) == "list<element: list<element: int32>>"
    assert str(got.schema.field("teacher_logprobs").type) == "list<element: list<element: float>>"
    want, _ = _stored(topk_store)
    for i, sid in enumerate(got["sample_id"].to_pylist()):
        r = len(want["response_ids"][i])
        ids, lps = np.asarray(got["teacher_ids"][i].as_py()), np.asarray(got["teacher_logprobs"][i].as_py(), np.float32)
        assert ids.shape == lps.shape == (r, K)  # a batch pads these to (batch, seq, K)
        assert ids.ravel().tolist() == want[TOPK_IDS][i]
        assert np.array_equal(lps.ravel(), np.asarray(want[TOPK_LOGPROBS][i], np.float32))  # lossless
        assert got["teacher_log_probs"][i].as_py() == want["teacher_logprobs"][i] and sid == want["sample_id"][i]


def test_trl_layout_keeps_the_realized_token_as_trl_does(tmp_path: Path, topk_store: Path) -> None:
    out = tmp_path / "trl.parquet"
    res = CliRunner().invoke(app, ["export", str(topk_store), "--dataset", "ds", "--out", str(out), "--format", "trl"])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out)
    assert got.column_names == ["sample_id", "input_ids", "completion_mask", "teacher_topk_ids",
                                "teacher_topk_logprobs", "teacher_id"]  # fmt: skip
    want, _ = _stored(topk_store)
    outside = 0
    for i in range(got.num_rows):
        prompt, response = want["prompt_ids"][i], want["response_ids"][i]
        assert got["input_ids"][i].as_py() == prompt + response
        assert got["completion_mask"][i].as_py() == [0] * len(prompt) + [1] * len(response)
        assert got["teacher_id"][i].as_py() == "default"
        top = np.asarray(want[TOPK_IDS][i]).reshape(len(response), K)
        for j, (ids, lps) in enumerate(
            zip(got["teacher_topk_ids"][i].as_py(), got["teacher_topk_logprobs"][i].as_py())
        ):
            assert ids[:K] == top[j].tolist()
            if response[j] in top[j]:
                assert len(ids) == K
            else:  # K + 1: the realized token last, with its stored log-prob
                outside += 1
                assert ids[K] == response[j] and len(ids) == K + 1
                assert np.float32(lps[K]) == np.float32(want["teacher_logprobs"][i][j])
    assert outside > 0  # the fixture's random responses are mostly outside a small top K: the case is exercised


def test_a_store_without_top_k_is_refused_naming_the_fix(tmp_path: Path, tiny_store) -> None:
    res = CliRunner().invoke(app, ["export", str(tiny_store), "--dataset", "ds", "--out", str(tmp_path / "x.parquet"),
                                   "--format", "trl"])  # fmt: skip
    assert res.exit_code == 2
    assert "holds no teacher top-k (built without --top-k)" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["export", str(tiny_store), "--dataset", "ds", "--out", str(tmp_path / "x.parquet"),
                                   "--format", "nope"])  # fmt: skip
    assert "supported: lightning-opd, verl, trl" in res.output


def test_multi_teacher_exports_name_each_samples_teacher(tmp_path: Path, tiny_llama_dir, tiny_qwen2_dir) -> None:
    from lopd.server.precompute import PrecomputeConfig, run_precompute
    from tests.server.test_multi_teacher import _map, _rollouts

    teacher_map = _map(
        tmp_path / "m.json", {"math": (tiny_llama_dir, tiny_llama_dir), "code": (tiny_qwen2_dir, tiny_qwen2_dir)}
    )
    cfg = PrecomputeConfig(
        rollouts=[_rollouts(tmp_path / "r.jsonl", ["math", "code", "math"])], teacher_map=teacher_map,
        store=tmp_path / "s", dataset="ds", top_k=2, progress=False,
    )  # fmt: skip
    run_precompute(cfg)
    for fmt, column in (("verl", "data_source"), ("trl", "teacher_id")):
        out = tmp_path / f"{fmt}.parquet"
        res = CliRunner().invoke(app, ["export", str(tmp_path / "s"), "--dataset", "ds", "--out", str(out),
                                       "--format", fmt])  # fmt: skip
        assert res.exit_code == 0, res.output
        assert pq.read_table(out)[column].to_pylist() == ["code", "math", "math"]
    assert json.loads((Store(tmp_path / "s").open("ds").path / "manifest.json").read_text())["provenance"]["top_k"] == 2
