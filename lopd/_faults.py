"""Deterministic crash points for resume tests (`LOPD_FAULT=point:N`); inert unless that variable is set.

A real `kill -9` lands at a random moment; these points let tests also crash at the two moments
that matter most for atomicity: right after a part is published, and in the middle of writing one
(temporary file complete, not yet renamed).
"""

from __future__ import annotations

import os

_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Exit at once, like SIGKILL, the N-th time (0-based) this point is reached, when asked to."""
    spec = os.environ.get("LOPD_FAULT")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    seen = _counts.get(name, 0)
    _counts[name] = seen + 1
    if seen == int(n or 0):
        os._exit(137)
