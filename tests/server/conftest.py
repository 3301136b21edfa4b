"""Fixtures for server-side tests (teachers, scoring)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Mistral (untied head) with the shared char-level tokenizer."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=4)
