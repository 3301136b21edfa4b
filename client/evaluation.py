"""Evaluation of `lopd train` on samples of the store held out from training.

The held-out set is a function of the dataset's size and `--eval-samples` only (not of `--seed`),
so runs with different seeds on one dataset version are compared on the same samples, and a
larger set contains a smaller one. The training sampler excludes it (`EpochSampler.excluding`),
and the exclusion is part of the loader's resume state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from lopd.errors import InvalidInput

from .collate import collate_batch
from .http import StoreClient
from .types import DatasetInfo

SPLIT_SEED = 0x10BD  # fixed: the split must not move with --seed
BatchLoss = Callable[[dict[str, Any], float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def held_out_indices(num_samples: int, n: int) -> np.ndarray:
    """The `n` dataset indices held out for evaluation, sorted (the first `n` of a fixed permutation)."""
    if n >= num_samples:
        raise InvalidInput(
            f"--eval-samples {n} would hold out the whole dataset of {num_samples} samples; "
            f"use at most {num_samples - 1}"
        )
    order = np.random.default_rng([SPLIT_SEED, num_samples]).permutation(num_samples)
    return np.sort(order[:n]).astype(np.int64)


class HeldOut:
    """The held-out samples as collated batches, fetched from the server once, on first use."""

    def __init__(
        self,
        client: StoreClient,
        info: DatasetInfo,
        indices: np.ndarray,
        batch_size: int,
        pad_id: int,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.client, self.info, self.indices, self.columns = client, info, indices, columns
        self.batch_size, self.pad_id = batch_size, pad_id
        self._batches: list[dict[str, Any]] | None = None

    def batches(self) -> list[dict[str, Any]]:
        if self._batches is None:
            self._batches = []
            for s in range(0, len(self.indices), self.batch_size):
                chunk = self.indices[s : s + self.batch_size]
                table = self.client.fetch(
                    self.info.name, chunk, self.info.version, expected_content_hash=self.info.content_hash,
                    columns=self.columns,
                )  # fmt: skip
                self._batches.append(collate_batch(table, pad_id=self.pad_id, indices=chunk))
        return self._batches


@torch.no_grad()
def evaluate(model: Any, held_out: HeldOut, batch_loss: BatchLoss, *, normalize: str) -> dict[str, float]:
    """The training objective and the reverse KL on the held-out samples, with `model` in eval mode.

    `batch_loss(batch, token_count)` is the trainer's own forward and loss, so the numbers are the
    training loss's, measured on samples the student never trained on. Returns `eval_loss` (the
    token mean, or the sequence mean with `normalize="sequence"`, over the whole set),
    `eval_reverse_kl` (mean of log p_student - log p_teacher over the held-out response tokens),
    `eval_tokens` and `eval_time_s`.
    """
    t0 = time.perf_counter()
    batches = held_out.batches()
    n_tokens = max(sum(int(b["response_mask"].sum()) for b in batches), 1)
    n_rows = sum(int(b["response_mask"].shape[0]) for b in batches)
    was_training = model.training
    model.eval()
    loss_sum, kl_sum = 0.0, 0.0
    try:
        for b in batches:
            loss, m = batch_loss(b, n_tokens)
            # Token means add up over batches through the shared denominator; sequence means are
            # weighted by their batch's share of the rows.
            loss_sum += loss.item() if normalize == "token" else loss.item() * b["response_mask"].shape[0] / n_rows
            kl_sum += (m["reverse_kl"] * m["tokens"]).item()
    finally:
        model.train(was_training)
    return {
        "eval_loss": loss_sum,
        "eval_reverse_kl": kl_sum / n_tokens,
        "eval_tokens": n_tokens,
        "eval_time_s": time.perf_counter() - t0,
    }
