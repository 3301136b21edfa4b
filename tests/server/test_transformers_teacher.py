"""The transformers teacher against the naive reference: exact, order-preserving, frugal, guarded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lopd.server.teachers.transformers_backend as backend_mod
from lopd.errors import InvalidInput
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.teachers import Teacher, backend_options, load_teacher
from lopd.server.teachers.transformers_backend import TransformersTeacher
from tests.utils.naive import naive_logprobs

ATOL = 1e-4
N_TOKENS = 99  # real (non-special) ids of the tiny tokenizer lie in [8, 104]; any id < 105 is valid


def _records(spec: list[tuple[int, int]], seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, N_TOKENS, p).tolist() for p, _ in spec]
    responses = [rng.integers(0, N_TOKENS, r).tolist() for _, r in spec]
    return prompts, responses


def _assert_matches_naive(teacher: TransformersTeacher, prompts: Any, responses: Any, got: Any) -> None:
    assert len(got) == len(prompts)
    for i, (p, r, g) in enumerate(zip(prompts, responses, got)):
        ref = naive_logprobs(teacher.model, p, r, temperature=teacher.info.temperature)
        assert g.dtype == np.float32 and g.shape == (len(r),), i
        np.testing.assert_allclose(g, ref, atol=ATOL, rtol=0, err_msg=f"record {i}")


@pytest.fixture()
def batch_spy(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """Records every batch plan the backend makes."""
    plans: list[list[list[int]]] = []
    original = backend_mod.plan_batches

    def spy(*args: Any, **kwargs: Any) -> list[list[int]]:
        plan = original(*args, **kwargs)
        plans.append(plan)
        return plan

    monkeypatch.setattr(backend_mod, "plan_batches", spy)
    return plans


@pytest.fixture(scope="module")
def llama_teacher(tiny_llama_dir: Path) -> TransformersTeacher:
    return TransformersTeacher(tiny_llama_dir)


# Very different lengths in one batch: if padding leaked into real positions, short rows would show it.
MIXED = [(1, 400), (5, 1), (300, 7), (1, 1), (300, 400)]


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_exact_on_one_mixed_length_batch(
    arch_dir: str, request: pytest.FixtureRequest, batch_spy: list[list[list[int]]]
) -> None:
    teacher = TransformersTeacher(request.getfixturevalue(arch_dir))
    prompts, responses = _records(MIXED, seed=1)
    got = teacher.score(prompts, responses)
    assert [len(b) for b in batch_spy[-1]] == [len(MIXED)]  # really one padded batch
    _assert_matches_naive(teacher, prompts, responses, got)


def test_many_batches_several_chunks_and_temperature(tiny_qwen2_dir: Path, batch_spy: list[list[list[int]]]) -> None:
    teacher = TransformersTeacher(
        tiny_qwen2_dir, temperature=0.7, max_batch_tokens=64, max_batch_size=3, head_chunk_bytes=5 * 128 * 4
    )
    spec = [(1, 1), (3, 20), (40, 2), (1, 90), (7, 7), (2, 3), (15, 15), (60, 30), (4, 1), (1, 5), (9, 12)]
    prompts, responses = _records(spec, seed=2)
    got = teacher.score(prompts, responses)
    plan = batch_spy[-1]
    assert len(plan) >= 6 and any(len(b) > 1 for b in plan)
    assert [i for b in plan for i in b] != list(range(len(spec)))  # regrouped, yet returned in input order
    _assert_matches_naive(teacher, prompts, responses, got)


def test_head_sees_only_response_rows_in_bounded_chunks(tiny_llama_dir: Path) -> None:
    chunk_rows = 16
    teacher = TransformersTeacher(tiny_llama_dir, head_chunk_bytes=chunk_rows * 128 * 4, max_batch_tokens=512)
    seen: list[tuple[int, ...]] = []
    hook = teacher.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: seen.append(tuple(args[0].shape))
    )
    try:
        prompts, responses = _records([(200, 3), (1, 50), (30, 30), (100, 1)], seed=3)
        got = teacher.score(prompts, responses)
    finally:
        hook.remove()
    assert all(len(shape) == 2 for shape in seen)  # flattened rows, never [batch, seq, hidden]
    assert max(shape[0] for shape in seen) <= chunk_rows
    assert sum(shape[0] for shape in seen) == sum(len(r) for r in responses)  # no prompt position
    assert len(seen) > 1
    _assert_matches_naive(teacher, prompts, responses, got)


def test_results_do_not_depend_on_grouping(llama_teacher: TransformersTeacher) -> None:
    prompts, responses = _records([(3, 9), (50, 4), (1, 30)], seed=4)
    together = llama_teacher.score(prompts, responses)
    for i in range(3):
        alone = llama_teacher.score([prompts[i]], [responses[i]])[0]
        np.testing.assert_allclose(alone, together[i], atol=1e-5, rtol=0)
    reversed_ = llama_teacher.score(prompts[::-1], responses[::-1])
    for a, b in zip(reversed_[::-1], together):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    as_arrays = llama_teacher.score([np.array(p) for p in prompts], [np.array(r) for r in responses])
    for a, b in zip(as_arrays, together):
        np.testing.assert_array_equal(a, b)
    assert llama_teacher.score([], []) == []


def test_info_and_protocol(llama_teacher: TransformersTeacher, tiny_llama_dir: Path, tokenizer: Any) -> None:
    info = llama_teacher.info
    assert isinstance(llama_teacher, Teacher)
    assert info.fingerprint == model_fingerprint(tiny_llama_dir)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert info.architecture == "LlamaForCausalLM"
    assert info.vocab_size == len(tokenizer) == 105
    assert info.max_context == 1024
    assert (info.dtype, info.backend, info.device, info.temperature) == ("float32", "transformers", "cpu", 1.0)
    assert info.revision is None
    assert info.name_or_path == str(tiny_llama_dir)


def test_revision_is_read_from_a_hub_snapshot(tiny_llama_dir: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / commit
    shutil.copytree(tiny_llama_dir, snapshot)
    assert load_teacher(backend_options("transformers"), snapshot).info.revision == commit
    assert TransformersTeacher(snapshot, revision="main").info.revision == "main"


@pytest.mark.parametrize(
    ("prompts", "responses", "match"),
    [
        ([[]], [[1, 2]], "record 0: prompt must be a non-empty"),
        ([[1], [1]], [[1, 2], []], "record 1: response must be a non-empty"),
        ([[1, 105]], [[1]], "token id 105 outside"),
        ([[1]], [[-1]], "token id -1 outside"),
        ([[1]], [[1.5]], "must be integers"),
        ([[1], [2]], [[1]], "2 prompts but 1 responses"),
        ([[1] * 1000], [[1] * 25], "exceed the teacher's context of 1024"),
    ],
)
def test_invalid_records(llama_teacher: TransformersTeacher, prompts: Any, responses: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llama_teacher.score(prompts, responses)


def test_invalid_settings(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="available backends: transformers"):
        backend_options("vllm-nope")
    with pytest.raises(InvalidInput, match="float32"):
        TransformersTeacher(tiny_llama_dir, dtype="int8")
    with pytest.raises(InvalidInput, match="temperature"):
        TransformersTeacher(tiny_llama_dir, temperature=0.0)
    with pytest.raises(InvalidInput, match="--max-batch-tokens: Input should be greater than or equal to 1"):
        TransformersTeacher(tiny_llama_dir, max_batch_tokens=0)
    with pytest.raises(InvalidInput, match="--head-chunk-bytes"):
        TransformersTeacher(tiny_llama_dir, head_chunk_bytes=0)
    with pytest.raises(InvalidInput, match="--tensor-parallel-size is not an option"):
        TransformersTeacher(tiny_llama_dir, tensor_parallel_size=2)
    with pytest.raises(InvalidInput, match="does not exist"):
        TransformersTeacher(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="no config.json"):
        TransformersTeacher(tmp_path)


def test_self_check_rejects_config_the_model_ignores(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Softcapping declared in the config but not applied by the model: the two paths disagree."""
    tampered = shutil.copytree(tiny_llama_dir, tmp_path / "tampered")
    config = json.loads((tampered / "config.json").read_text())
    config["final_logit_softcapping"] = 2.0
    (tampered / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidInput, match="unsupported head post-processing in LlamaForCausalLM"):
        TransformersTeacher(tampered)


