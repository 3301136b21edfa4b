"""The training client: talks to a `lopd serve` endpoint over its HTTP contract only.

Nothing here imports `lopd.server` or `lopd.storage`: a training job needs the HTTP API
(docs/http-api.md), not the code that serves it. Names are imported lazily so that
`import lopd.client` (and the HTTP client) works without torch; the loader, collation, loss and
trainer need torch.
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
    "OPDIterableDataset": "loader",
    "collate_batch": "collate",
    "token_logprobs": "collate",
    "lightning_opd_loss": "loss",
    "check_dataset_for_training": "consistency",
    "TrainConfig": "config",
    "train_student": "trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lopd.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
