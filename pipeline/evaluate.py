"""Held-out evaluation: exact-match accuracy (greedy), and KLs on the student's own fresh samples.

Accuracy is what a user cares about. The reverse KL to the teacher, `E_{y ~ student}[log
p_student(y) - log p_teacher(y)]` per token, is what on-policy distillation minimises; the KL to
the SFT checkpoint on the same samples measures drift away from where training started (the
paper credits offline OPD with an implicit regularisation against it). Both are measured on
fresh samples, never on the training rollouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import lm
from .task import Problem, grade


@dataclass
class Evaluation:
    accuracy: float  # greedy decoding, exact match of the final answer
    reverse_kl: float  # to the teacher, nats per response token, on samples at temperature 1
    kl_to_sft: float  # to the SFT checkpoint, on the same samples
    sampled_accuracy: float  # exact match of those temperature-1 samples (pass@1)
    correct: str  # greedy correctness per problem, "0"/"1" in problem order (for paired statistics)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def correctness(tok: Any, responses: Sequence[Sequence[int]], problems: Sequence[Problem]) -> list[bool]:
    return [grade(lm.decode_response(tok, r), p) for r, p in zip(responses, problems)]


def exact_match(tok: Any, responses: Sequence[Sequence[int]], problems: Sequence[Problem]) -> float:
    """Share of responses whose final answer is right."""
    return float(np.mean(correctness(tok, responses, problems)))


def greedy_correct(model: Any, tok: Any, problems: Sequence[Problem], *, max_new_tokens: int) -> list[bool]:
    prompts = [lm.encode_prompt(tok, p.prompt) for p in problems]
    responses, _ = lm.sample(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens)
    return correctness(tok, responses, problems)


def greedy_accuracy(model: Any, tok: Any, problems: Sequence[Problem], *, max_new_tokens: int) -> float:
    return float(np.mean(greedy_correct(model, tok, problems, max_new_tokens=max_new_tokens)))


def evaluate(
    model: Any,
    tok: Any,
    problems: Sequence[Problem],
    teacher: Any,
    sft: Any,
    *,
    kl_samples: int,
    seed: int,
    max_new_tokens: int,
) -> Evaluation:
    """Evaluate `model` on `problems`; `teacher` and `sft` are `Teacher`s (token ids in, log-probs out)."""
    correct = greedy_correct(model, tok, problems, max_new_tokens=max_new_tokens)
    kl_prompts = [lm.encode_prompt(tok, p.prompt) for p in problems[:kl_samples]]
    sampled, student_lp = lm.sample(model, tok, kl_prompts, max_new_tokens=max_new_tokens, seed=seed)
    student = np.concatenate([s.astype(np.float64) for s in student_lp])
    teacher_lp = np.concatenate(teacher.score(kl_prompts, sampled)).astype(np.float64)
    sft_lp = np.concatenate(sft.score(kl_prompts, sampled)).astype(np.float64)
    return Evaluation(
        accuracy=float(np.mean(correct)),
        reverse_kl=float((student - teacher_lp).mean()),
        kl_to_sft=float((student - sft_lp).mean()),
        sampled_accuracy=exact_match(tok, sampled, problems[:kl_samples]),
        correct="".join("1" if c else "0" for c in correct),
    )
