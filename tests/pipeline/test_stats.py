"""The claims' tests, against hand computations and textbook values (scipy only supplies t quantiles)."""

from __future__ import annotations

import math

import pytest

from lopd.pipeline.stats import accuracy_differences, equivalence, superiority


def test_superiority_is_a_one_sided_paired_t_with_k_minus_1_df():
    diffs = [0.05, 0.07, 0.06]  # mean 0.06, sd 0.01, se 0.01/sqrt(3)
    r = superiority(diffs, "seeds", 0.05)
    assert r.df == 2 and r.n == 3
    assert r.statistic == pytest.approx(0.06 / (0.01 / math.sqrt(3)))
    # t = 10.39 with 2 df: one-sided p = 0.5 * (1 - t / sqrt(t^2 + 2)) for 2 df (closed form).
    assert r.p_value == pytest.approx(0.5 * (1 - r.statistic / math.sqrt(r.statistic**2 + 2)))
    assert r.holds and r.ci_low == pytest.approx(0.06 - 2.919986 * 0.01 / math.sqrt(3), rel=1e-5)
    # The same mean with a wide spread is not significant at 2 df.
    assert not superiority([0.20, -0.05, 0.03], "seeds", 0.05).holds
    assert not superiority([-0.01, -0.02, -0.03], "seeds", 0.05).holds
    assert not superiority([0.5], "seeds", 0.05).holds  # one replicate: no test
    assert not superiority([0.1, 0.1, 0.1], "seeds", 0.05).holds  # no variation: the error is unknown


def test_equivalence_is_tost_inside_the_margin():
    close = equivalence([0.004, -0.002, 0.001, 0.003, -0.001], 0.03, "seeds", 0.05)
    assert close.holds and -0.03 < close.ci_low < close.ci_high < 0.03
    # The 90% interval (two one-sided 5% tests) is mean -+ t(0.95, 4) * se, by hand.
    xs = [0.004, -0.002, 0.001, 0.003, -0.001]
    mean = sum(xs) / 5
    se = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4 / 5)
    assert (close.ci_low, close.ci_high) == pytest.approx((mean - 2.131847 * se, mean + 2.131847 * se), rel=1e-5)
    # A mean of zero with too much spread to exclude the margin: not shown equivalent.
    assert not equivalence([0.05, -0.05, 0.04, -0.04], 0.03, "seeds", 0.05).holds
    # A tight but shifted difference outside the margin: not equivalent (the old test said "within noise").
    assert not equivalence([0.051, 0.049, 0.050], 0.03, "seeds", 0.05).holds
    # 0% against 0% is not evidence of equivalence with one replicate.
    assert not equivalence([0.0], 0.03, "seeds", 0.05).holds


def test_accuracy_differences_use_seeds_from_three_and_problems_below():
    a, b = ["1100", "1110", "1111"], ["1000", "1100", "1110"]
    diffs, unit = accuracy_differences(a, b, [0, 1, 2])
    assert diffs == [0.25, 0.25, 0.25] and unit == "seeds"
    diffs, unit = accuracy_differences(a[:1], b[:1], [7])
    assert diffs == [0.0, 1.0, 0.0, 0.0] and unit == "problems (seed 7 only)"
