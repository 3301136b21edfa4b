"""`EpochSampler`: which dataset indices each rank and DataLoader worker reads, in which order.

The order is a pure function of (seed, epoch, num_samples, exclude, batch_size, world_size), so every
rank computes the same permutation with no communication, and a resumed job recomputes it
instead of storing it. Resume state is the small JSON-able dict of `state_dict()`.

Partitioning, from the permutation `perm` of one epoch:

* Global step k consumes `perm[k*G:(k+1)*G]` with G = batch_size * world_size; rank r takes the
  r-th slice of `batch_size`. So after k steps every rank has consumed the same prefix of the
  permutation and rank 0's state is valid on every rank (only rank 0 needs to checkpoint).
* The tail (fewer than G samples) is split as evenly as possible between ranks, so every
  sample is used exactly once per epoch; ranks may then differ by one (smaller) batch. Pass
  `drop_last=True` to drop the tail instead, which keeps DDP ranks in lockstep.
* `even_batches=True` (what DDP needs: every rank runs the same number of forward and backward
  passes per epoch) gives a rank whose share of the tail is empty (the tail has fewer samples than
  ranks) a filler batch of one sample instead of none; `is_filler(epoch, k)` names it, and the
  trainer gives it zero weight, so "exactly once" still holds for the samples that count.
* `exclude` (e.g. a held-out evaluation set) takes indices out of every epoch: the permutation is
  then of the remaining indices, and "every sample exactly once" holds for them.
* DataLoader workers: the stream of this rank's remaining batches is dealt round-robin, batch j
  of the stream to worker j % W. DataLoader collects from workers round-robin too, so it yields
  exactly the order that `num_workers=0` yields.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import ResumeMismatch

STATE_FORMAT = 1


class EpochSampler:
    """Deterministic, resumable, sharded batches of dataset indices.

    Iterating yields this rank's remaining batches of the current epoch and advances the state
    as each batch is yielded; `positions()` walks ahead without changing the state (for
    prefetching) and `advance()` records a batch as consumed.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        shuffle: bool = True,
        dataset: str | None = None,
        version: int | None = None,
        content_hash: str | None = None,
        exclude: Sequence[int] | np.ndarray | None = None,
        even_batches: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}; it must be at least 1")
        if world_size < 1:
            raise ValueError(f"world_size is {world_size}; it must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank is {rank}; with world_size {world_size} it must be in 0..{world_size - 1}")
        if num_samples < 1:
            raise ValueError(f"the dataset has {num_samples} samples; there is nothing to train on")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.even_batches = bool(even_batches)
        self.dataset = dataset
        self.version = version
        self.content_hash = content_hash
        self.excluded = np.unique(np.asarray([] if exclude is None else exclude, dtype=np.int64))
        if self.excluded.size and not (0 <= self.excluded[0] and self.excluded[-1] < self.num_samples):
            raise ValueError(f"exclude holds indices outside 0..{self.num_samples - 1}")
        # The indices an epoch draws from (None: all of them, the order of a sampler without exclusions).
        self._pool = np.setdiff1d(np.arange(self.num_samples), self.excluded) if self.excluded.size else None
        self.epoch_size = self.num_samples - int(self.excluded.size)
        if self.epoch_size < 1:
            raise ValueError(
                f"excluding {self.excluded.size} of {self.num_samples} samples leaves none to draw; exclude fewer"
            )
        self.epoch = 0
        self.batches_consumed = 0
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if self._real_len() == 0:  # also keeps an endless multi-epoch walk from spinning without yielding
            if not self.drop_last:
                raise ValueError(
                    f"the dataset has {self.epoch_size} samples to draw, fewer than world_size {self.world_size}: "
                    f"rank {self.rank} would get none; use at most {self.epoch_size} ranks"
                )
            g = self.batch_size * self.world_size
            raise ValueError(
                f"drop_last with {self.epoch_size} samples to draw and a global batch of {g} "
                f"(batch_size {self.batch_size} x world_size {self.world_size}) leaves no batch; "
                f"lower batch_size to at most {self.epoch_size // self.world_size} or turn drop_last off"
            )

    # -- the order ---------------------------------------------------------------------------

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole epoch's order (dataset indices, less the excluded ones), the same on every rank."""
        if not self.shuffle:
            order = np.arange(self.epoch_size, dtype=np.int64)
        else:
            rng = np.random.default_rng([self.seed, int(epoch)])
            order = rng.permutation(self.epoch_size).astype(np.int64)
        return order if self._pool is None else self._pool[order]

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch`, in order (cached for the latest epoch asked for)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        perm = self.permutation(epoch)
        g = self.batch_size * self.world_size
        full = self.epoch_size // g
        lo = self.rank * self.batch_size
        batches = [perm[k * g + lo : k * g + lo + self.batch_size] for k in range(full)]
        tail = perm[full * g :]
        if tail.size and not self.drop_last:
            mine = np.array_split(tail, self.world_size)[self.rank]  # sizes differ by at most 1
            if mine.size:
                batches.append(mine)
            elif self.even_batches:
                batches.append(tail[-1:])  # a filler, weighed zero by the trainer (`is_filler`)
        self._cache = (epoch, batches)
        return batches

    def _tail(self) -> tuple[int, int]:
        """(full global batches per epoch, this rank's share of the tail; 0 with drop_last)."""
        g = self.batch_size * self.world_size
        full = self.epoch_size // g
        tail = 0 if self.drop_last else self.epoch_size - full * g
        # array_split gives the first (tail % world_size) ranks one more sample than the others.
        return full, tail // self.world_size + (1 if self.rank < tail % self.world_size else 0)

    def _real_len(self) -> int:
        full, share = self._tail()
        return full + (1 if share else 0)

    def __len__(self) -> int:
        """Batches per epoch on this rank (with `even_batches`, the same on every rank)."""
        full, share = self._tail()
        has_tail = not self.drop_last and self.epoch_size % (self.batch_size * self.world_size) != 0
        return full + 1 if has_tail and (share or self.even_batches) else full

    def is_filler(self, epoch: int, k: int) -> bool:
        """Whether batch `k` of `epoch` on this rank is an `even_batches` filler (to be weighed zero)."""
        full, share = self._tail()
        return self.even_batches and share == 0 and k == full and len(self) == full + 1

    def positions(self, num_epochs: int | None = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch number in epoch, indices) from the current state on, without advancing it.

        `num_epochs` counts from the state's epoch; None walks on forever.
        """
        epoch, k = self.epoch, self.batches_consumed
        stop = None if num_epochs is None else self.epoch + num_epochs
        while stop is None or epoch < stop:
            batches = self.epoch_batches(epoch)
            for j in range(k, len(batches)):
                yield epoch, j, batches[j]
            epoch, k = epoch + 1, 0

    def worker_positions(
        self, worker: int, num_workers: int, num_epochs: int | None = 1
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """The positions of DataLoader worker `worker` of `num_workers`: every num_workers-th of
        `positions()`, starting at the worker's number, so round-robin collection restores the order."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} is outside 0..{num_workers - 1}")
        for j, pos in enumerate(self.positions(num_epochs)):
            if j % num_workers == worker:
                yield pos

    def advance(self, n: int = 1) -> None:
        """Record `n` batches as consumed, rolling over to the next epoch at the end of one."""
        for _ in range(n):
            self.batches_consumed += 1
            if self.batches_consumed >= len(self):
                self.epoch += 1
                self.batches_consumed = 0

    def set_position(self, epoch: int, batches_consumed: int) -> None:
        """Jump to a position (e.g. just after a batch a DataLoader worker produced)."""
        if epoch < 0 or batches_consumed < 0:
            raise ValueError(f"position ({epoch}, {batches_consumed}) must not be negative")
        self.epoch, self.batches_consumed = int(epoch), 0
        self.advance(int(batches_consumed))

    def __iter__(self) -> Iterator[np.ndarray]:
        """This rank's remaining batches of the current epoch; the state advances as each is yielded."""
        for _, _, indices in self.positions(1):
            self.advance()
            yield indices

    def excluding(self, indices: Sequence[int] | np.ndarray) -> EpochSampler:
        """A sampler with the same settings that never draws `indices` (at the start of epoch 0).

        The exclusion is part of the resume state: a state saved with other exclusions is refused.
        """
        return EpochSampler(
            self.num_samples, self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size,
            drop_last=self.drop_last, shuffle=self.shuffle, dataset=self.dataset, version=self.version,
            content_hash=self.content_hash, exclude=np.union1d(self.excluded, np.asarray(indices, dtype=np.int64)),
            even_batches=self.even_batches,
        )  # fmt: skip

    def evened(self) -> EpochSampler:
        """This sampler with `even_batches=True` (at the start of epoch 0)."""
        return EpochSampler(
            self.num_samples, self.batch_size, seed=self.seed, rank=self.rank, world_size=self.world_size,
            drop_last=self.drop_last, shuffle=self.shuffle, dataset=self.dataset, version=self.version,
            content_hash=self.content_hash, exclude=self.excluded, even_batches=True,
        )  # fmt: skip

    def _excluded_digest(self) -> str | None:
        if not self.excluded.size:
            return None
        return "sha256:" + hashlib.sha256(self.excluded.astype("<i8").tobytes()).hexdigest()

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able dict: where this rank is, and what it must be resumed against."""
        return {
            "format": STATE_FORMAT,
            "dataset": self.dataset,
            "version": self.version,
            "content_hash": self.content_hash,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "drop_last": self.drop_last,
            "even_batches": self.even_batches,
            "excluded": self._excluded_digest(),
            "num_excluded": int(self.excluded.size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; refuse states of other data or other settings.

        The rank is not compared: after k steps all ranks have consumed the same prefix of the
        epoch, so one rank's state resumes every rank.
        """
        if int(state.get("format", 0)) != STATE_FORMAT:
            raise ResumeMismatch(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
        theirs, ours = state.get("content_hash"), self.content_hash
        if theirs is not None and ours is not None and theirs != ours:
            raise ResumeMismatch(
                f"the checkpoint was trained on {state.get('dataset')!r} v{state.get('version')} "
                f"(content {theirs}), but the loader now reads {self.dataset!r} v{self.version} (content {ours}). "
                "Resuming on other data would repeat or skip samples; resume with the same dataset version "
                "(pass its version explicitly), or start a new run"
            )
        if state.get("num_samples") != self.num_samples:
            raise ResumeMismatch(
                f"the checkpoint's dataset had {state.get('num_samples')} samples, this one has {self.num_samples}"
            )
        if state.get("excluded") != self._excluded_digest():
            raise ResumeMismatch(
                f"the checkpoint's loader left out {state.get('num_excluded', 0)} samples (e.g. held out for "
                f"evaluation), this one leaves out {self.excluded.size}, or other ones; the order of the rest of "
                "the epoch depends on them: resume with the same exclusions (the same --eval-samples)"
            )
        for key in ("seed", "shuffle", "batch_size", "world_size", "drop_last", "even_batches"):
            if key in state and state[key] != getattr(self, key):
                raise ResumeMismatch(
                    f"the checkpoint's loader used {key}={state[key]!r}, this one {key}={getattr(self, key)!r}; "
                    f"the order of the rest of the epoch depends on it: resume with {key}={state[key]!r}"
                )
        self.set_position(int(state["epoch"]), int(state["batches_consumed"]))
