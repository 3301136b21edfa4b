"""Build a directory tree laid out like the installed `lopd` package, made of symlinks.

The repository's top-level folders (`storage/`, `server/`, `client/`, `pipeline/`) install as
`lopd.storage`, `lopd.server`, ... (`[tool.setuptools] package-dir`). Static tools (mypy,
import-linter) read packages from disk and do not follow that mapping, so they are pointed at
this tree instead. Usage: `python scripts/package_tree.py DIR` (prints DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def build(dest: Path) -> Path:
    """Create `dest/lopd` mirroring the package; returns `dest` (put it first on the search path)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = config["tool"]["setuptools"]["package-dir"]
    pkg = dest / "lopd"
    pkg.mkdir(parents=True, exist_ok=True)
    mapped = {name.split(".", 1)[1]: folder for name, folder in package_dir.items() if "." in name}
    for entry in (ROOT / package_dir["lopd"]).iterdir():
        if entry.name not in mapped and entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for sub, folder in mapped.items():
        (pkg / sub).symlink_to(ROOT / folder, target_is_directory=True)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
