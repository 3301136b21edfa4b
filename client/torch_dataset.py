"""`OPDIterableDataset`: the loader's batches as a `torch.utils.data.IterableDataset` (needs torch).

For pipelines built around `torch.utils.data.DataLoader`; `OPDLoader` (`loader.py`) needs no
torch and prefetches in threads instead of worker processes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .http import StoreClient
from .loader import BatchSource, prefetched
from .types import DatasetInfo


class OPDIterableDataset(BatchSource, IterableDataset):  # type: ignore[misc]
    """A `torch.utils.data.IterableDataset` of whole batches, for `DataLoader(ds, batch_size=None, num_workers=W)`.

    Worker w of W fetches every W-th batch of this rank's stream, so DataLoader's round-robin
    collection yields exactly the `num_workers=0` order. The dataset cannot see what the
    DataLoader has handed out, so resume state is taken from a batch: save
    `ds.state_dict_after(batch)` for the last batch trained on, and `load_state_dict` it into a
    fresh dataset before building the DataLoader. `prefetch` is per worker.
    """

    def __init__(
        self,
        client: StoreClient,
        dataset: str,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        prefetch: int = 2,
        version: int | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        pad_id: int = 0,
        pad_to_multiple_of: int | None = None,
        info: DatasetInfo | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        super().__init__(
            client, dataset, batch_size, seed=seed, rank=rank, world_size=world_size, version=version,
            drop_last=drop_last, shuffle=shuffle, num_epochs=num_epochs, pad_id=pad_id,
            pad_to_multiple_of=pad_to_multiple_of, info=info, columns=columns,
        )  # fmt: skip
        self.prefetch = prefetch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        w, n = (0, 1) if worker is None else (worker.id, worker.num_workers)
        positions = self.sampler.worker_positions(w, n, self.epochs_left())
        for _, batch in prefetched(positions, self.make_batch, self.prefetch):
            yield batch

    def state_dict_after(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The resume state just after `batch` (one this dataset produced) was consumed."""
        sampler = copy.copy(self.sampler)
        sampler.set_position(int(batch["epoch"]), int(batch["batch_index"]) + 1)
        return sampler.state_dict()
