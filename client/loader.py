"""Batches for the trainer: `OPDLoader` (threads); `OPDIterableDataset` (torch DataLoader) builds on it.

Both pin the dataset version when they are built (the latest one unless told otherwise), so an
epoch never mixes two versions, and both check every batch's content hash against it.

Why threads: a batch is one HTTP request plus a numpy scatter, which mostly wait on the network
or run outside the GIL, so a few threads fetching `prefetch` batches ahead hide the latency
completely (the trainer's data wait is ~0), without the fork and pickling costs of worker
processes. `OPDIterableDataset` (`torch_dataset.py`) is there for pipelines built around
`torch.utils.data.DataLoader`.

The loader needs no torch: its batches are numpy arrays, or torch tensors where torch is installed
(`arrays`), so a training job in another framework installs the client without it.

Resume state counts only batches handed to the trainer, never prefetched ones: a checkpoint
taken right after batch k resumes with batch k + 1, whatever was in flight.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import numpy as np

from .collate import collate_arrays, require_torch, to_torch
from .http import StoreClient
from .sampler import EpochSampler
from .types import DatasetInfo

Position = tuple[int, int, np.ndarray]  # (epoch, batch number in the epoch, dataset indices)
Arrays = Literal["torch", "numpy"]
T = TypeVar("T")


def default_arrays() -> Arrays:
    """What batches hold unless told: torch tensors where torch is installed, numpy arrays otherwise."""
    return "torch" if importlib.util.find_spec("torch") is not None else "numpy"


def prefetched(
    positions: Iterator[Position], make: Callable[[Position, threading.Event], T], depth: int
) -> Iterator[tuple[Position, T]]:
    """`(pos, make(pos, stop))` in order, with up to `depth` calls running ahead in threads.

    Positions are pulled lazily, so an infinite stream is fine; errors surface in order, when
    their batch is reached. Closing the generator cancels what has not started and sets `stop`,
    which `make` passes on to the client so that running fetches give up retrying (a failed
    trainer is not kept alive by retries), then waits for those running fetches to return.
    """
    stop = threading.Event()
    if depth <= 0:
        for pos in positions:
            yield pos, make(pos, stop)
        return
    pool = ThreadPoolExecutor(max_workers=min(depth, 8), thread_name_prefix="lopd-prefetch")
    pending: deque[tuple[Position, Future[T]]] = deque()
    try:
        for pos in positions:
            pending.append((pos, pool.submit(make, pos, stop)))
            if len(pending) > depth:
                p, fut = pending.popleft()
                yield p, fut.result()
        while pending:
            p, fut = pending.popleft()
            yield p, fut.result()
    finally:
        stop.set()  # running fetches stop retrying at once
        for _, fut in pending:
            fut.cancel()
        # Wait for the (at most `depth`) fetches already running: a thread still decoding Arrow or
        # building tensors while the process exits, or while its server shuts down, can abort the
        # process (seen once as `terminate called without an active exception`).
        pool.shutdown(wait=True, cancel_futures=True)


class BatchSource:
    """What `OPDLoader` and `OPDIterableDataset` share: the pinned dataset version, the sampler, fetch + collate."""

    def __init__(
        self,
        client: StoreClient,
        dataset: str,
        batch_size: int,
        *,
        seed: int,
        rank: int,
        world_size: int,
        version: int | None,
        drop_last: bool,
        shuffle: bool,
        num_epochs: int | None,
        pad_id: int,
        pad_to_multiple_of: int | None,
        info: DatasetInfo | None,
        columns: Sequence[str] | None = None,
        teachers: Sequence[str] | None = None,
    ) -> None:
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs is {num_epochs}; use at least 1, or None for no end")
        self.client = client
        self.info = info if info is not None else client.manifest(dataset, version)
        if self.info.name != dataset or (version is not None and self.info.version != version):
            raise ValueError(
                f"the dataset info given is for {self.info.name!r} v{self.info.version}, not {dataset!r} v{version}"
            )
        self.num_epochs = num_epochs
        self.columns = None if columns is None else tuple(columns)  # None: the contract's SERVED_COLUMNS
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.sampler = EpochSampler(
            self.info.num_samples,
            batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            shuffle=shuffle,
            dataset=self.info.name,
            version=self.info.version,
            content_hash=self.info.content_hash,
        )
        if teachers is not None:  # a multi-teacher dataset, restricted to some routed teachers' samples
            keep = self.info.teacher_indices(teachers)
            self.sampler = self.sampler.excluding(np.setdiff1d(np.arange(self.info.num_samples), keep))

    def epochs_left(self) -> int | None:
        """Epochs still to run from the sampler's position (None: no end)."""
        # num_epochs counts from the start of training, not from a resume point.
        return None if self.num_epochs is None else max(0, self.num_epochs - self.sampler.epoch)

    def make_batch(
        self, pos: Position, stop: threading.Event, arrays: Arrays = "torch", pin_memory: bool = False
    ) -> dict[str, Any]:
        """The batch at `pos`, fetched and collated, with its `epoch` and `batch_index`; `stop` ends retrying."""
        # A fetch is submitted at the moment a ready batch is handed to the trainer; yielding the GIL
        # once lets that hand-off finish first (median data wait 0.8 -> 0.2 ms, bench/bench_data_wait.py).
        time.sleep(0)
        epoch, k, indices = pos
        table = self.client.fetch(
            self.info.name, indices, self.info.version, expected_content_hash=self.info.content_hash, cancel=stop,
            columns=self.columns,
        )  # fmt: skip
        batch = collate_arrays(table, pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of, indices=indices)
        if arrays == "torch":
            batch = to_torch(batch, pin_memory=pin_memory)
        batch["epoch"] = epoch
        batch["batch_index"] = k
        return batch

    @property
    def batches_per_epoch(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.sampler)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class OPDLoader(BatchSource):
    """Iterates collated batches (see `collate_arrays`) of one dataset version, prefetching in threads.

    Each batch also carries `epoch` and `batch_index`. Iteration runs from the current state to
    the end of epoch `num_epochs - 1` (None: forever, for step-based training) and advances the
    state as batches are yielded; `state_dict()` / `load_state_dict()` resume exactly.
    `teachers` (keys of a multi-teacher dataset's routes) draws only those teachers' samples.
    `version=None` pins the latest version at construction. `arrays`: `"torch"` tensors or
    `"numpy"` arrays (same keys, dtypes and shapes); None picks torch where it is installed.
    `pin_memory` (torch only) pins the tensors for fast copies to a GPU.
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
        prefetch: int = 4,
        version: int | None = None,
        drop_last: bool = False,
        shuffle: bool = True,
        num_epochs: int | None = 1,
        pad_id: int = 0,
        pad_to_multiple_of: int | None = None,
        pin_memory: bool = False,
        arrays: Arrays | None = None,
        info: DatasetInfo | None = None,
        columns: Sequence[str] | None = None,
        teachers: Sequence[str] | None = None,
    ) -> None:
        arrays = default_arrays() if arrays is None else arrays
        if arrays not in ("torch", "numpy"):
            raise ValueError(f"arrays is {arrays!r}; use 'torch', 'numpy', or None for torch where it is installed")
        if arrays == "torch":
            require_torch("OPDLoader(arrays='torch')")  # here, not in a prefetch thread at the first batch
        elif pin_memory:
            raise ValueError("pin_memory pins torch tensors; it needs arrays='torch'")
        super().__init__(
            client, dataset, batch_size, seed=seed, rank=rank, world_size=world_size, version=version,
            drop_last=drop_last, shuffle=shuffle, num_epochs=num_epochs, pad_id=pad_id,
            pad_to_multiple_of=pad_to_multiple_of, info=info, columns=columns, teachers=teachers,
        )  # fmt: skip
        self.prefetch = prefetch
        self.pin_memory = pin_memory
        self.arrays: Arrays = arrays

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = prefetched(
            self.sampler.positions(self.epochs_left()),
            lambda p, stop: self.make_batch(p, stop, self.arrays, self.pin_memory),
            self.prefetch,
        )
        for _, batch in stream:
            self.sampler.advance()  # the state counts this batch as soon as the trainer has it
            yield batch
