"""Rollout files: the three record forms, every bad-record reason, read-back, fingerprints."""

from __future__ import annotations

import gzip
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lopd.errors import InvalidInput
from lopd.server.rollouts import (
    RecordRef,
    expand_rollout_paths,
    load_rollouts,
    rollout_files_fingerprint,
    scan_rollouts,
)
from lopd.testing import build_tokenizer

MAX_CONTEXT = 64


# --------------------------------------------------------------------------------------- helpers


def write_jsonl(path: Path, records: list[Any]) -> Path:
    """Records are dicts (dumped as JSON) or raw strings (written as the line itself)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_parquet(path: Path, records: list[dict[str, Any]], row_group_size: int = 3) -> Path:
    keys = list(dict.fromkeys(k for r in records for k in r))  # every field of any record, nulls elsewhere
    table = pa.table({k: [r.get(k) for r in records] for k in keys})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_any(path: Path, records: list[dict[str, Any]]) -> Path:
    if path.name.endswith(".parquet"):
        return write_parquet(path, records)
    return write_jsonl(path, records)


def f32(xs: list[float]) -> list[float]:
    """Floats that survive float32 exactly, as written by a sampler that logs float32 log-probs."""
    return [float(np.float32(x)) for x in xs]


def scan(paths: Any, tok: Any, **kw: Any):  # type: ignore[no-untyped-def]
    kw.setdefault("vocab_size", len(tok) if tok is not None else 105)
    kw.setdefault("max_context", MAX_CONTEXT)
    return scan_rollouts(paths if isinstance(paths, list) else [paths], tok, **kw)


@pytest.fixture(scope="module")
def ids(tokenizer: Any) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "<|user|>", "<|assistant|>", "<|end|>")}


def three_forms() -> list[dict[str, Any]]:
    return [
        {
            "id": "tok",
            "prompt_ids": [1, 20, 21],
            "response_ids": [30, 31, 7],
            "rollout_logprobs": f32([-0.1, -2.5, 0.0]),
        },
        {
            "id": "chat",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo!"},
            ],
        },
        {"id": "text", "prompt": "2+2=", "response": "4"},
        {"id": "tok2", "prompt_ids": [1], "response_ids": [40]},
    ]


# ---------------------------------------------------------------------------------- good records


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz", "r.parquet"])
def test_three_forms_scan_and_load(tmp_path: Path, tokenizer: Any, ids: dict[str, int], name: str) -> None:
    path = write_any(tmp_path / name, three_forms())
    s = scan(path, tokenizer)
    assert s.problems == []
    assert s.total == 4
    assert [r.id for r in s.records] == ["tok", "chat", "text", "tok2"]
    assert s.retokenized == 2
    assert [r.retokenized for r in s.records] == [False, True, True, False]
    assert [r.has_rollout_logprobs for r in s.records] == [True, False, False, False]

    got = {r.id: r for r in load_rollouts(s, s.records, tokenizer)}
    assert s.num_tokens == sum(len(r.response_ids) for r in got.values())
    tok = got["tok"]
    assert tok.prompt_ids.dtype == np.int32 and tok.response_ids.dtype == np.int32
    assert tok.prompt_ids.tolist() == [1, 20, 21] and tok.response_ids.tolist() == [30, 31, 7]
    assert tok.rollout_logprobs is not None and tok.rollout_logprobs.dtype == np.float32
    assert tok.rollout_logprobs.tolist() == f32([-0.1, -2.5, 0.0])
    assert got["tok2"].rollout_logprobs is None

    text = got["text"]
    assert text.prompt_ids.tolist() == tokenizer("2+2=")["input_ids"]
    assert text.response_ids.tolist() == tokenizer("4", add_special_tokens=False)["input_ids"]
    assert text.retokenized

    chat = got["chat"]
    assert chat.prompt_ids[0] == ids["<s>"]
    assert chat.prompt_ids[-1] == ids["<|assistant|>"]  # the generation prompt
    assert chat.response_ids[-1] == ids["<|end|>"]  # the end-of-turn token the policy sampled
    assert tokenizer.decode(chat.response_ids.tolist()) == "yo!<|end|>"
    full = tokenizer.apply_chat_template(three_forms()[1]["messages"], tokenize=False)
    whole = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert chat.prompt_ids.tolist() + chat.response_ids.tolist() == whole


def test_messages_fall_back_to_content_when_prompt_is_not_a_prefix(tmp_path: Path) -> None:
    tok = build_tokenizer()
    # The generation prompt renders differently from how the conversation renders the assistant turn.
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>:{% endif %}"
    )
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    s = scan(write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "messages": msgs}]), tok)
    assert s.problems == [] and s.retokenized == 1
    (r,) = load_rollouts(s, s.records, tok)
    assert tok.decode(r.prompt_ids.tolist()) == "<s><|user|>hi<|end|><|assistant|>:"
    assert r.response_ids.tolist() == tok("yo", add_special_tokens=False)["input_ids"]


def test_integer_ids_aliases_blank_lines_and_bom(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "r.jsonl"
    lines = [
        json.dumps({"id": 7, "prompt_token_ids": [1, 2], "output_token_ids": [3]}),
        "",
        "   ",
        json.dumps({"id": "c", "prompt": "q", "completion": "a", "reward": 1.0, "meta": {"x": 1}}),
        json.dumps({"id": "d", "prompt_ids": [1], "completion_ids": [3], "rollout_logprobs": [-1, 1e-5]}),
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    s = scan(path, tokenizer)
    assert s.total == 3
    assert [r.id for r in s.records] == ["7", "c"]
    assert s.problems == [("d", "rollout_logprobs has 2 values but the response has 1 tokens")]
    r7, rc = load_rollouts(s, s.records, tokenizer)
    assert r7.prompt_ids.tolist() == [1, 2] and r7.response_ids.tolist() == [3]
    assert rc.response_ids.tolist() == tokenizer("a", add_special_tokens=False)["input_ids"]


def test_small_positive_logprob_is_tolerated(tmp_path: Path) -> None:
    recs = [{"id": "a", "prompt_ids": [1], "response_ids": [2, 3], "rollout_logprobs": [5e-5, -1.0]}]
    s = scan(write_jsonl(tmp_path / "r.jsonl", recs), None)
    assert s.problems == [] and s.records[0].has_rollout_logprobs


def test_directory_input_and_path_expansion(tmp_path: Path, tokenizer: Any) -> None:
    d = tmp_path / "in"
    d.mkdir()
    write_parquet(d / "b.parquet", [{"id": "b1", "prompt_ids": [1], "response_ids": [2]}])
    write_jsonl(d / "a.jsonl", [{"id": "a1", "prompt_ids": [1], "response_ids": [2]}])
    write_jsonl(d / "c.jsonl.gz", [{"id": "c1", "prompt_ids": [1], "response_ids": [2]}])
    (d / "_SUCCESS").write_text("")
    write_jsonl(d / ".hidden.jsonl", ["not json"])
    write_jsonl(d / "_tmp.jsonl", ["not json"])
    (d / "sub.jsonl").mkdir()
    (d / "notes.txt").write_text("not rollouts")
    extra = write_jsonl(tmp_path / "z.jsonl", [{"id": "z1", "prompt_ids": [1], "response_ids": [2]}])
    assert expand_rollout_paths([d, extra]) == [d / "a.jsonl", d / "b.parquet", d / "c.jsonl.gz", extra]
    s = scan([d, extra], tokenizer)
    assert [r.id for r in s.records] == ["a1", "b1", "c1", "z1"]
    assert [r.source for r in s.records] == [0, 1, 2, 3]
    assert [r.id for r in load_rollouts(s, s.records[::-1], tokenizer)] == ["z1", "c1", "b1", "a1"]


def test_unusable_paths_raise(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "r.jsonl", [{"id": 1, "prompt_ids": [1], "response_ids": [2]}])
    (tmp_path / "r.csv").write_text("id\n1\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="does not exist"):
        expand_rollout_paths([tmp_path / "nope.jsonl"])
    with pytest.raises(InvalidInput, match="unknown suffix"):
        expand_rollout_paths([tmp_path / "r.csv"])
    with pytest.raises(InvalidInput, match="no rollout files"):
        expand_rollout_paths([tmp_path / "empty"])
    with pytest.raises(InvalidInput, match="more than once"):
        expand_rollout_paths([good, tmp_path])
    with pytest.raises(InvalidInput, match="no rollout files given"):
        expand_rollout_paths([])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InvalidInput, match="bad.parquet"):
        scan_rollouts([tmp_path / "bad.parquet"], None, vocab_size=10, max_context=10)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(InvalidInput, match="bad.jsonl.gz"):
        scan_rollouts([tmp_path / "bad.jsonl.gz"], None, vocab_size=10, max_context=10)
    with pytest.raises(InvalidInput, match="max_context"):
        scan_rollouts([good], None, vocab_size=10, max_context=0)


def test_load_arbitrary_subset_in_arbitrary_order(tmp_path: Path) -> None:
    rng = random.Random(0)
    vocab = 1000

    def rec(i: int) -> dict[str, Any]:
        n = rng.randint(1, 40)
        r: dict[str, Any] = {
            "id": f"r{i}",
            "prompt_ids": [rng.randrange(vocab) for _ in range(rng.randint(1, 30))],
            "response_ids": [rng.randrange(vocab) for _ in range(n)],
        }
        if rng.random() < 0.7:
            r["rollout_logprobs"] = f32([-rng.expovariate(1.0) for _ in range(n)])
        return r

    written = [rec(i) for i in range(90)]
    files = [
        write_jsonl(tmp_path / "a.jsonl", written[:30]),
        write_parquet(tmp_path / "b.parquet", written[30:60], row_group_size=7),
        write_jsonl(tmp_path / "c.jsonl.gz", written[60:]),
    ]
    s = scan_rollouts(files, None, vocab_size=vocab, max_context=100)
    assert s.problems == [] and len(s.records) == 90
    by_id = {w["id"]: w for w in written}
    refs = rng.sample(s.records, 40) + [s.records[5], s.records[5]]  # a repeated ref is read twice
    for got, ref in zip(load_rollouts(s, refs, None), refs):
        w = by_id[ref.id]
        assert got.id == ref.id
        assert got.prompt_ids.dtype == np.int32 and got.prompt_ids.tolist() == w["prompt_ids"]
        assert got.response_ids.tolist() == w["response_ids"]
        if "rollout_logprobs" in w:
            assert got.rollout_logprobs is not None and got.rollout_logprobs.dtype == np.float32
            assert np.array_equal(got.rollout_logprobs, np.array(w["rollout_logprobs"], dtype=np.float32))
        else:
            assert got.rollout_logprobs is None
    assert load_rollouts(s, [], None) == []


def test_parquet_native_types_and_row_groups(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([10, 11, 12, 13, 14], pa.int64()),
            "prompt_ids": pa.array([[1], [1, 2], [1], None, [3]], pa.list_(pa.int32())),
            "response_ids": pa.array([[5], [6, 7], [], [8], [2**40]], pa.large_list(pa.int64())),
            "rollout_logprobs": pa.array([[-0.5], None, None, None, None], pa.list_(pa.float32())),
            "big_unrelated_column": pa.array(["x" * 100] * 5),
        }
    )
    path = tmp_path / "r.parquet"
    pq.write_table(table, path, row_group_size=2)
    s = scan_rollouts([path], None, vocab_size=10, max_context=10)
    assert [r.id for r in s.records] == ["10", "11"]
    assert [p[0] for p in s.problems] == ["12", "13", "14"]
    assert "response is empty" in s.problems[0][1]
    assert "no prompt_ids" in s.problems[1][1]
    assert "response_ids[0] = 1099511627776 is outside the vocabulary [0, 10)" in s.problems[2][1]
    a, b = load_rollouts(s, s.records[::-1], None)
    assert (a.id, a.prompt_ids.tolist(), a.response_ids.tolist(), a.rollout_logprobs) == ("11", [1, 2], [6, 7], None)
    assert b.rollout_logprobs is not None and b.rollout_logprobs.tolist() == [-0.5]


def test_messages_in_parquet(tmp_path: Path, tokenizer: Any) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = write_parquet(tmp_path / "r.parquet", [{"id": "m", "messages": msgs}])
    s = scan(path, tokenizer)
    (r,) = load_rollouts(s, s.records, tokenizer)
    assert tokenizer.decode(r.response_ids.tolist()) == "yo<|end|>"


# --------------------------------------------------------------------- vLLM RequestOutput lines


def request_output(
    request_id: Any, prompt_ids: list[int], outputs: list[tuple[list[int], list[float] | None]], **extra: Any
) -> dict[str, Any]:
    """A `vllm.RequestOutput` as users dump it: the sampled token's entry plus other top-k candidates per position,
    keyed by token id (integer keys, which `json.dumps` writes as strings, as any JSON dump of vLLM's dicts does)."""
    outs = []
    for i, (tokens, lps) in enumerate(outputs):
        logprobs = None
        if lps is not None:
            logprobs = [
                {
                    tok: {"logprob": lp, "rank": 2, "decoded_token": "x"},
                    (tok + 1) % 100: {"logprob": -0.01, "rank": 1, "decoded_token": "y"},
                }
                for tok, lp in zip(tokens, lps)
            ]
        outs.append(
            {
                "index": i,
                "text": "ignored",
                "token_ids": tokens,
                "cumulative_logprob": sum(lps) if lps else None,
                "logprobs": logprobs,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        )
    rec: dict[str, Any] = {"request_id": request_id, "prompt": "not re-tokenized", "prompt_token_ids": prompt_ids}
    rec.update(outputs=outs, finished=True, prompt_logprobs=None, **extra)
    return rec


@pytest.mark.parametrize("name", ["r.jsonl", "r.jsonl.gz"])
def test_vllm_request_outputs_become_one_record_per_output(tmp_path: Path, name: str) -> None:
    lp = f32([-0.25, -1.5, -0.0625])
    lines = [
        request_output("17", [1, 20, 21], [([30, 31, 7], lp), ([40, 41], f32([-2.0, -0.5]))]),
        {"id": "flat", "prompt_ids": [1], "response_ids": [5], "outputs": "a flat record's own field"},
        request_output(18, [1, 22], [([50], None)]),
        request_output(None, [1, 23], [([60, 61], None)]),  # no request_id: the line locates it
        request_output("r", [1, 24], [([70], None)], id="mine"),  # an explicit id wins over request_id
    ]
    path = write_any(tmp_path / name, lines)
    s = scan(path, None)  # no tokenizer: nothing is re-tokenized (the prompt text is ignored)
    assert s.problems == []
    assert s.total == 6
    assert [r.id for r in s.records] == ["17/0", "17/1", "flat", "18/0", f"{name}:4/0", "mine/0"]
    assert [r.output for r in s.records] == [0, 1, None, 0, 0, 0]
    assert [r.has_rollout_logprobs for r in s.records] == [True, True, False, False, False, False]
    assert s.retokenized == 0 and s.num_tokens == 3 + 2 + 1 + 1 + 2 + 1

    got = {r.id: r for r in load_rollouts(s, s.records[::-1], None)}
    a, b = got["17/0"], got["17/1"]
    assert a.prompt_ids.tolist() == b.prompt_ids.tolist() == [1, 20, 21]
    assert a.response_ids.dtype == np.int32 and a.response_ids.tolist() == [30, 31, 7]
    assert a.rollout_logprobs is not None and a.rollout_logprobs.tolist() == lp  # the sampled token's, not rank 1's
    assert b.response_ids.tolist() == [40, 41] and b.rollout_logprobs is not None
    assert b.rollout_logprobs.tolist() == [-2.0, -0.5]
    assert got["flat"].response_ids.tolist() == [5]
    assert got["18/0"].rollout_logprobs is None
    assert got[f"{name}:4/0"].prompt_ids.tolist() == [1, 23]
    assert [r.id for r in load_rollouts(s, [s.records[1], s.records[1], s.records[0]], None)] == [
        "17/1",
        "17/1",
        "17/0",
    ]


def test_vllm_output_index_and_logprob_variants(tmp_path: Path) -> None:
    rec = request_output("q", [1, 2], [([3, 4], None), ([5], None)])
    rec["outputs"][0]["index"], rec["outputs"][1]["index"] = 7, 2  # e.g. a filtered dump: indices kept
    rec["outputs"][1]["logprobs"] = [{"5": -0.75, "9": -0.1}]  # bare numbers instead of Logprob objects
    s = scan(write_jsonl(tmp_path / "r.jsonl", [rec]), None)
    assert s.problems == [] and [r.id for r in s.records] == ["q/7", "q/2"]
    _, second = load_rollouts(s, s.records, None)
    assert second.rollout_logprobs is not None and second.rollout_logprobs.tolist() == [-0.75]


def test_vllm_request_outputs_in_parquet(tmp_path: Path) -> None:
    recs = [request_output("a", [1, 2], [([3], None), ([4, 5], None)]), request_output("b", [1], [([6], None)])]
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=1)
    s = scan(path, None)
    assert s.problems == [] and [r.id for r in s.records] == ["a/0", "a/1", "b/0"]
    assert [r.response_ids.tolist() for r in load_rollouts(s, s.records[::-1], None)] == [[6], [4, 5], [3]]


def _two_outputs(**changes: Any) -> dict[str, Any]:
    rec = request_output("q", [1, 2], [([30, 31, 7], f32([-0.5, -1.0, -2.0])), ([40], None)])
    for path, value in changes.items():
        *keys, last = path.split(".")
        target: Any = rec
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[int(last) if last.isdigit() else last] = value
    return rec


# (record, expected [(label, substrings of the reason)]); every reason starts with the line's locator.
NESTED_BAD: list[tuple[dict[str, Any], list[tuple[str, list[str]]]]] = [
    (
        _two_outputs(**{"outputs.0.logprobs": [{"30": -0.5}, {"31": -1.0}]}),
        [("q/0", ["outputs[0].logprobs has 2 positions but outputs[0].token_ids has 3 tokens"])],
    ),
    (
        _two_outputs(**{"outputs.0.logprobs.1": {"8": -0.1, "9": -0.2}}),
        [("q/0", ["outputs[0].logprobs[1] has no entry for the sampled token 31 (it has 8, 9)"])],
    ),
    (
        _two_outputs(**{"outputs.0.logprobs.2": {"7": {"logprob": "-1", "rank": 1}}}),
        [("q/0", ["outputs[0].logprobs[2]['7'].logprob is '-1'", "not a number"])],
    ),
    (
        _two_outputs(**{"outputs.0.logprobs.2": {"7": {"logprob": 0.5}}}),
        [("q/0", ["outputs[0].logprobs[2] = 0.5 is positive"])],
    ),
    (_two_outputs(**{"outputs.0.logprobs": {"30": -1.0}}), [("q/0", ["outputs[0].logprobs must be a list"])]),
    (_two_outputs(**{"outputs.0.logprobs.0": [-0.5]}), [("q/0", ["outputs[0].logprobs[0] must be an object"])]),
    (_two_outputs(**{"outputs.1.token_ids": []}), [("q/1", ["outputs[1].token_ids is empty"])]),
    (_two_outputs(**{"outputs.1.token_ids": None}), [("q/1", ["outputs[1] has no token_ids"])]),
    (_two_outputs(**{"outputs.1.token_ids": [40, 105]}), [("q/1", ["outputs[1].token_ids[1] = 105", "[0, 105)"])]),
    (_two_outputs(**{"outputs.1.token_ids": [9] * 70}), [("q/1", ["exceeds the teacher's context of 64 tokens"])]),
    (_two_outputs(**{"outputs.1": "text"}), [("r.jsonl:2 outputs[1]", ["outputs[1] must be an object"])]),
    (_two_outputs(**{"outputs.1.index": -1}), [("r.jsonl:2 outputs[1]", ["outputs[1].index must be a non-negative"])]),
    (
        _two_outputs(prompt_token_ids=None),
        [("q/0", ["needs prompt_token_ids", "not re-tokenized"]), ("q/1", ["needs prompt_token_ids"])],
    ),
    (_two_outputs(prompt_token_ids=[1, -4]), [("q/0", ["prompt_token_ids[1] = -4"]), ("q/1", ["= -4"])]),
    (_two_outputs(outputs=[]), [("q", ["outputs is empty"])]),
    (_two_outputs(outputs={"0": 1}), [("q", ["outputs must be a list of vLLM CompletionOutput objects"])]),
    (_two_outputs(request_id=1.5), [("r.jsonl:2", ["request_id must be a string or an integer"])]),
    (_two_outputs(request_id=" "), [("r.jsonl:2", ["request_id is empty"])]),
]


@pytest.mark.parametrize(("bad", "expected"), NESTED_BAD)
def test_bad_vllm_request_output_names_file_line_and_field(
    tmp_path: Path, tokenizer: Any, bad: dict[str, Any], expected: list[tuple[str, list[str]]]
) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, bad, GOOD | {"id": "good2"}])
    s = scan(path, tokenizer, vocab_size=len(tokenizer))
    assert {r.id for r in s.records} >= {"good", "good2"}
    assert [label for label, _ in s.problems] == [label for label, _ in expected]
    assert len(s.records) + len(s.problems) == s.total
    for (_, reason), (_, parts) in zip(s.problems, expected):
        assert reason.startswith("r.jsonl:2: "), reason
        for part in parts:
            assert part in reason, f"{part!r} not in {reason!r}"
    load_rollouts(s, s.records, tokenizer)  # the usable outputs of a line with a bad one still read back


