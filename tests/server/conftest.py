"""Fixtures for server-side tests (teachers, scoring)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.utils.inference_server import InferenceServer, inference_server


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Mistral (untied head) with the shared char-level tokenizer."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", seed=4)


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> Any:
    """The tiny Llama loaded with transformers, for naive reference log-probs."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()


@pytest.fixture(scope="module")
def _inference_server(tiny_llama_dir: Path) -> Iterator[InferenceServer]:
    with inference_server(tiny_llama_dir) as server:
        yield server


@pytest.fixture
def server(_inference_server: InferenceServer) -> InferenceServer:
    """A loopback SGLang/OpenAI-compatible server over the tiny Llama, its faults and counters reset."""
    _inference_server.reset()
    return _inference_server
