"""The task: both styles solve every problem, the grader reads both, problems are distinct and split."""

from __future__ import annotations

import pytest

from lopd.pipeline.task import STYLES, Problem, grade, make_problems, solve


@pytest.mark.parametrize("style", STYLES)
def test_every_solution_is_graded_correct_and_a_wrong_answer_is_not(style):
    for p in make_problems(500, 3, seed=0) + [Problem(999, 999), Problem(100, 100), Problem(5, 995)]:
        text = solve(p, style)
        assert grade(text, p), text
        wrong = text[: text.rindex("=") + 1] + str(p.answer + 1)
        assert not grade(wrong, p)


def test_styles_differ_but_show_the_same_carries():
    p = Problem(473, 258)
    assert solve(p, "A") == "3+8=11 7+5+1=13 4+2+1=7 =731"
    assert solve(p, "B") == "[3,8]1c1 [7,5]3c1 [4,2]7c0 =731"


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
