"""The pre-training gate refuses the wrong teacher and the wrong tokenizer, unless overridden."""

from __future__ import annotations

import logging

import pytest

from lopd.client.consistency import check_dataset_for_training
from lopd.client.types import DatasetInfo
from lopd.errors import Inconsistent, TeacherMismatch, TokenizerMismatch
from tests.utils.factories import OTHER_FP, TEACHER_FP, TOKENIZER_FP

OTHER_TOKENIZER = "sha256:" + "e" * 64


@pytest.fixture()
def manifest(store_client) -> dict:
    """A consistent manifest as the server serves it (teacher A, SFT teacher A, tokenizer C)."""
    return store_client.manifest("alpha").raw


def _inconsistent(manifest: dict) -> dict:
    m = {**manifest, "provenance": {**manifest["provenance"]}}
    m["provenance"]["sft_teacher_fingerprint"] = OTHER_FP
    m["provenance"]["consistency"] = {**m["provenance"]["consistency"], "teacher_consistent": False}
    return m


def test_consistent_dataset_with_matching_declarations_passes(manifest):
    assert check_dataset_for_training(manifest, student_tokenizer=TOKENIZER_FP, sft_teacher=TEACHER_FP) == []
    assert check_dataset_for_training(DatasetInfo.from_json(manifest)) == []


def test_inconsistent_verdict_is_refused_with_the_reason(manifest):
    with pytest.raises(TeacherMismatch) as e:
        check_dataset_for_training(_inconsistent(manifest), student_tokenizer=TOKENIZER_FP)
    msg = str(e.value)
    assert "marked inconsistent" in msg
    assert "must be the model that generated the student's SFT data" in msg
    assert "biased" in msg and "worse point" in msg and "2604.13010" in msg
    assert "--allow-inconsistent" in msg


def test_declared_sft_teacher_must_match_the_manifest(manifest):
    with pytest.raises(TeacherMismatch, match="you declared the SFT-data teacher sha256:bbbbbbbbbbbb"):
        check_dataset_for_training(manifest, sft_teacher=OTHER_FP)


def test_student_tokenizer_must_match(manifest, tokenizer):
    with pytest.raises(TokenizerMismatch, match="student's tokenizer sha256:eeeeeeeeeeee"):
        check_dataset_for_training(manifest, student_tokenizer=OTHER_TOKENIZER)
    # A tokenizer object is fingerprinted (the tiny tokenizer is not the manifest's "c..." one).
    with pytest.raises(TokenizerMismatch) as e:
        check_dataset_for_training(manifest, student_tokenizer=tokenizer, sft_teacher=TEACHER_FP)
    assert isinstance(e.value, Inconsistent) and "Token ids mean different tokens" in str(e.value)


def test_dataset_summary_shape_is_understood(store_client):
    summary = next(d for d in store_client.datasets() if d.name == "alpha")
    assert check_dataset_for_training(summary.raw, student_tokenizer=TOKENIZER_FP, sft_teacher=TEACHER_FP) == []
    with pytest.raises(TeacherMismatch):
        check_dataset_for_training(summary.raw, sft_teacher=OTHER_FP)


def test_override_returns_the_problems_and_logs_them(manifest, caplog):
    with caplog.at_level(logging.WARNING, logger="lopd.client.consistency"):
        problems = check_dataset_for_training(
            _inconsistent(manifest), student_tokenizer=OTHER_TOKENIZER, sft_teacher=TEACHER_FP, allow_inconsistent=True
        )
    assert len(problems) == 3  # verdict, declared teacher, tokenizer
    assert "training anyway" in caplog.text


def test_real_fingerprints_from_the_served_scored_dataset(store_client, served, tokenizer, tiny_llama_dir):
    info = store_client.manifest("scored")
    assert check_dataset_for_training(info, student_tokenizer=tokenizer, sft_teacher=str(tiny_llama_dir)) == []
