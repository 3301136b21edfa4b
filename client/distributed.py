"""`lopd train` on many processes: torch.distributed as torchrun sets it up, and what ranks exchange.

    torchrun --nproc-per-node 8 -m lopd train --url ... --batch-size 4 --grad-accum 2 ...

Each rank reads its own partition of the dataset through its own client (`EpochSampler` with the
rank and world size: no rank ever fetches another's samples), runs the forward and backward
passes on it, and DDP averages the gradients. The definitions a user can rely on:

* **Global batch** = `--batch-size` x `--grad-accum` x world size sequences per optimizer step.
  Step k of an epoch consumes the k-th slice of that size of the epoch's permutation, whatever
  the world size, so a run on N processes trains on the same samples, step by step, as one
  process with `--batch-size` N times larger; losses are means over the global batch's tokens
  (or sequences), so it computes the same loss and the same update too (to float rounding).
* **Even batches.** DDP needs every rank to run the same number of passes. An epoch's last
  global batch may have fewer samples than ranks; a rank whose share is empty then runs a filler
  batch with zero weight (`EpochSampler(even_batches=True)`), so every sample is still used
  exactly once per epoch.
* **`--parallelism fsdp`** shards the student's parameters, gradients and AdamW moments over
  the ranks (torch's FSDP2: `fully_shard` on each decoder layer, then on the whole model) instead
  of replicating them (DDP): the same global batch and the same updates, for models whose weights
  and optimizer state do not fit one device. A forward is then a collective, so evaluation runs on
  every rank. The checkpoint holds the full (unsharded) model and optimizer state, gathered
  before rank 0 writes it, so `model/` is a plain model directory; a run resumes with the
  parallelism it was started with. Not with LoRA (the adapter is small: DDP replicates it cheaply).
* **Rank 0 writes** the checkpoint, the metrics, the exported model and the progress lines. The
  checkpoint holds every rank's loader position and RNG state (`loaders`, `rngs`); it resumes with
  the same world size, and a run on another world size is refused before any weight loads.

Without `WORLD_SIZE` in the environment (a plain `lopd train`) nothing here starts a process group.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lopd.errors import InvalidInput

from .sampler import EpochSampler


@dataclass
class Ranks:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this module started the process group, so it ends it
    parallelism: str = "ddp"  # --parallelism

    @property
    def sharded(self) -> bool:
        """FSDP on many processes: the model's forward, state dict and export are collectives."""
        return self.parallelism == "fsdp" and self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: Any) -> Any:
        """The model to train through: DDP over `model` (or `model` sharded in place by FSDP2) on
        many processes, `model` itself on one."""
        if self.world_size == 1:
            return model
        if self.sharded:
            return _fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers off: the buffers (rotary tables) are not trained, identical on every rank,
        # and broadcasting them would make every forward a collective (rank 0 evaluates alone).
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, model: Any, last: bool) -> AbstractContextManager[Any]:
        """Skip the gradients' all-reduce (DDP) or reduce-scatter (FSDP) on every micro-batch of a step but the last."""
        if self.sharded:
            model.set_requires_gradient_sync(last)
            return nullcontext()
        if self.world_size == 1 or last:
            return nullcontext()
        return model.no_sync()  # type: ignore[no-any-return]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (one collective)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()  # type: ignore[no-any-return]

    def max(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _fully_shard(model: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    # The decoder layers are the units transformers itself never splits (`_no_split_modules`).
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise InvalidInput(
            f"--parallelism fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
            "by; use --parallelism ddp"
        )
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


# Full (unsharded) state dicts, as one process would have them: under FSDP, gathered with a
# collective every rank must enter; rank 0 gets them (on the CPU), the others an empty dict.
def model_state(ranks: Ranks, model: Any) -> dict[str, Any]:
    """The full model state dict (a collective under FSDP, where only rank 0 gets it)."""
    if not ranks.sharded:
        return model.state_dict()  # type: ignore[no-any-return]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model_state(ranks: Ranks, model: Any, state: dict[str, Any]) -> None:
    """Load a full model state dict (every rank passes the whole of it; FSDP keeps its shard)."""
    if not ranks.sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(ranks: Ranks, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state dict (under FSDP keyed by parameter name, a collective, rank 0 gets it)."""
    if not ranks.sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)  # type: ignore[return-value]


def load_optimizer_state(ranks: Ranks, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not ranks.sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def init_ranks(device: str, parallelism: str = "ddp") -> Ranks:
    """Join the job torchrun started (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`), or be its only rank.

    `device` is `--device`: under torchrun, `cuda` means `cuda:LOCAL_RANK` (NCCL) and `cpu` the CPU
    (gloo); a fixed `cuda:N` is refused, since every rank would take the same GPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(device=torch.device(device), parallelism=parallelism)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):
        raise InvalidInput(
            f"--device {device} under torchrun would put every rank on one GPU; use --device cuda "
            "(each rank takes cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    where = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    return Ranks(
        rank=rank, world_size=world_size, local_rank=local_rank, device=where, owns_group=owns, parallelism=parallelism
    )


def check_world_size(saved: int, ranks: Ranks) -> None:
    """Refuse to resume a checkpoint of another world size, saying how to resume it."""
    if saved != ranks.world_size:
        raise InvalidInput(
            f"the checkpoint was trained on {saved} process(es), this run has {ranks.world_size}. Each rank's "
            "position in the epoch depends on the world size, so the rest of the epoch cannot be split "
            f"otherwise without repeating or skipping samples: resume with {saved} process(es) "
            f"(torchrun --nproc-per-node {saved} ..., or plain `lopd train` for 1), or start a new run"
        )


def weigh_fillers(batch: dict[str, Any], sampler: EpochSampler) -> dict[str, Any]:
    """Give an `even_batches` filler zero weight (no response token counts) and mark it `filler`."""
    filler = sampler.is_filler(int(batch["epoch"]), int(batch["batch_index"]))
    if filler:
        batch = {**batch, "response_mask": torch.zeros_like(batch["response_mask"])}
    batch["filler"] = filler
    return batch


def step_samples(micro: list[dict[str, Any]], ranks: Ranks) -> dict[str, list[Any]] | None:
    """What a step trained on, gathered from every rank (a collective; rank 0 gets it, the others
    None): `indices` and `sample_ids`, micro-batch by micro-batch, rank by rank within one, without
    fillers. That is the order of the epoch's permutation, whatever the world size."""
    mine = [([], []) if b["filler"] else (b["index"].tolist(), list(b["sample_id"])) for b in micro]
    everyone = ranks.gather(mine)
    if not ranks.is_main:
        return None
    indices: list[int] = []
    ids: list[str] = []
    for j in range(len(micro)):
        for r in range(ranks.world_size):
            indices += everyone[r][j][0]
            ids += everyone[r][j][1]
    return {"indices": indices, "sample_ids": ids}
