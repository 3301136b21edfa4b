"""The tests behind the claims: paired, with the right degrees of freedom, margins fixed in advance.

Every method of a seed starts from the same SFT checkpoint and is evaluated on the same
problems, so comparisons are paired. The unit of replication is the seed (a whole pipeline: SFT
sample, student, rollouts, training order): with k seeds, a paired t test has k - 1 degrees of
freedom. Problems within one seed are not independent replications of the experiment, so with
fewer than `MIN_SEEDS` seeds accuracy is tested over problems instead and the verdict says so:
it speaks for that seed's checkpoints only.

- superiority: one-sided paired t test, H0: mean difference <= 0;
- equivalence: two one-sided tests (TOST) against a margin fixed before the run: equivalent when
  the (1 - 2 alpha) confidence interval of the mean difference lies inside (-margin, +margin).

One replicate, or replicates without any variation, leave the error unknown: no test, no claim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MIN_SEEDS = 3  # fewer seeds cannot estimate the between-seed variance usefully (t with 1 df)


@dataclass(frozen=True)
class TestResult:
    kind: Literal["superiority", "equivalence"]
    unit: str  # what was replicated: "seeds" or "problems (seed 0 only)"
    n: int
    mean: float
    ci_low: float  # (1 - 2 alpha) interval for equivalence, one-sided (1 - alpha) lower bound for superiority
    ci_high: float
    statistic: float  # t
    df: int
    p_value: float
    holds: bool

    def describe(self, fmt: str) -> str:
        high = "+inf)" if math.isinf(self.ci_high) else f"{format(self.ci_high, fmt)}]"
        interval = f"[{format(self.ci_low, fmt)}, {high}"
        return (
            f"mean difference {format(self.mean, '+' + fmt)}, CI {interval}, t = {self.statistic:.2f}, "
            f"df = {self.df}, p = {self.p_value:.3g} (n = {self.n} {self.unit})"
        )


def _t(diffs: Sequence[float]) -> tuple[float, float, int]:
    x = np.asarray(diffs, dtype=np.float64)
    n = len(x)
    se = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    if se < 1e-9 * max(float(np.abs(x).max()), 1e-12):  # identical up to float rounding: no variation
        se = 0.0
    return float(x.mean()), se, n - 1


def superiority(diffs: Sequence[float], unit: str, alpha: float) -> TestResult:
    """One-sided paired t test that the mean of `diffs` (a - b) is above 0."""
    from scipy import stats

    mean, se, df = _t(diffs)
    if not df or not se > 0:  # one replicate, or no variation to estimate the error from: no test
        return TestResult("superiority", unit, len(diffs), mean, mean, math.inf, math.nan, df, 1.0, holds=False)
    t = mean / se
    p = float(stats.t.sf(t, df))
    low = mean - float(stats.t.ppf(1 - alpha, df)) * se
    return TestResult("superiority", unit, len(diffs), mean, low, math.inf, t, df, p, holds=p < alpha)


def equivalence(diffs: Sequence[float], margin: float, unit: str, alpha: float) -> TestResult:
    """TOST: both H0 (mean <= -margin) and H0 (mean >= +margin) rejected at `alpha`."""
    from scipy import stats

    mean, se, df = _t(diffs)
    if not df or not se > 0:  # as above: identical outcomes (say 0% and 0%) are no evidence of equivalence
        return TestResult("equivalence", unit, len(diffs), mean, mean, mean, math.nan, df, 1.0, holds=False)
    p = max(float(stats.t.sf((mean + margin) / se, df)), float(stats.t.cdf((mean - margin) / se, df)))
    half = float(stats.t.ppf(1 - alpha, df)) * se
    t = (abs(mean) - margin) / se
    return TestResult("equivalence", unit, len(diffs), mean, mean - half, mean + half, t, df, p, holds=p < alpha)


def accuracy_differences(a: Sequence[str], b: Sequence[str], seeds: Sequence[int]) -> tuple[list[float], str]:
    """Paired accuracy differences and their unit, from per-problem correctness strings ("0101...") per seed.

    With at least `MIN_SEEDS` seeds: one difference per seed. Otherwise per problem of the first seed.
    """
    if len(seeds) >= MIN_SEEDS:
        return [_mean_bits(x) - _mean_bits(y) for x, y in zip(a, b)], "seeds"
    return [float(int(x) - int(y)) for x, y in zip(a[0], b[0])], f"problems (seed {seeds[0]} only)"


def _mean_bits(bits: str) -> float:
    return sum(c == "1" for c in bits) / len(bits)
