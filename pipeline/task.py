"""A small reasoning task with exact answers: multi-digit addition with a worked solution.

Why this task: it needs several dependent steps (each column's digit depends on the carry from
the one before), its answers are exact (accuracy is unambiguous), a tiny transformer can learn
it on a CPU in minutes, and the same problem can be solved in two clearly different *styles*.
Two teachers trained on the two styles have similar accuracy but very different token
distributions, which is exactly the situation teacher consistency is about: a student that
imitated style A gets a meaningless per-token signal from a teacher that writes style B.

    prompt     <s>473+258=
    style A    3+8=11 7+5+1=13 4+2+1=7 =731</s>      columns right to left, sums with carries
    style B    [3,8]1c1 [7,5]3c1 [4,2]7c0 =731</s>    digit pairs, column digit and carry out

Both styles end with `=<answer>`, so one grader reads both; `grade` extracts the last `=`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Style = Literal["A", "B"]
STYLES: tuple[Style, ...] = ("A", "B")


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


HELD_OUT_SEED = 2


def held_out_problems(n: int, digits: int) -> list[Problem]:
    """The evaluation set: drawn first, from its own seed, so every stage can exclude it."""
    return make_problems(n, digits, seed=HELD_OUT_SEED)


def _columns(p: Problem) -> list[tuple[int, int]]:
    """Digit pairs from the units column up; the shorter operand is padded with zeros."""
    a, b = str(p.a), str(p.b)
    width = max(len(a), len(b))
    a, b = a.zfill(width), b.zfill(width)
    return [(int(x), int(y)) for x, y in zip(reversed(a), reversed(b))]


def solve(p: Problem, style: Style) -> str:
    """The worked solution in the given style, ending with `=<answer>` (no end token)."""
    cols = _columns(p)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    carry, steps = 0, []
    for x, y in cols:
        s = x + y + carry
        if style == "A":
            steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        else:
            steps.append(f"[{x},{y}]{s % 10}c{s // 10}")
        carry = s // 10
    return " ".join(steps) + f" ={p.answer}"


def grade(response: str, p: Problem) -> bool:
    """Exact match of the final answer: the digits after the last '=' (whatever the style)."""
    tail = response.rsplit("=", 1)
    if len(tail) != 2:
        return False
    digits = tail[1].strip()
    return digits.isdigit() and int(digits) == p.answer
