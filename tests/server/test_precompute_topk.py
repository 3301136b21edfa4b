"""`lopd precompute --top-k K`: the stored columns, the manifest, old stores untouched, resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lopd.server.precompute import run_precompute
from lopd.server.teachers.transformers_backend import TransformersTeacher
from lopd.storage import layout
from lopd.storage.reader import Store
from lopd.storage.schema import SAMPLE_SCHEMA, TOPK_IDS, TOPK_LOGPROBS, sample_schema
from tests.server.test_precompute import _cfg, _cli, _shard_hashes, write_rollouts

K = 4


@pytest.fixture(scope="module")
def rollouts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_rollouts(tmp_path_factory.mktemp("rollouts") / "r.jsonl", 20, seed=3, with_logprobs_every=3)


def test_top_k_store_holds_the_teachers_top_k(tmp_path: Path, rollouts_file: Path, tiny_llama_dir: Path) -> None:
    result = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, top_k=K))
    ds = Store(tmp_path / "store").open("ds")
    assert ds.manifest.provenance.top_k == K
    assert '"top_k": 4' in (ds.path / layout.MANIFEST).read_text()
    table = ds.read_all()
    assert table.schema.equals(sample_schema(K), check_metadata=False)
    assert pq.ParquetFile(ds.shard_paths()[0]).schema_arrow.names == list(sample_schema(K).names)

    # Scored part by part with the job's budgets, as the job did: then every value is bit-equal (lossless).
    teacher = TransformersTeacher(tiny_llama_dir, top_k=K, max_batch_tokens=512)
    prompts, responses = table["prompt_ids"].to_pylist(), table["response_ids"].to_pylist()
    want = [s for a in range(0, len(prompts), 8) for s in teacher.score_topk(prompts[a : a + 8], responses[a : a + 8])]
    for i, w in enumerate(want):
        r = len(responses[i])
        ids = np.asarray(table[TOPK_IDS][i].as_py(), dtype=np.int32).reshape(r, K)
        lps = np.asarray(table[TOPK_LOGPROBS][i].as_py(), dtype=np.float32).reshape(r, K)
        np.testing.assert_array_equal(ids, w.ids)
        np.testing.assert_array_equal(lps, w.topk_logprobs)  # lossless: bit-equal float32
        np.testing.assert_array_equal(np.asarray(table["teacher_logprobs"][i].as_py(), np.float32), w.logprobs)
    assert result.manifest is not None

    # The same rollouts without top-k: another run (key), the old schema, no "top_k" in the manifest,
    # the same sampled-token log-probs.
    plain = run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, dataset="plain"))
    assert plain.run_key != result.run_key and plain.manifest is not None
    pds = Store(tmp_path / "store").open("plain")
    assert "top_k" not in json.loads((pds.path / layout.MANIFEST).read_text())["provenance"]
    assert pds.read_all().schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    assert pds.read_all()["teacher_logprobs"].equals(table["teacher_logprobs"])
    assert plain.manifest.content_hash != result.manifest.content_hash


@pytest.mark.slow
def test_top_k_run_killed_mid_part_resumes_to_the_uninterrupted_store(
    tmp_path: Path, rollouts_file: Path, tiny_llama_dir: Path
) -> None:
    ref, store = tmp_path / "ref", tmp_path / "store"
    run_precompute(_cfg(tmp_path, rollouts_file, tiny_llama_dir, store=ref, top_k=K))  # what the CLI below runs
    cmd = _cli(tmp_path, rollouts_file, tiny_llama_dir, store, "--top-k", str(K))
    crashed = subprocess.run(
        cmd, env={**os.environ, "LOPD_FAULT": "during_part_write:1"}, capture_output=True, text=True
    )
    assert crashed.returncode == 137, crashed.stderr
    assert not (layout.dataset_dir(store, "ds") / "v1").exists()
    subprocess.run(cmd, check=True, capture_output=True)
    assert _shard_hashes(store) == _shard_hashes(ref)
    assert Store(store).open("ds").manifest.content_hash == Store(ref).open("ds").manifest.content_hash
    assert Store(store).open("ds").manifest.provenance.top_k == K


@pytest.mark.parametrize("backend", [{"name": "sglang", "teacher_url": "http://127.0.0.1:9"}, {"name": "vllm"}])
def test_every_backend_takes_top_k_and_one_that_cannot_is_refused_before_any_work(
    tmp_path: Path, backend: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import ValidationError

    from lopd.server.precompute import PrecomputeConfig
    from lopd.server.teachers import BACKENDS

    def config() -> PrecomputeConfig:
        return PrecomputeConfig(
            rollouts=[tmp_path], teacher=tmp_path, sft_teacher=str(tmp_path), store=tmp_path / "s", dataset="d",
            backend=dict(backend), top_k=4,
        )  # fmt: skip

    assert config().job().top_k == 4  # vllm (prompt_logprobs=K), sglang (top_logprobs_num), openai: all store top-k
    monkeypatch.setattr(BACKENDS[backend["name"]], "supports_top_k", False)  # a backend that could not
    with pytest.raises(ValidationError, match="does not store the teacher's top-k"):
        config()
    assert not (tmp_path / "s").exists()
