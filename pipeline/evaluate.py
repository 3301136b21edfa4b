"""Held-out evaluation: exact-match accuracy (greedy) and reverse KL to the teacher on the student's own samples.

Accuracy is what a user cares about; the reverse KL, `E_{y ~ student}[log p_student(y) - log
p_teacher(y)]` per token, is the quantity on-policy distillation minimises, measured on fresh
samples (never the training rollouts), so it shows whether training moved the student towards
the teacher or away from it.
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
    reverse_kl: float  # nats per response token, on samples at temperature 1
    sampled_accuracy: float  # exact match of those temperature-1 samples (pass@1)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def exact_match(tok: Any, responses: Sequence[Sequence[int]], problems: Sequence[Problem]) -> float:
    """Share of responses whose final answer is right."""
    return float(np.mean([grade(lm.decode_response(tok, r), p) for r, p in zip(responses, problems)]))


def greedy_accuracy(model: Any, tok: Any, problems: Sequence[Problem], *, max_new_tokens: int) -> float:
    prompts = [lm.encode_prompt(tok, p.prompt) for p in problems]
    responses, _ = lm.sample(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens)
    return exact_match(tok, responses, problems)


def evaluate(
    model: Any,
    tok: Any,
    problems: Sequence[Problem],
    teacher: Any,
    *,
    kl_samples: int,
    seed: int,
    max_new_tokens: int,
) -> Evaluation:
    """Evaluate `model` on `problems`; `teacher` is a `Teacher` (token ids in, log-probs out)."""
    accuracy = greedy_accuracy(model, tok, problems, max_new_tokens=max_new_tokens)
    kl_prompts = [lm.encode_prompt(tok, p.prompt) for p in problems[:kl_samples]]
    sampled, student_lp = lm.sample(model, tok, kl_prompts, max_new_tokens=max_new_tokens, seed=seed)
    teacher_lp = teacher.score(kl_prompts, sampled)
    gap = np.concatenate([s.astype(np.float64) - t for s, t in zip(student_lp, teacher_lp)])
    sampled_accuracy = exact_match(tok, sampled, problems[:kl_samples])
    return Evaluation(accuracy=accuracy, reverse_kl=float(gap.mean()), sampled_accuracy=sampled_accuracy)