def test_vllm_request_ids_restarting_in_each_run_are_duplicates(tmp_path: Path) -> None:
    # vllm.LLM numbers its requests from 0 in every run, so two runs' dumps share ids: the first keeps it.
    a = write_jsonl(tmp_path / "a.jsonl", [request_output("0", [1], [([2], None), ([3], None)])])
    b = write_jsonl(tmp_path / "b.jsonl", [request_output("0", [1], [([4], None)])])
    s = scan_rollouts([a, b], None, vocab_size=10, max_context=10)
    assert [r.id for r in s.records] == ["0/0", "0/1"]
    assert s.problems == [
        ("0/0", "duplicate id: b.jsonl:1 outputs[0] repeats the id of a.jsonl:1 outputs[0] (kept)"),
    ]


def test_hugging_face_dataset_files(tmp_path: Path) -> None:
    """`Dataset.to_parquet` writes plain Arrow columns (int64 lists, float64 lists, nulls for missing values) with
    a `huggingface` schema metadata key; `Dataset.to_json` writes JSON Lines through pandas (compact, 10 significant
    digits). `datasets` is not installed here, so both files are written in the same layout directly."""
    rows = [
        {"id": "a", "prompt_ids": [1, 2], "response_ids": [3, 4], "rollout_logprobs": f32([-0.1, -2.5]), "reward": 1.0},
        {"id": "b", "prompt_ids": [1], "response_ids": [5], "rollout_logprobs": None, "reward": 0.0},
        {
            "id": "c",
            "prompt_ids": [1, 9],
            "response_ids": [6, 7, 8],
            "rollout_logprobs": f32([-1, -3e-3, 0]),
            "reward": 0.5,
        },
    ]
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("prompt_ids", pa.list_(pa.int64())),
            ("response_ids", pa.list_(pa.int64())),
            ("rollout_logprobs", pa.list_(pa.float64())),
            ("reward", pa.float64()),
        ],
        metadata={b"huggingface": json.dumps({"info": {"features": {}}}).encode()},
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "hf.parquet", row_group_size=2)
    with (tmp_path / "hf.jsonl").open("w") as f:
        for r in rows:
            lp = r["rollout_logprobs"]
            r = r | {"rollout_logprobs": None if lp is None else [float(f"{x:.10g}") for x in lp]}
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    for name in ("hf.parquet", "hf.jsonl"):
        s = scan(tmp_path / name, None)
        assert s.problems == [] and [r.id for r in s.records] == ["a", "b", "c"]
        got = load_rollouts(s, s.records, None)
        for r, w in zip(got, rows):
            assert r.prompt_ids.tolist() == w["prompt_ids"] and r.response_ids.tolist() == w["response_ids"]
            if w["rollout_logprobs"] is None:
                assert r.rollout_logprobs is None
            else:  # float32 values survive both the float64 column and pandas' 10 digits exactly
                assert r.rollout_logprobs is not None and r.rollout_logprobs.tolist() == w["rollout_logprobs"]
    (tmp_path / "hf.json").write_bytes((tmp_path / "hf.jsonl").read_bytes())
    with pytest.raises(InvalidInput, match=r"Dataset\.to_json .* \.jsonl"):
        expand_rollout_paths([tmp_path / "hf.json"])


