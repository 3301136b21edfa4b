"""A small reasoning task with exact answers: multi-digit addition with a worked solution.

Why this task: it needs several dependent steps (each column's digit depends on the carry from
the one before), its answers are exact (accuracy is unambiguous), and a tiny transformer can
learn it on a CPU in minutes.

Teacher consistency needs two teachers that are equally good but *write differently*, in a way
subtle enough that each still finds the other's text plausible. So a style is not a format but
a set of per-column choices drawn with the style's own probabilities:

    prompt     <s>473+258=
    solution   3+8=11 7+5+1=13 4+2+1=7 =731</s>      columns right to left, sums with carries
    swapped    8+3=11 ...                             a column's operands in the other order
    zero carry ... 4+2+0=6 ...                        a zero carry written out

Style A swaps and writes zero carries with probability 0.2 each, style B with 0.8. Both are
always right, and each gives the other's solutions a lower but far from negligible probability
(log 0.2 against log 0.8 per choice, about 1.4 nats). Every solution ends with `=<answer>`, so
one grader reads all of them; `grade` extracts the last `=`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

StyleName = Literal["A", "B"]


@dataclass(frozen=True)
class Style:
    """How a teacher writes a column: the probability of each optional way of writing it."""

    name: StyleName
    p_swap: float  # the operands in the other order ("8+3=11" for 3+8)
    p_zero_carry: float  # a zero carry written out ("4+2+0=6"); never in the first column

    def choices(self, rng: random.Random | None) -> tuple[bool, bool]:
        """(swap, write zero carry) for one column: drawn with `rng`, or the likelier choice without one."""
        if rng is None:
            return self.p_swap > 0.5, self.p_zero_carry > 0.5
        return rng.random() < self.p_swap, rng.random() < self.p_zero_carry


STYLES: dict[StyleName, Style] = {"A": Style("A", 0.2, 0.2), "B": Style("B", 0.8, 0.8)}


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="


def make_problems(n: int, digits: int, seed: int, exclude: Sequence[Problem] = ()) -> list[Problem]:
    """`n` distinct problems with operands of exactly `digits` digits, none of them in `exclude`."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if n > (hi - lo + 1) ** 2 - len(exclude):
        raise ValueError(f"cannot draw {n} distinct {digits}-digit problems")
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[Problem] = []
    while len(out) < n:
        p = Problem(rng.randint(lo, hi), rng.randint(lo, hi))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


HELD_OUT_SEED, VALIDATION_SEED = 2, 3


def held_out_problems(n: int, digits: int) -> list[Problem]:
    """The test set: drawn first, from its own seed, so every stage can exclude it."""
    return make_problems(n, digits, seed=HELD_OUT_SEED)


def validation_problems(n: int, digits: int) -> list[Problem]:
    """The validation set (settings are chosen on it): its own seed, disjoint from the test set."""
    return make_problems(n, digits, seed=VALIDATION_SEED, exclude=held_out_problems(n, digits))


def _columns(p: Problem) -> list[tuple[int, int]]:
    """Digit pairs from the units column up; the shorter operand is padded with zeros."""
    a, b = str(p.a), str(p.b)
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    return [(int(x), int(y)) for x, y in zip(reversed(a), reversed(b))]


def solve(p: Problem, style: StyleName | Style, rng: random.Random | None = None) -> str:
    """A worked solution in `style`, ending with `=<answer>` (no end token).

    With `rng` each column's choices are drawn with the style's probabilities (what a teacher
    learns from); without, every column takes the style's likelier choice.
    """
    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
        style = STYLES[style]
    carry, steps = 0, []
    for column, (x, y) in enumerate(_columns(p)):
        swap, zero_carry = style.choices(rng)
        first, second = (y, x) if swap else (x, y)
        s = x + y + carry
        written_carry = f"+{carry}" if carry or (zero_carry and column > 0) else ""
        steps.append(f"{first}+{second}{written_carry}={s}")
        carry = s // 10
    return " ".join(steps) + f" ={p.answer}"


def grade(response: str, p: Problem) -> bool:
    """Exact match of the final answer: the digits after the last '=' (whatever the style)."""
    tail = response.rsplit("=", 1)
    if len(tail) != 2:
        return False
    digits = tail[1].strip()
    return digits.isdigit() and int(digits) == p.answer
