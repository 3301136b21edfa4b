"""The task: both styles solve every problem, the grader reads both, styles draw their choices at their
probabilities, problems are distinct and split."""

from __future__ import annotations

import random
import re

import pytest

from lopd.pipeline.task import STYLES, Problem, grade, make_problems, solve


@pytest.mark.parametrize("style", STYLES)
def test_every_solution_is_graded_correct_and_a_wrong_answer_is_not(style):
    rng = random.Random(0)
    for p in make_problems(500, 3, seed=0) + [Problem(999, 999), Problem(100, 100), Problem(5, 995)]:
        for text in (solve(p, style), solve(p, style, rng)):
            assert grade(text, p), text
            wrong = text[: text.rindex("=") + 1] + str(p.answer + 1)
            assert not grade(wrong, p)


def test_styles_differ_only_in_optional_choices():
    p = Problem(473, 208)
    assert solve(p, "A") == "3+8=11 7+0+1=8 4+2=6 =681"  # likelier choices: in order, no zero carry
    assert solve(p, "B") == "8+3=11 0+7+1=8 2+4+0=6 =681"  # swapped, zero carry written (not in column 1)


@pytest.mark.parametrize("style", STYLES)
def test_choices_are_drawn_at_the_styles_probabilities(style):
    spec, rng = STYLES[style], random.Random(1)
    swaps = zero = columns_with_zero_carry = 0
    problems = make_problems(3000, 3, seed=3)
    for p in problems:
        steps = solve(p, style, rng).split(" ")[:3]
        swaps += int(steps[0].split("=")[0] != f"{p.a % 10}+{p.b % 10}")  # swap is visible when digits differ
        for step in steps[1:]:
            operands = re.split(r"[+=]", step)
            if len(operands) == 4 and operands[2] == "0":
                zero += 1
            columns_with_zero_carry += int(len(operands) == 3 or operands[2] == "0")
    unequal = sum(p.a % 10 != p.b % 10 for p in problems)
    assert abs(swaps / unequal - spec.p_swap) < 0.03
    assert abs(zero / columns_with_zero_carry - spec.p_zero_carry) < 0.03


@pytest.mark.parametrize("text", ["", "no answer", "=", "=7a", "3+8=11"])
def test_grade_rejects_malformed_answers(text):
    assert not grade(text, Problem(473, 258))


def test_problems_are_distinct_seeded_and_exclude_the_train_split():
    train = make_problems(300, 2, seed=1)
    test = make_problems(100, 2, seed=2, exclude=train)
    assert len(set(train)) == 300 and not set(train) & set(test)
    assert make_problems(300, 2, seed=1) == train
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in train + test)
    with pytest.raises(ValueError, match="distinct"):
        make_problems(82, 1, seed=0)
    with pytest.raises(ValueError, match="style"):
        solve(Problem(1, 2), "C")  # type: ignore[arg-type]