# ----------------------------------------------------------------------------------- bad records

GOOD = {"id": "good", "prompt_ids": [1, 2], "response_ids": [3]}
MSGS_OK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]

# (record or raw line, tokenizer kind, expected label, expected substrings of the reason)
BAD_CASES: list[tuple[Any, str, str, list[str]]] = [
    ('{"id": 1, "prompt_ids": [1', "tok", "r.jsonl:2", ["invalid JSON"]),
    ("[1, 2, 3]", "tok", "r.jsonl:2", ["is an array, not a JSON object"]),
    ('"just a string"', "tok", "r.jsonl:2", ["is a string, not a JSON object"]),
    ("null", "tok", "r.jsonl:2", ["is null, not a JSON object"]),
    ({"prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["no id"]),
    ({"id": None, "prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["no id"]),
    ({"id": "", "prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["id is empty"]),
    ({"id": "  ", "prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["id is empty"]),
    ({"id": 1.5, "prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["string or an integer"]),
    ({"id": True, "prompt_ids": [1], "response_ids": [2]}, "tok", "r.jsonl:2", ["string or an integer"]),
    ({"id": "x"}, "tok", "x", ["no rollout", "prompt_ids + response_ids", "messages", "prompt + response"]),
    ({"id": "x", "reward": 1}, "tok", "x", ["no rollout"]),
    ({"id": "x", "prompt_ids": "1 2", "response_ids": [2]}, "tok", "x", ["prompt_ids must be a list", "str"]),
    ({"id": "x", "prompt_ids": [1, 2.5], "response_ids": [2]}, "tok", "x", ["prompt_ids[1] is 2.5", "float"]),
    ({"id": "x", "prompt_ids": [1], "response_ids": [2, True]}, "tok", "x", ["response_ids[1] is True", "bool"]),
    ({"id": "x", "prompt_ids": [1], "response_ids": [2, "3"]}, "tok", "x", ["response_ids[1]", "not an integer"]),
    ({"id": "x", "prompt_ids": [1], "response_ids": [4, 105]}, "tok", "x", ["response_ids[1] = 105", "[0, 105)"]),
    ({"id": "x", "prompt_ids": [1, -1], "response_ids": [4]}, "tok", "x", ["prompt_ids[1] = -1", "vocabulary"]),
    ({"id": "x", "prompt_ids": [1], "response_ids": [2**70]}, "tok", "x", [f"response_ids[0] = {2**70}"]),
    (
        {"id": "x", "prompt_ids": [1], "response_ids": [2], "messages": MSGS_OK},
        "tok",
        "x",
        ["ambiguous", "prompt_ids/response_ids", "messages"],
    ),
    ({"id": "x", "prompt": "a", "response": "b", "messages": MSGS_OK}, "tok", "x", ["ambiguous"]),
    ({"id": "x", "prompt_ids": [1], "response": "b"}, "tok", "x", ["ambiguous"]),
    ({"id": "x", "prompt_ids": [1], "prompt_token_ids": [1], "response_ids": [2]}, "tok", "x", ["mean the same"]),
    ({"id": "x", "prompt_ids": [1]}, "tok", "x", ["has prompt_ids but no response_ids"]),
    ({"id": "x", "response": "b"}, "tok", "x", ["has response but no prompt"]),
    ({"id": "x", "prompt_ids": [1], "response_ids": []}, "tok", "x", ["response is empty"]),
    ({"id": "x", "prompt_ids": [], "response_ids": [2]}, "tok", "x", ["prompt is empty", "context"]),
    ({"id": "x", "prompt": "a", "response": ""}, "tok", "x", ["response is empty"]),
    ({"id": "x", "prompt": "", "response": "b"}, "tok", "x", ["prompt is empty"]),
    ({"id": "x", "prompt": 12, "response": "b"}, "tok", "x", ["prompt must be a string", "int"]),
    (
        {"id": "x", "prompt_ids": [1] * 40, "response_ids": [2] * 30},
        "tok",
        "x",
        ["prompt (40 tokens)", "response (30 tokens)", "70 tokens", f"context of {MAX_CONTEXT} tokens"],
    ),
    (
        {"id": "x", "prompt_ids": [1], "response_ids": [2, 3, 4], "rollout_logprobs": [-1.0, -2.0]},
        "tok",
        "x",
        ["rollout_logprobs has 2 values but the response has 3 tokens"],
    ),
    (
        {"id": "x", "prompt": "a", "response": "bc", "rollout_logprobs": [-1.0]},
        "tok",
        "x",
        ["has 1 values but the response has 2 tokens", "re-tokenized"],
    ),
    (
        '{"id": "x", "prompt_ids": [1], "response_ids": [2, 3], "rollout_logprobs": [-1.0, NaN]}',
        "tok",
        "x",
        ["rollout_logprobs[1]", "not finite"],
    ),
    (
        '{"id": "x", "prompt_ids": [1], "response_ids": [2], "rollout_logprobs": [-Infinity]}',
        "tok",
        "x",
        ["rollout_logprobs[0]", "not finite"],
    ),
    (
        {"id": "x", "prompt_ids": [1], "response_ids": [2], "rollout_logprobs": [-1e300]},
        "tok",
        "x",
        ["not finite (as float32)"],
    ),
    (
        {"id": "x", "prompt_ids": [1], "response_ids": [2, 3], "rollout_logprobs": [-1.0, 0.5]},
        "tok",
        "x",
        ["rollout_logprobs[1] = 0.5 is positive"],
    ),
    (
        {"id": "x", "prompt_ids": [1], "response_ids": [2], "rollout_logprobs": ["-1"]},
        "tok",
        "x",
        ["rollout_logprobs[0]", "not a number"],
    ),
    ({"id": "x", "prompt_ids": [1], "response_ids": [2], "rollout_logprobs": -1.0}, "tok", "x", ["list of numbers"]),
    (
        {"id": "x", "messages": [{"role": "user", "content": "hi"}]},
        "tok",
        "x",
        ["last message must be the assistant turn", "'user'"],
    ),
    ({"id": "x", "messages": []}, "tok", "x", ["messages must be a non-empty list"]),
    ({"id": "x", "messages": "hi"}, "tok", "x", ["messages must be a non-empty list"]),
    ({"id": "x", "messages": [{"role": "assistant"}]}, "tok", "x", ["messages[0]", "'content'"]),
    ({"id": "x", "messages": ["hi"]}, "tok", "x", ["messages[0] must be an object"]),
    ({"id": "x", "prompt": "a", "response": "b"}, "none", "x", ["needs a tokenizer"]),
    ({"id": "x", "messages": MSGS_OK}, "none", "x", ["needs a tokenizer"]),
    ({"id": "x", "messages": MSGS_OK}, "no_template", "x", ["chat template"]),
]


@pytest.mark.parametrize(("bad", "tok_kind", "label", "reasons"), BAD_CASES)
def test_bad_record_is_reported(
    tmp_path: Path, tokenizer: Any, bad: Any, tok_kind: str, label: str, reasons: list[str]
) -> None:
    tok: Any = tokenizer
    if tok_kind == "none":
        tok = None
    elif tok_kind == "no_template":
        tok = build_tokenizer()
        tok.chat_template = None
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, bad, GOOD | {"id": "good2"}])
    s = scan(path, tok, vocab_size=len(tokenizer))
    assert s.total == 3
    assert [r.id for r in s.records] == ["good", "good2"]
    assert len(s.problems) == 1
    got_label, reason = s.problems[0]
    assert got_label == label
    for r in reasons:
        assert r in reason, f"{r!r} not in {reason!r}"


def test_retokenized_ids_outside_the_teacher_vocabulary(tmp_path: Path, tokenizer: Any) -> None:
    z = tokenizer.convert_tokens_to_ids("Z")
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "t", "prompt": "a", "response": "aZ"}])
    s = scan(path, tokenizer, vocab_size=z)
    assert s.problems == [("t", f"re-tokenized response[1] = {z} is outside the vocabulary [0, {z})")]


def test_unicode_garbage_line(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe{}\n")
    s = scan(path, None)
    assert s.problems[0][0] == "r.jsonl:2" and "invalid JSON" in s.problems[0][1]


def test_invalid_json_is_placed_by_file_line_and_column(tmp_path: Path) -> None:
    """`file:LINE: column C: what`: the decoder's own "line 2 column 1" of a one-line record never shows."""
    pretty = json.dumps({"id": "p", "prompt_ids": [1], "response_ids": [2]}, indent=1)  # spread over 9 lines
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join([json.dumps(GOOD), pretty, '{"id": "t", "prompt_ids": [1', json.dumps(GOOD) + ' {"x": 1}']) + "\n"
    )
    s = scan(path, None)
    shown = [f"{label}: {reason}" for label, reason in s.problems]
    end = "a JSONL record is one JSON object on one line (is this one cut short, or spread over several lines?)"
    assert shown[0] == (
        "bad.jsonl:2: column 2 (the end of the line): invalid JSON: Expecting property name enclosed in double "
        f"quotes; {end}"
    )
    assert shown[1] == "bad.jsonl:3: column 6: invalid JSON: Extra data"  # ` "id": "p",` after its first string
    assert shown[-3] == "bad.jsonl:10: column 1: invalid JSON: Expecting value"  # the closing `}`
    assert shown[-2] == f"bad.jsonl:11: column 29 (the end of the line): invalid JSON: Expecting ',' delimiter; {end}"
    assert shown[-1] == f"bad.jsonl:12: column {len(json.dumps(GOOD)) + 2}: invalid JSON: Extra data"
    assert not any("line 2" in line or "char " in line for line in shown)


def test_duplicate_ids_the_first_record_keeps_the_id(tmp_path: Path) -> None:
    def r(rid: Any, **kw: Any) -> dict[str, Any]:
        return {"id": rid, "prompt_ids": [1], "response_ids": [2], **kw}

    a = write_jsonl(tmp_path / "a.jsonl", [r("x"), r("y"), r("x"), r(1), r("z", response_ids=[])])
    b = write_parquet(tmp_path / "b.parquet", [r("x"), r("1"), r("w"), r("z")])
    s = scan_rollouts([a, b], None, vocab_size=10, max_context=10)
    assert [rec.id for rec in s.records] == ["x", "y", "1", "w"]
    assert [rec.source for rec in s.records] == [0, 0, 0, 1]  # "x" and "1" from a.jsonl, where they come first
    assert s.total == 9
    assert [p[0] for p in s.problems] == ["x", "z", "x", "1", "z"]
    reasons = [p[1] for p in s.problems]
    assert reasons[0] == "duplicate id: a.jsonl:3 repeats the id of a.jsonl:1 (kept)"
    assert reasons[1].startswith("response is empty")
    assert reasons[2] == "duplicate id: b.parquet:row 0 repeats the id of a.jsonl:1 (kept)"
    assert reasons[3] == "duplicate id: b.parquet:row 1 repeats the id of a.jsonl:4 (kept)"  # int 1 and "1": one id
    # The first "z" is invalid: it still owns the id, so the later valid "z" is not kept either.
    assert reasons[4] == "duplicate id: b.parquet:row 3 repeats the id of a.jsonl:5 (not kept either: it is invalid)"


def test_many_duplicates_stay_linear_and_name_two_locations(tmp_path: Path) -> None:
    recs = [{"id": "same", "prompt_ids": [1], "response_ids": [2]} for _ in range(50)]
    s = scan(write_jsonl(tmp_path / "r.jsonl", recs), None)
    assert [r.id for r in s.records] == ["same"] and len(s.problems) == 49
    assert s.problems[-1][1] == "duplicate id: r.jsonl:50 repeats the id of r.jsonl:1 (kept)"


def test_locators_use_paths_when_names_collide(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    a = write_jsonl(tmp_path / "p" / "r.jsonl", ["{"])
    b = write_jsonl(tmp_path / "q" / "r.jsonl", [{"prompt_ids": [1]}])
    s = scan([a, b], None)
    assert [p[0] for p in s.problems] == [f"{a}:1", f"{b}:1"]


# ------------------------------------------------------------------------------------ fingerprint


def test_input_fingerprint(tmp_path: Path) -> None:
    recs = [{"id": i, "prompt_ids": [1, 2], "response_ids": [3, 4]} for i in range(5)]
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    b = write_parquet(tmp_path / "b.parquet", recs[:2])
    c = write_jsonl(tmp_path / "c.jsonl.gz", recs[2:])
    files = [a, b, c]
    fp = scan_rollouts(files, None, vocab_size=10, max_context=10).input_fingerprint
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert scan_rollouts(files, None, vocab_size=10, max_context=10).input_fingerprint == fp
    assert rollout_files_fingerprint(files) == fp
    # Validation settings are not part of the input.
    assert scan_rollouts(files, None, vocab_size=4, max_context=3).input_fingerprint == fp
    assert rollout_files_fingerprint([b, a, c]) != fp

    original = a.read_bytes()
    flipped = bytearray(original)
    flipped[original.index(b"[1, 2]") + 1] = ord("2")
    a.write_bytes(bytes(flipped))
    assert scan_rollouts(files, None, vocab_size=10, max_context=10).input_fingerprint != fp
    a.write_bytes(original)
    assert scan_rollouts(files, None, vocab_size=10, max_context=10).input_fingerprint == fp

    # File sizes separate files: the same bytes split differently are a different input.
    whole = a.read_bytes()
    cut = whole.index(b"\n") + 1
    (tmp_path / "x.jsonl").write_bytes(whole[:cut])
    (tmp_path / "y.jsonl").write_bytes(whole[cut:])
    assert rollout_files_fingerprint([tmp_path / "x.jsonl", tmp_path / "y.jsonl"]) != rollout_files_fingerprint([a])


def test_load_detects_changed_file(tmp_path: Path) -> None:
    recs = [{"id": i, "prompt_ids": [1, 2], "response_ids": [3, 4]} for i in range(3)]
    a = write_jsonl(tmp_path / "a.jsonl", recs)
    s = scan_rollouts([a], None, vocab_size=10, max_context=10)
    write_jsonl(a, [recs[0] | {"response_ids": [3]}, recs[1], recs[2]])
    with pytest.raises(InvalidInput, match="scan"):
        load_rollouts(s, s.records[:1], None)
    write_jsonl(a, recs[1:])
    with pytest.raises(InvalidInput, match="changed since it was scanned"):
        load_rollouts(s, s.records[:1], None)


def test_progress_bar_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [{"id": i, "prompt_ids": [1], "response_ids": [2]} for i in range(600)]
    s = scan_rollouts([write_jsonl(tmp_path / "a.jsonl", recs)], None, vocab_size=10, max_context=10, progress=True)
    assert len(s.records) == 600 and s.num_tokens == 600
    assert "scan rollouts" in capsys.readouterr().err


# ------------------------------------------------------------------------------- property: partition

VOCAB, CTX = 10, 6
_good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3)
_any_ids = st.one_of(
    st.lists(st.one_of(st.integers(-2, VOCAB + 1), st.sampled_from([1.5, True, "3"])), max_size=4),
    st.just("oops"),
)
# Ids 10..15 exist as integers and as strings, which are the same id; None, "" and 1.5 are unusable.
_rid = st.sampled_from([*range(16), *(str(i) for i in range(10, 30)), None, "", 1.5])


@st.composite
def _records(draw: Any) -> list[dict[str, Any]]:
    """Mostly valid id-form records, each with at most one thing broken, and frequent duplicate ids."""
    out = []
    for _ in range(draw(st.integers(0, 12))):
        rid = draw(_rid)
        rec: dict[str, Any] = {} if rid is None else {"id": rid}
        rec["prompt_ids"] = draw(_good_ids)
        rec["response_ids"] = draw(_good_ids)
        if draw(st.booleans()):
            rec["rollout_logprobs"] = draw(
                st.lists(
                    st.floats(-20.0, 0.0, width=32),
                    min_size=len(rec["response_ids"]),
                    max_size=len(rec["response_ids"]),
                )
            )
        broken = draw(st.sampled_from([""] * 10 + ["prompt", "response", "no_response", "logprobs", "long"]))
        if broken in ("prompt", "response"):
            rec[f"{broken}_ids"] = draw(_any_ids)
        elif broken == "no_response":
            del rec["response_ids"]
        elif broken == "logprobs":
            rec["rollout_logprobs"] = draw(st.lists(st.floats(-5.0, 1.0, allow_nan=False), max_size=4))
        elif broken == "long":
            rec["prompt_ids"] = rec["prompt_ids"] * 3
        out.append(rec)
    return out


def _ok_ids(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(type(t) is int and 0 <= t < VOCAB for t in v)


def _oracle(records: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(ids of the valid records, labels of the bad ones), computed independently of the scanner."""
    keys: list[str | None] = []
    valid: list[bool] = []
    for rec in records:
        rid = rec.get("id")
        key = str(rid) if type(rid) in (str, int) and str(rid).strip() else None
        ok = key is not None and _ok_ids(rec["prompt_ids"]) and _ok_ids(rec.get("response_ids"))
        if ok:
            ok = len(rec["prompt_ids"]) + len(rec["response_ids"]) <= CTX
        if ok and "rollout_logprobs" in rec:
            lp = rec["rollout_logprobs"]
            ok = len(lp) == len(rec["response_ids"]) and all(x <= 1e-4 for x in lp)
        keys.append(key)
        valid.append(ok)
    counts: dict[str, int] = {}
    for k in keys:
        if k is not None:
            counts[k] = counts.get(k, 0) + 1
    good, bad = [], []
    seen: set[str] = set()
    for line, (k, ok) in enumerate(zip(keys, valid), 1):
        first = k is not None and k not in seen  # the first record with an id owns it, valid or not
        if k is not None:
            seen.add(k)
        if ok and first:
            good.append(k)
        else:
            bad.append(k if k is not None else f"r.jsonl:{line}")
    return good, bad  # type: ignore[return-value]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=_records())
def test_records_and_problems_partition_the_input(records: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = write_jsonl(Path(d) / "r.jsonl", records)
        s = scan_rollouts([path], None, vocab_size=VOCAB, max_context=CTX)
        good, bad = _oracle(records)
        assert s.total == len(records)
        assert [r.id for r in s.records] == good
        assert [p[0] for p in s.problems] == bad
        assert all(reason for _, reason in s.problems)
        assert len(s.records) + len(s.problems) == s.total
        loaded = load_rollouts(s, s.records, None)
        assert [r.id for r in loaded] == good
        assert s.num_tokens == sum(len(r.response_ids) for r in loaded)
        assert all(isinstance(r, RecordRef) for r in s.records)
