"""A served store for client tests: the real `lopd serve` app under uvicorn on loopback.

Retry tests inject faults the server cannot produce on demand (N failures, then success;
Retry-After) with a transport that plays a script and then forwards to the real server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from lopd.client.http import StoreClient
from lopd.storage.manifest import Consistency
from tests.utils.factories import build_dataset, provenance, publish_samples

DATASETS = {"alpha": dict(n=100, per_part=16, seed=0), "beta": dict(n=37, per_part=8, seed=1)}


# -- building stores -----------------------------------------------------------------------------


def teacher_scored_samples(model_dir: Path, n: int, seed: int, vocab: int) -> dict[str, list]:
    """Random prompts/responses of real token ids, scored by the tiny model in the naive way:
    one sequence at a time, `log_softmax(logits[p + j - 1])[response[j]]` for response token j."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("ids", "prompts", "responses", "teacher", "rollout")}
    for i in range(n):
        p, r = int(rng.integers(1, 12)), int(rng.integers(1, 24))
        prompt = rng.integers(4, vocab, p).astype(np.int32)
        response = rng.integers(4, vocab, r).astype(np.int32)
        ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        scored = np.array([lp[p + j - 1, int(response[j])].item() for j in range(r)], dtype=np.float32)
        out["ids"].append(f"scored-{i:04d}")
        out["prompts"].append(prompt)
        out["responses"].append(response)
        out["teacher"].append(scored)
        out["rollout"].append(None if i % 4 == 0 else scored - np.float32(0.1))
    return out


@dataclass
class StoreFixture:
    root: Path
    samples: dict[str, dict[str, list]]
    teacher_fingerprint: str
    tokenizer_fingerprint: str


@pytest.fixture(scope="session")
def client_store(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tokenizer: Any) -> StoreFixture:
    """`alpha` and `beta`: synthetic samples (ids up to 1000); `scored`: real token ids of the tiny
    tokenizer scored by the tiny Llama, with that teacher's and tokenizer's fingerprints."""
    from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint

    root = tmp_path_factory.mktemp("client-store")
    samples = {}
    for name, kw in DATASETS.items():
        _, samples[name] = build_dataset(root, name, **kw)
    teacher_fp = model_fingerprint(tiny_llama_dir)
    tok_fp = tokenizer_fingerprint(tokenizer)
    base = provenance()
    prov = base.model_copy(
        update={
            "teacher": base.teacher.model_copy(update={"fingerprint": teacher_fp}),
            "sft_teacher_fingerprint": teacher_fp,
            "tokenizer_fingerprint": tok_fp,
            "rollout_tokenizer_fingerprint": tok_fp,
            "consistency": Consistency(teacher_consistent=True, mismatch_allowed=False, rollout_tokenizer_checked=True),
        }
    )
    samples["scored"] = teacher_scored_samples(tiny_llama_dir, n=24, seed=5, vocab=len(tokenizer))
    publish_samples(root, "scored", samples["scored"], prov=prov, per_part=8)
    return StoreFixture(root=root, samples=samples, teacher_fingerprint=teacher_fp, tokenizer_fingerprint=tok_fp)


# -- the served-store fixture --------------------------------------------------------------------


@contextmanager
def _real_server(root: Path) -> Iterator[str]:
    """`lopd serve` over `root`, in a thread on a free loopback port, once its checksums are verified."""
    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings

    with serve_in_background(ServerSettings(store=root)) as bg:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and httpx.get(bg.base_url + "/readyz").status_code != 200:
            time.sleep(0.05)
        yield bg.base_url


@dataclass
class Served:
    """A store behind the real API; `client()` builds a `StoreClient` for it."""

    url: str
    store: StoreFixture

    def client(self, **kwargs: Any) -> StoreClient:
        return StoreClient(self.url, **kwargs)


@pytest.fixture(scope="session")
def served(client_store: StoreFixture) -> Iterator[Served]:
    with _real_server(client_store.root) as url:
        yield Served(url=url, store=client_store)


@pytest.fixture()
def store_client(served: Served) -> Iterator[StoreClient]:
    with served.client(retries=2, backoff_s=0.01) as c:
        yield c