def test_self_check_rejects_a_head_it_does_not_know(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose forward transforms logits in a way this backend does not reproduce."""
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward

    def scaled_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled_forward)
    with pytest.raises(InvalidInput, match="unsupported head post-processing"):
        TransformersTeacher(tiny_llama_dir)


def test_bfloat16_is_close_to_float32(tiny_llama_dir: Path, llama_teacher: TransformersTeacher) -> None:
    teacher = TransformersTeacher(tiny_llama_dir, dtype="bfloat16")
    assert teacher.info.dtype == "bfloat16"
    prompts, responses = _records([(5, 40), (60, 3), (1, 20)], seed=5)
    got = teacher.score(prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        ref = naive_logprobs(llama_teacher.model, p, r)  # the float32 model
        assert g.dtype == np.float32 and np.isfinite(g).all()
        assert np.abs(g - ref).max() < 0.5
        assert np.abs(g - ref).mean() < 0.1


def test_close_releases_the_model(tiny_llama_dir: Path) -> None:
    teacher = TransformersTeacher(tiny_llama_dir)
    teacher.close()
    with pytest.raises(RuntimeError, match="closed"):
        teacher.score([[1]], [[2]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_matches_cpu_naive(tiny_llama_dir: Path, llama_teacher: TransformersTeacher, dtype: str) -> None:
    teacher = TransformersTeacher(tiny_llama_dir, device="cuda", dtype=dtype, head_chunk_bytes=8 * 128 * 4)
    assert teacher.info.device.startswith("cuda")
    prompts, responses = _records(MIXED, seed=6)
    got = teacher.score(prompts, responses)
    # TF32 matmuls and other kernels make CUDA float32 slightly less exact than CPU.
    atol = 2e-3 if dtype == "float32" else 0.5
    for p, r, g in zip(prompts, responses, got):
        ref = naive_logprobs(llama_teacher.model, p, r)
        np.testing.assert_allclose(g, ref, atol=atol, rtol=0)
    assert torch.cuda.is_available()


@pytest.mark.slow
def test_fused_head_matches_naive(tiny_llama_dir: Path, llama_teacher: TransformersTeacher) -> None:
    # The torch.compile'd normalisation (the CUDA default) on CPU, with small head chunks so several are fused.
    teacher = TransformersTeacher(tiny_llama_dir, fused_head=True, head_chunk_bytes=8 * 128 * 4, temperature=0.7)
    assert teacher._fused is not None, "torch.compile is unavailable here; the fused path was not exercised"
    prompts, responses = _records(MIXED, seed=8)
    got = teacher.score(prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        np.testing.assert_allclose(g, naive_logprobs(llama_teacher.model, p, r, temperature=0.7), atol=ATOL, rtol=0)


def test_fused_head_falls_back_to_eager_when_it_cannot_compile(
    tiny_llama_dir: Path, llama_teacher: TransformersTeacher, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    teacher = TransformersTeacher(tiny_llama_dir, fused_head=True)
    assert teacher._fused is None and "fused LM-head normalisation unavailable" in caplog.text
    prompts, responses = _records([(4, 9), (7, 3)], seed=9)
    for p, r, g in zip(prompts, responses, teacher.score(prompts, responses)):
        np.testing.assert_allclose(g, naive_logprobs(llama_teacher.model, p, r), atol=ATOL, rtol=0)
