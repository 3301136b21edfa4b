"""Online OPD samples from the current student, scores with the live teacher, and updates the student."""

from __future__ import annotations

from pathlib import Path

import torch

from lopd.pipeline import lm
from lopd.pipeline.online_opd import OnlineOPDConfig, train_online_opd
from lopd.server.teachers.transformers_backend import TransformersTeacher
from lopd.testing import build_tiny_model


class CountingTeacher:
    """The real teacher, recording what it was asked to score."""

    def __init__(self, model_dir: Path) -> None:
        self.inner = TransformersTeacher(model_dir)
        self.calls: list[tuple[list[list[int]], list[list[int]]]] = []

    def score(self, prompts, responses):
        self.calls.append(([list(p) for p in prompts], [list(r) for r in responses]))
        return self.inner.score(prompts, responses)


def test_online_opd_scores_fresh_samples_every_step(tiny_llama_b_dir: Path, tmp_path: Path):
    # The student's vocabulary is exactly the tokenizer's, so every sampled id is a real token.
    student = build_tiny_model(tmp_path / "student", "llama", seed=5, hidden=32, layers=1, pad_vocab=False)
    teacher = CountingTeacher(tiny_llama_b_dir)
    _, tok = lm.load(student)
    prompts = [lm.encode_prompt(tok, f"{i}+{i}=") for i in range(10, 22)]
    steps: list[int] = []
    result = train_online_opd(
        student, teacher, prompts, OnlineOPDConfig(steps=3, batch_size=4, lr=1e-3, max_new_tokens=6),
        out=tmp_path / "out", on_step=lambda step, model: steps.append(step), progress=False,
    )  # fmt: skip
    assert steps == [1, 2, 3] and len(teacher.calls) == 3
    scored = sum(len(p) + len(r) for ps, rs in teacher.calls for p, r in zip(ps, rs))
    assert result.teacher_forward_tokens == scored > 0
    assert result.sampled_tokens == sum(len(r) for _, rs in teacher.calls for r in rs)
    assert all(len(ps) == 4 for ps, _ in teacher.calls)
    before, _ = lm.load(student)
    after, _ = lm.load(tmp_path / "out")
    changed = [not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters())]
    assert any(changed)
