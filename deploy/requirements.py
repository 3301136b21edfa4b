"""Print the requirements of lightning-opd's base install plus EXTRAS, one a line, read from pyproject.toml.

The Dockerfile installs these before it copies the source, so the dependency layer (torch and all) is
rebuilt only when pyproject.toml changes, not on every edit of the code:

    python3 deploy/requirements.py pyproject.toml server teacher train > requirements.txt
"""

from __future__ import annotations

import re
import sys

import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The base dependencies and those of `extras`, with `lightning-opd[x]` self-references expanded."""
    project = pyproject["project"]
    declared = project.get("optional-dependencies", {})
    own = re.compile(rf"^{re.escape(project['name'])}\[([^\]]+)\]$")
    out: list[str] = list(project.get("dependencies", []))
    seen: set[str] = set()
    todo = list(extras)
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        if extra not in declared:
            raise ValueError(f"no extra {extra!r} in pyproject.toml; it declares {sorted(declared)}")
        seen.add(extra)
        for req in declared[extra]:
            match = own.match(req.replace(" ", ""))
            if match:
                todo.extend(match.group(1).split(","))
            elif req not in out:
                out.append(req)
    return out


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python3 deploy/requirements.py PYPROJECT [EXTRA...]")
    with open(sys.argv[1], "rb") as f:
        print("\n".join(requirements(tomllib.load(f), sys.argv[2:])))
