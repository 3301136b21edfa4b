"""Session-wide fixtures: tiny real models and their tokenizer are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA exists; everywhere else they are reported as skipped (not passed)."""
    has_cuda = False
    if _torch_available():
        import torch

        has_cuda = torch.cuda.is_available()
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama teacher (untied head) with the char-level tokenizer, float32 weights."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_llama_b_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer as `tiny_llama_dir`, different weights: a different teacher."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-b"), "llama", seed=2)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Qwen2 (tied embeddings, attention biases) with the same tokenizer."""
    from lopd.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", seed=3)


@pytest.fixture(scope="session")
def tokenizer_dir(tiny_llama_dir: Path) -> Path:
    """The tokenizer shared by every tiny model (saved beside the Llama weights)."""
    return tiny_llama_dir


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real S3 server (SeaweedFS `weed mini`) on loopback for the whole session, started on first use."""
    from tests.utils.s3 import seaweedfs

    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_store(s3_server, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A fresh, empty store prefix `s3://lopd-test/<random>` with the AWS variables set to reach it."""
    from lopd.storage.layout import check_store_path

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return check_store_path(s3_server.store_url())


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh store on each backend: a local directory, then a prefix on the S3 server."""
    if request.param == "local":
        return tmp_path / "store"
    return request.getfixturevalue("s3_store")
