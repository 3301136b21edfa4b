"""The training client: talks to a `lopd serve` endpoint over its HTTP contract only.

Nothing here imports `lopd.server` or `lopd.storage`: a training job needs the HTTP API
(docs/http-api.md), not the code that serves it. Names are imported lazily. The base install
(no torch) has `StoreClient`, `OPDLoader` (numpy batches), `collate_arrays` and the sampler;
with torch installed, batches are torch tensors, and `token_logprobs`, `lightning_opd_loss`,
`OPDIterableDataset`, `to_torch` and `collate_batch` work (`train_student` also needs
transformers: `lopd train`'s extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StoreClient": "http",
    "DatasetInfo": "types",
    "SampleArrays": "types",
    "ServerError": "errors",
    "RetryBudgetExhausted": "errors",
    "ResumeMismatch": "errors",
    "EpochSampler": "sampler",
    "OPDLoader": "loader",
    "OPDIterableDataset": "torch_dataset",
    "collate_arrays": "collate",
    "collate_batch": "collate",
    "to_torch": "collate",
    "token_logprobs": "logprobs",
    "lightning_opd_loss": "loss",
    "gather_logprobs": "logprobs",
    "topk_distillation_loss": "topk_loss",
    "forward_kl_topk": "topk_loss",
    "reverse_kl_topk": "topk_loss",
    "generalized_jsd_topk": "topk_loss",
    "check_dataset_for_training": "consistency",
    "TrainConfig": "config",
    "train_student": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lopd.client' has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise ModuleNotFoundError(
            f"lopd.client.{name} needs torch, which is not installed: pip install torch "
            "(StoreClient and OPDLoader's numpy batches do not)",
            name="torch",
        ) from e


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
