"""What the demo prints (and records in results.json) when a consistency gate refuses: the reason, whole."""

from __future__ import annotations

import pytest

from lopd.client.consistency import check_dataset_for_training
from lopd.client.types import DatasetInfo
from lopd.errors import TeacherMismatch
from lopd.pipeline.run import refusal_reason
from lopd.server.precompute import PrecomputeConfig, run_precompute
from tests.server.test_precompute import write_rollouts

A, B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def test_the_trainer_refusal_keeps_each_problem_whole():
    info = DatasetInfo(
        name="seed0-teacher-B", version=1, content_hash="sha256:" + "c" * 64, num_samples=4, num_response_tokens=9,
        teacher_fingerprint=B, tokenizer_fingerprint=None, sft_teacher_fingerprint=A, verdict="inconsistent",
        mismatch_allowed=True,
    )  # fmt: skip
    with pytest.raises(TeacherMismatch) as refused:
        check_dataset_for_training(info, sft_teacher=A)
    reason = refusal_reason(str(refused.value))
    assert reason == (
        "dataset 'seed0-teacher-B' v1 is marked inconsistent: it was scored by teacher sha256:bbbbbbbbbbbb, but the "
        "student's SFT data came from sha256:aaaaaaaaaaaa (built with --allow-teacher-mismatch)"
    )
    # (The demo used to print the first 110 characters: "...is marked inconsistent: it...".)


def test_the_precompute_refusal_is_its_first_sentence_whole(tmp_path, tiny_llama_dir, tiny_llama_b_dir):
    cfg = PrecomputeConfig(
        rollouts=[write_rollouts(tmp_path / "r.jsonl", 3)], teacher=tiny_llama_b_dir, sft_teacher=str(tiny_llama_dir),
        store=tmp_path / "store", dataset="b", progress=False,
    )  # fmt: skip
    with pytest.raises(TeacherMismatch) as refused:
        run_precompute(cfg)
    reason = refusal_reason(str(refused.value))
    assert reason.startswith(f"refusing to score with teacher {tiny_llama_b_dir} (sha256:")
    assert f"the student's SFT data came from {tiny_llama_dir} (sha256:" in reason and reason.endswith(").")
    assert str(refused.value).startswith(reason[:-1] + ". ")


def test_a_message_without_structure_is_kept_whole():
    assert refusal_reason("no sentence end here") == "no sentence end here"
    assert refusal_reason("one line:\nthen prose. More.") == "one line:\nthen prose."
