"""The server-backed teachers (sglang, openai) against a real loopback server computing real log-probs.

`tests/utils/inference_server.py` answers in SGLang's and vLLM's documented shapes with a tiny
transformers model; every number is compared with the naive reference, and every fault (dropped
connections, 503/429, 4xx, a moved offset, an ignored temperature, no server at all) is injected
at the socket or HTTP level, not mocked.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from lopd.cli import app
from lopd.errors import InvalidInput, TeacherServerError
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.server.teachers import BACKENDS as REGISTRY
from lopd.server.teachers import backend_options
from lopd.server.teachers.http_scoring import RetryPolicy, server_message
from lopd.server.teachers.http_teacher import HTTPTeacher
from lopd.server.verify import VerifyConfig, verify_dataset
from lopd.storage.reader import Store
from lopd.storage.staging import Staging, list_staging_plans
from tests.server.test_precompute import write_rollouts
from tests.utils.inference_server import InferenceServer, closed_port_url
from tests.utils.naive import naive_logprobs

FAST = RetryPolicy(retries=2, backoff_s=0.01, max_backoff_s=0.05)
BACKENDS = ("sglang", "openai")


def _teacher(backend: str, server: InferenceServer, **kw) -> HTTPTeacher:
    kw.setdefault("retry", FAST)
    return REGISTRY[backend].teacher_class()(server.model_dir, teacher_url=server.url, **kw)  # type: ignore[call-arg]


def _records(n: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Varied lengths, including a one-token prompt (logprob_start_len = 0, SGLang's special case)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 100, 1 if i == 0 else int(rng.integers(2, 25))).tolist() for i in range(n)]
    responses = [rng.integers(3, 100, int(rng.integers(1, 35))).tolist() for _ in range(n)]
    return prompts, responses


def _assert_naive(llama, prompts, responses, got, temperature: float = 1.0) -> None:
    assert len(got) == len(prompts)
    for p, r, g in zip(prompts, responses, got):
        assert g.dtype == np.float32 and g.shape == (len(r),)
        np.testing.assert_allclose(g, naive_logprobs(llama, p, r, temperature), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- requests as documented


def test_sglang_request_is_pinned_to_the_response_start(server):
    teacher = _teacher("sglang", server, temperature=0.8)
    prompts, responses = _records(3)
    server.reset()
    teacher.score(prompts, responses)
    teacher.close()
    bodies = {tuple(b["input_ids"]): b for b in server.bodies("/generate")}
    assert len(bodies) == 3
    for p, r in zip(prompts, responses):
        assert bodies[tuple(p + r)] == {
            "input_ids": p + r,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.8},
            "return_logprob": True,
            "logprob_start_len": len(p) - 1,
        }


def test_openai_request_and_served_model_discovery(server):
    teacher = _teacher("openai", server)
    assert [p for m, p, _ in server.requests if m == "GET"] == ["/v1/models"]
    server.reset()
    teacher.score([[5, 6, 7]], [[8, 9]])
    teacher.close()
    (body,) = server.bodies("/v1/completions")
    assert body == {
        "model": "teacher",  # found with GET /v1/models
        "prompt": [5, 6, 7, 8, 9],
        "max_tokens": 1,
        "prompt_logprobs": 0,
        "temperature": 1.0,
        "stream": False,
    }


def test_teacher_info_comes_from_the_local_model_directory(server, tiny_llama_dir, tokenizer):
    for backend, dtype in (("sglang", "float32"), ("openai", "server")):
        teacher = _teacher(backend, server)
        info = teacher.info
        teacher.close()
        assert info.fingerprint == model_fingerprint(tiny_llama_dir)
        assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
        assert (info.backend, info.device, info.dtype) == (backend, server.url, dtype)
        assert info.vocab_size == len(tokenizer) and info.max_context == 1024 and info.temperature == 1.0


def test_an_sglang_without_model_info_is_checked_with_health(server):
    server.reset(no_model_info=True)
    teacher = _teacher("sglang", server)
    teacher.close()
    assert [p for m, p, _ in server.requests if m == "GET"] == ["/get_model_info", "/health"]
    assert teacher.info.dtype == "server"


# ---------------------------------------------------------------------- exact numbers, order, concurrency


@pytest.mark.parametrize(
    "backend, convention",
    [("sglang", "recent"), ("sglang", "2024"), ("openai", None)],
    ids=["sglang-recent", "sglang-2024", "openai"],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_equal_the_naive_reference(server, llama, backend, convention, temperature):
    if convention:
        server.reset(sglang_convention=convention)
    teacher = _teacher(backend, server, temperature=temperature, max_concurrency=4)
    prompts, responses = _records(10, seed=1)
    got = teacher.score(prompts, responses)
    teacher.close()
    _assert_naive(llama, prompts, responses, got, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_order_is_kept_when_answers_arrive_out_of_order(server, llama, backend):
    teacher = _teacher(backend, server, max_concurrency=4)
    server.reset(latency_by_length_s=0.002)  # longer inputs answer sooner
    prompts, responses = _records(12, seed=2)
    got = teacher.score(prompts, responses)
    teacher.close()
    _assert_naive(llama, prompts, responses, got)
    assert server.max_in_flight > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrency_is_bounded(server, backend):
    teacher = _teacher(backend, server, max_concurrency=3)
    server.reset(latency_s=0.05)
    teacher.score(*_records(12, seed=3))
    teacher.close()
    assert 2 <= server.max_in_flight <= 3


# ---------------------------------------------------------------------- retries


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fault",
    [
        {"drop_first": 2},
        {"fail_first": 2, "fail_status": 503},
        {"fail_first": 2, "fail_status": 429},
        {"fail_first": 2, "fail_status": 408},
    ],
    ids=["dropped-connection", "503", "429", "408"],
)
def test_transient_failures_are_retried_with_identical_results(server, backend, fault):
    teacher = _teacher(backend, server, max_concurrency=1)
    prompts, responses = _records(5, seed=4)
    clean = teacher.score(prompts, responses)
    server.reset(**fault)
    retried = teacher.score(prompts, responses)
    teacher.close()
    assert server.scoring_requests == len(prompts) + 2
    assert all(a.tobytes() == b.tobytes() for a, b in zip(clean, retried))


def test_retry_after_is_honoured(server):
    teacher = _teacher("sglang", server, retry=RetryPolicy(retries=2, backoff_s=0.001))
    server.reset(fail_first=1, fail_status=429, retry_after="1")
    start = time.perf_counter()
    teacher.score([[5, 6]], [[7]])
    teacher.close()
    assert time.perf_counter() - start >= 0.95 and server.scoring_requests == 2


def test_retry_after_is_capped(server):
    teacher = _teacher("sglang", server, retry=RetryPolicy(retries=2, backoff_s=0.001, max_retry_after_s=0.05))
    server.reset(fail_first=1, fail_status=503, retry_after="3600")
    start = time.perf_counter()
    teacher.score([[5, 6]], [[7]])
    teacher.close()
    assert time.perf_counter() - start < 5 and server.scoring_requests == 2


def test_retries_are_bounded(server):
    teacher = _teacher("sglang", server, max_concurrency=1)
    server.reset(fail_first=100)
    with pytest.raises(TeacherServerError, match=r"record 0: .* failed 3 attempts in a row; last error: HTTP 503"):
        teacher.score([[5, 6]], [[7]])
    teacher.close()
    assert server.scoring_requests == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_4xx_is_not_retried_and_names_the_record(server, backend):
    teacher = _teacher(backend, server, max_concurrency=1)
    prompts, responses = [[5] * 5, [6] * 30, [7] * 5, [8] * 5], [[9] * 5] * 4
    server.reset(context_length=32)  # set after load: the teacher does not know the server's limit
    with pytest.raises(TeacherServerError, match="context length") as e:
        teacher.score(prompts, responses)
    teacher.close()
    assert e.value.record == 1 and "record 1" in str(e.value) and "HTTP 400" in str(e.value)
    path = "/generate" if backend == "sglang" else "/v1/completions"
    lengths = [len(b.get("input_ids") or b.get("prompt")) for b in server.bodies(path)]
    assert lengths.count(35) == 1  # sent once, not retried


def test_the_servers_context_is_checked_before_sending(server):
    server.reset(context_length=20)  # the OpenAI server reports max_model_len 20 at load
    teacher = _teacher("openai", server)
    server.reset()
    with pytest.raises(TeacherServerError, match=r"record 0: 15 prompt \+ 5 response tokens exceed the 19 tokens"):
        teacher.score([[5] * 15], [[6] * 5])
    teacher.close()
    assert server.bodies("/v1/completions") == []


# ---------------------------------------------------------------------- answers that do not line up


@pytest.mark.parametrize(
    "fault, problem",
    [
        ({"sglang_shift": 1}, "response token 0 has a null log-prob"),  # starts one token late: a null response value
        ({"sglang_shift": -1}, "expected 6 entries"),  # starts one token early: one entry too many
        ({"sglang_convention": "2024", "sglang_shift": 1}, "got 4"),  # older convention, moved: one too few
        ({"wrong_ids": True}, "the first should be the last prompt token .id 7 at position 2., but it is id 8"),
    ],
    ids=["late", "early", "2024-late", "wrong-ids"],
)
def test_a_misaligned_sglang_answer_is_refused(server, fault, problem):
    teacher = _teacher("sglang", server)
    server.reset(**fault)
    with pytest.raises(TeacherServerError, match=problem) as e:
        teacher.score([[5, 6, 7]], [[8, 9, 10, 11, 12]])
    teacher.close()
    assert e.value.record == 0 and "record 0" in str(e.value)


def test_a_misaligned_answer_is_refused_at_load(server):
    server.reset(sglang_shift=1)
    with pytest.raises(TeacherServerError, match="the load-time probe: SGLang's input_token_logprobs does not line up"):
        _teacher("sglang", server)


def test_an_openai_answer_without_the_actual_token_is_refused(server):
    teacher = _teacher("openai", server)
    server.reset(wrong_ids=True)
    with pytest.raises(TeacherServerError, match=r"record 0: .*position 3 \(response token 0\) has no entry"):
        teacher.score([[5, 6, 7]], [[8, 9]])
    teacher.close()


# ---------------------------------------------------------------------- load-time checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unreachable_server_fails_clearly(tiny_llama_dir, backend):
    retry = RetryPolicy(retries=1, backoff_s=0.01)
    with pytest.raises(
        TeacherServerError, match=rf"failed 2 attempts .*ConnectError.* Is the {backend} server running"
    ):
        REGISTRY[backend].teacher_class()(tiny_llama_dir, teacher_url=closed_port_url(), retry=retry)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_temperature_the_server_ignores_is_refused(server, backend):
    server.reset(ignore_temperature=True)
    with pytest.raises(InvalidInput, match="does not apply the temperature"):
        _teacher(backend, server, temperature=0.7)
    _teacher(backend, server, temperature=1.0).close()  # at T = 1 there is nothing to apply


def test_an_unknown_served_model_is_refused(server):
    with pytest.raises(InvalidInput, match="does not serve 'other'; it serves: teacher"):
        _teacher("openai", server, served_model_name="other")


def test_backend_options_are_checked():
    plain = backend_options("transformers")
    assert (plain.name, plain.device, plain.precision()) == ("transformers", "cpu", "float32")
    served = backend_options("sglang", {"teacher_url": "http://h:1"})
    assert (served.name, served.precision(), served.max_concurrency) == ("sglang", "server", 8)
    for name, kw, problem in [
        ("sglang", {}, "--backend sglang needs --teacher-url: the address of the running server"),
        ("transformers", {"teacher_url": "http://h:1"}, "--teacher-url only applies to --backend sglang or openai"),
        ("openai", {"teacher_url": "http://h:1", "device": "cuda"}, "--device only applies to --backend transformers"),
        (
            "sglang",
            {"teacher_url": "http://h:1", "dtype": "bfloat16"},
            "--dtype only applies to --backend transformers or vllm",
        ),
        ("transformers", {"gpu_memory_utilization": 0.5}, "only applies to --backend vllm"),
        ("sglang", {"teacher_url": "http://h:1", "served_model_name": "x"}, "only applies to --backend openai"),
        ("sglang", {"teacher_url": "http://h:1", "max_concurrency": 0}, "--max-concurrency: Input should be greater"),
        (
            "vllm-nope",
            {},
            "unknown teacher backend 'vllm-nope'; available backends: transformers, vllm, sglang, openai",
        ),
    ]:
        with pytest.raises(InvalidInput, match=problem):
            backend_options(name, kw)


def test_error_messages_are_read_from_every_servers_shape():
    def msg(status: int, **kw) -> str:
        return server_message(httpx.Response(status, **kw))

    assert msg(400, json={"error": {"message": "too long", "code": 400}}) == "too long"  # vLLM, SGLang
    assert msg(400, json={"object": "error", "message": "old vllm"}) == "old vllm"
    assert msg(422, json={"detail": [{"msg": "field required"}]}) == '[{"msg": "field required"}]'
    assert msg(502, text="<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"


# ---------------------------------------------------------------------- the precompute job


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, tiny_llama_dir) -> tuple[Path, Path]:
    """Rollouts and the store the transformers backend makes of them."""
    root = tmp_path_factory.mktemp("http-ref")
    rollouts = write_rollouts(root / "r.jsonl", 12, seed=7)
    cfg = PrecomputeConfig(
        rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=root / "store",
        dataset="ds", samples_per_part=4, progress=False,
    )  # fmt: skip
    run_precompute(cfg)
    return rollouts, root / "store"


def _teacher_logprobs(store: Path) -> list[np.ndarray]:
    table = Store(store).open("ds").read_all()
    return [np.asarray(v, np.float32) for v in table["teacher_logprobs"].to_pylist()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_precompute_through_the_cli_equals_the_transformers_store(
    tmp_path, server, tiny_llama_dir, reference_store, backend
):
    rollouts, reference = reference_store
    args = [
        "precompute", str(rollouts), "--teacher", str(tiny_llama_dir), "--sft-teacher", str(tiny_llama_dir),
        "--store", str(tmp_path / "store"), "--dataset", "ds", "--samples-per-part", "4", "--no-progress",
        "--backend", backend, "--teacher-url", server.url, "--max-concurrency", "3",
    ]  # fmt: skip
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "published: ds v1: 12 samples" in out.output
    got, want = _teacher_logprobs(tmp_path / "store"), _teacher_logprobs(reference)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    prov = Store(tmp_path / "store").open("ds").manifest.provenance
    assert (prov.backend, prov.dtype, prov.consistency.verdict) == (backend, "server", "consistent")
    # and the server confirms the transformers store (lopd verify against another backend)
    options = backend_options(backend, {"teacher_url": server.url})
    report = verify_dataset(
        VerifyConfig(store=reference, dataset="ds", teacher=tiny_llama_dir, samples=5, backend=options)
    )
    assert report.passed and report.max_abs_diff < 1e-4


def test_a_failed_part_writes_nothing_and_the_rerun_resumes(tmp_path, server, tiny_llama_dir, reference_store):
    rollouts, reference = reference_store
    cfg = PrecomputeConfig(
        rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=tmp_path / "store",
        dataset="ds", samples_per_part=4, progress=False,
        backend=backend_options("sglang", {"teacher_url": server.url, "max_concurrency": 1}),
    )  # fmt: skip
    # requests: the load probe, part 0 (r0000-r0003), then r0004; r0005 is refused
    server.reset(refuse_from=6)
    with pytest.raises(TeacherServerError, match=r"sample 'r0005' \(part 1\): record 1: .*HTTP 400.*injected"):
        run_precompute(cfg)
    ((_, plan),) = list_staging_plans(tmp_path / "store", "ds")
    assert Staging(tmp_path / "store", "ds", plan.run_key).completed_parts(plan) == {0}
    server.reset()
    result = run_precompute(cfg)
    assert result.status == "published" and result.parts_scored == 2
    for a, b in zip(_teacher_logprobs(tmp_path / "store"), _teacher_logprobs(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_another_backend_does_not_resume_these_parts(tmp_path, server, tiny_llama_dir, reference_store):
    rollouts, _ = reference_store
    common = dict(
        rollouts=[rollouts], teacher=tiny_llama_dir, sft_teacher=str(tiny_llama_dir), store=tmp_path / "store",
        dataset="ds", samples_per_part=4, progress=False, publish=False,
    )  # fmt: skip
    first = run_precompute(PrecomputeConfig(backend={"name": "sglang", "teacher_url": server.url}, **common))
    second = run_precompute(PrecomputeConfig(backend={"name": "openai", "teacher_url": server.url}, **common))
    assert first.run_key != second.run_key and second.parts_scored == 3  # scored again, not mixed in


def test_the_server_backends_import_without_torch():
    code = (
        "import sys, lopd.server.teachers.sglang_backend, lopd.server.teachers.openai_backend;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
