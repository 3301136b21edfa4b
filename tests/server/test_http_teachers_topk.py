"""`--top-k` through the server-backed teachers (sglang, openai), against the loopback server's real numbers.

The loopback server (`tests/utils/inference_server.py`) answers `top_logprobs_num` (SGLang) and
`prompt_logprobs=K` (vLLM's OpenAI server) in the shapes their sources build, with the top K of a tiny
model's full log-softmax: compared here with the naive full log-softmax plus `topk`. No SGLang server
runs on this machine (it needs a GPU), so SGLang's side is tested on answers of that shape only; the
openai backend is also run against a real vLLM server in tests/server/test_vllm_real.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lopd.errors import InvalidInput, TeacherServerError
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers import BACKENDS as REGISTRY
from lopd.server.teachers import backend_options
from lopd.server.teachers.http_scoring import RetryPolicy
from lopd.server.teachers.http_teacher import HTTPTeacher
from lopd.server.teachers.openai_backend import response_topk as openai_topk
from lopd.server.teachers.sglang_backend import response_topk as sglang_topk
from lopd.storage.reader import Store
from lopd.storage.schema import TOPK_IDS, TOPK_LOGPROBS
from tests.server.test_precompute import write_rollouts
from tests.server.test_topk_transformers import assert_topk_matches, naive_topk
from tests.utils.inference_server import InferenceServer
from tests.utils.naive import naive_logprobs

FAST = RetryPolicy(retries=1, backoff_s=0.01, max_backoff_s=0.05)
K = 5


def _teacher(backend: str, server: InferenceServer, **kw) -> HTTPTeacher:
    kw.setdefault("retry", FAST)
    return REGISTRY[backend].teacher_class()(server.model_dir, teacher_url=server.url, **kw)  # type: ignore[call-arg]


def _records(n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 100, 1 if i == 0 else int(rng.integers(2, 25))).tolist() for i in range(n)]
    return prompts, [rng.integers(3, 100, int(rng.integers(1, 35))).tolist() for _ in range(n)]


@pytest.mark.parametrize(
    ("backend", "convention"),
    [("sglang", "recent"), ("sglang", "2024"), ("openai", None)],
    ids=["sglang-recent", "sglang-2024", "openai"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_equals_the_naive_full_softmax(server, llama, backend, convention, temperature):
    if convention:
        server.reset(sglang_convention=convention)
    teacher = _teacher(backend, server, temperature=temperature, top_k=K, max_concurrency=3)
    prompts, responses = _records(8, seed=3)
    got = teacher.score_topk(prompts, responses)
    teacher.close()
    for p, r, g in zip(prompts, responses, got):
        np.testing.assert_allclose(g.logprobs, naive_logprobs(llama, p, r, temperature), atol=1e-4, rtol=0)
        assert_topk_matches(g, *naive_topk(llama, p, r, K, temperature), K)
        in_top = g.ids == np.asarray(r)[:, None]  # the sampled token, where it is in the top K: the same float32
        np.testing.assert_array_equal(g.topk_logprobs[in_top], g.logprobs[in_top.any(axis=1)])
    sent = server.bodies("/generate" if backend == "sglang" else "/v1/completions")[-1]
    assert (sent["top_logprobs_num"] if backend == "sglang" else sent["prompt_logprobs"]) == K


def test_openai_topk_above_the_servers_max_logprobs_is_refused_at_load(server):
    with pytest.raises(InvalidInput, match=r"does not return the top 21 .*max allowed: 20.*--max-logprobs"):
        _teacher("openai", server, top_k=21)


def test_a_teacher_loaded_without_top_k_refuses_score_topk(server):
    teacher = _teacher("sglang", server)
    with pytest.raises(ValueError, match="loaded without top_k"):
        teacher.score_topk([[5]], [[6]])
    teacher.close()
    assert not any("top_logprobs_num" in s for s in server.bodies("/generate"))  # never asked without --top-k


def test_recorded_answers_that_do_not_hold_the_top_k_are_refused():
    # SGLang: aligned with input_token_logprobs (here the recent form: a null first, then one list per token).
    good = [None, [[-0.5, 7, None], [-1.0, 3, None]], [[-0.2, 4, None], [-0.2, 2, None]]]
    ids, lps = sglang_topk(good, [1, 2], [3, 4], 2, what="record 0", record=0)
    assert ids.tolist() == [[7, 3], [2, 4]]  # ordered by log-prob, a tie to the lower id
    assert lps.dtype == np.float32 and lps.tolist() == np.float32([[-0.5, -1.0], [-0.2, -0.2]]).tolist()
    with pytest.raises(TeacherServerError, match="fewer than the 3 asked"):
        sglang_topk(good, [1, 2], [3, 4], 3, what="record 0", record=0)
    with pytest.raises(TeacherServerError, match="has 1 entries for 2 response tokens"):
        sglang_topk(good[:1], [1, 2], [3, 4], 2, what="record 0", record=0)
    # vLLM's OpenAI answer: the top K plus the actual token (rank 9 here): the actual one is dropped.
    position = {"5": {"logprob": -0.1, "rank": 1}, "6": {"logprob": -2.0, "rank": 2}, "9": {"logprob": -5.0, "rank": 9}}
    ids, lps = openai_topk([None, position], 1, 1, 2, what="record 0", record=0)
    assert ids.tolist() == [[5, 6]]
    with pytest.raises(TeacherServerError, match="not the top 3 asked"):  # the 3rd best has rank 9: not a top 3
        openai_topk([None, position], 1, 1, 3, what="record 0", record=0)


def test_precompute_top_k_through_a_server_equals_the_transformers_store(tmp_path: Path, server, tiny_llama_dir):
    rollouts = write_rollouts(tmp_path / "r.jsonl", 10, seed=4)

    def build(name: str, backend=None) -> Store:
        extra = {"backend": backend} if backend is not None else {}
        cfg = PrecomputeConfig(
            rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=tmp_path / name,
            dataset="ds", samples_per_part=4, progress=False, top_k=K, **extra,
        )  # fmt: skip
        assert run_precompute(cfg).status == "published"
        return Store(tmp_path / name)

    want = build("ref").open("ds").read_all()
    ds = build("sglang", backend_options("sglang", {"teacher_url": server.url})).open("ds")
    assert ds.manifest.provenance.top_k == K and ds.manifest.provenance.backend == "sglang"
    got = ds.read_all()
    for i in range(got.num_rows):
        g_ids, w_ids = (np.asarray(t[TOPK_IDS][i].as_py()) for t in (got, want))
        g_lps, w_lps = (np.asarray(t[TOPK_LOGPROBS][i].as_py()) for t in (got, want))
        np.testing.assert_allclose(g_lps, w_lps, atol=1e-4, rtol=0)
        assert (np.abs(g_lps - w_lps)[g_ids != w_ids] <= 1e-4).all()
