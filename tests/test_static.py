"""Static checks that run with the tests: mypy over the whole package, ruff over the tree, and the import contracts
(the layers of docs/architecture.md, declared in pyproject.toml). A crossed layer fails CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from package_tree import build  # noqa: E402

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("pkg"))


@pytest.mark.slow
def test_mypy_is_clean(tree: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "lopd"],
        cwd=tree, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]


def test_import_contracts_hold(tree: Path) -> None:
    out = subprocess.run(
        [str(BIN / "lint-imports"), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tree), "PATH": str(BIN)},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]


@pytest.mark.parametrize("check", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(check: list[str]) -> None:
    """pyproject.toml's ruff rules over the tree; fix: `.venv/bin/ruff check --fix . && .venv/bin/ruff format .`."""
    out = subprocess.run([str(BIN / "ruff"), *check, "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
