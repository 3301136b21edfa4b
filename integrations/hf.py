"""`LightningOPDTrainer`: Lightning OPD as a Hugging Face `transformers.Trainer`, the TRL way.

    from lopd.integrations.hf import LightningOPDConfig, LightningOPDTrainer

    args = LightningOPDConfig(output_dir="runs/opd", store_url="http://store:8000", dataset_name="math-v1",
                              sft_teacher="sha256:...", max_steps=200, per_device_train_batch_size=4)
    LightningOPDTrainer(model="/models/student-sft", args=args).train()

The training set is a dataset of a `lopd serve` store, read through `lopd.client` (no `datasets`
object, nothing on local disk); the loss is `lightning_opd_loss` through the same function as
`lopd train` (`lopd.client.objective.opd_batch_loss`). Everything else is the `Trainer`'s:
`accelerate launch` / `torchrun` (DDP, FSDP, DeepSpeed), mixed precision, callbacks, loggers,
`checkpoint-N` folders, `train(resume_from_checkpoint=...)`.

Following TRL: a config dataclass over `TrainingArguments` (`LightningOPDConfig`), `model` as a
model or a path (loaded with `model_init_kwargs`), `processing_class` (loaded from the model's path
when not given), `_tag_names`, and `loss_is_scaled_for_ga`.

What it defines, as `lopd train` does (`lopd.client.distributed`):

* **Data.** Each process reads its own partition (`EpochSampler` with the process index and
  count, even batches: an epoch tail with fewer samples than processes gives the others a
  zero-weight filler). The order depends only on the seed (`data_seed`, else `seed`), so it is
  `lopd train`'s order for the same seed and global batch. Training is step-based: set
  `max_steps`; epochs roll over in the sampler.
* **Global batch** = `per_device_train_batch_size` x `gradient_accumulation_steps` x processes;
  the loss is the mean over the global batch's response tokens (or sequences), the same number
  `lopd train` computes for that batch.
* **Consistency.** `train()` checks the dataset (teacher consistency, the student's tokenizer)
  with `check_dataset_for_training` before anything is fetched or trained.
* **Resume.** Every `checkpoint-N` folder also holds `lopd_loader.json`, every process's position
  in its epoch; `train(resume_from_checkpoint=...)` continues from it exactly (HF's own skipping
  of batches is turned off: `ignore_data_skip`), and refuses a checkpoint of another process
  count or another dataset version's content.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from lopd.client.config import TrainConfig
from lopd.client.consistency import check_dataset_for_training
from lopd.client.distributed import Ranks, check_world_size, step_samples, weigh_fillers
from lopd.client.http import StoreClient
from lopd.client.loader import OPDLoader
from lopd.client.objective import opd_batch_loss
from lopd.client.rundir import STEPS, JSONLog
from lopd.client.types import DatasetInfo
from lopd.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)

LOADER_STATE = "lopd_loader.json"  # in each checkpoint-N folder

__all__ = ["LOADER_STATE", "LightningOPDConfig", "LightningOPDTrainer"]


def _from_train_config(name: str) -> Any:
    """A field declared once, in `TrainConfig`: its default and help (the loss's settings)."""
    info = TrainConfig.model_fields[name]
    return field(default=info.default, metadata={"help": info.description})


@dataclass
class LightningOPDConfig(TrainingArguments):
    """`TrainingArguments` plus the store to read and the Lightning OPD loss's settings.

    The loss's fields (`clip_eps_low`, `clip_eps_high`, `tis_cap`, `ratio_reference`, `normalize`)
    are `lopd train`'s, with its defaults. `max_steps` must be set (the store is read step by step).
    """

    store_url: str | None = field(default=None, metadata={"help": "Base URL of a `lopd serve` endpoint."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name on the server."})
    dataset_version: int | None = field(
        default=None, metadata={"help": "Dataset version (default: the latest, pinned for the run)."}
    )
    store_token: str | None = field(
        default=None, metadata={"help": "Bearer token for the server (default: the LOPD_TOKEN variable)."}
    )
    sft_teacher: str | None = _from_train_config("sft_teacher")
    allow_inconsistent: bool = _from_train_config("allow_inconsistent")
    clip_eps_low: float = _from_train_config("clip_eps_low")
    clip_eps_high: float = _from_train_config("clip_eps_high")
    tis_cap: float | None = _from_train_config("tis_cap")
    ratio_reference: str = _from_train_config("ratio_reference")
    normalize: str = _from_train_config("normalize")
    prefetch: int = _from_train_config("prefetch")
    record_samples: bool = _from_train_config("record_samples")
    model_init_kwargs: dict[str, Any] | None = field(
        default=None, metadata={"help": "Keyword arguments of `from_pretrained` when `model` is a path."}
    )
    learning_rate: float = field(default=TrainConfig.model_fields["lr"].default, metadata={"help": "AdamW lr."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.store_url or not self.dataset_name:
            raise ValueError("LightningOPDConfig needs store_url and dataset_name (the store to train from)")
        if self.max_steps is None or self.max_steps <= 0:
            raise ValueError("LightningOPDConfig needs max_steps > 0: the store is read step by step, not by epochs")
        checks = TrainConfig.model_validate(
            {"url": self.store_url, "dataset": self.dataset_name, "student": ".", "out": ".",
             **{k: getattr(self, k) for k in ("clip_eps_low", "clip_eps_high", "tis_cap", "ratio_reference",
                                              "normalize", "prefetch")}}
        )  # fmt: skip
        del checks  # validated by the one declaration of these settings
        # The data position is the loader's (lopd_loader.json), not a count of batches to skip.
        self.ignore_data_skip = True


class _StoreBatches:
    """The trainer's train "dataloader": this process's batches, endless, fillers weighed zero.

    No `__len__`, so the `Trainer` runs to `max_steps`; `close()` stops the prefetch threads.
    """

    def __init__(self, loader: OPDLoader) -> None:
        self.loader = loader
        self._stream: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.close()
        self._stream = iter(self.loader)
        for batch in self._stream:
            yield weigh_fillers(batch, self.loader.sampler)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()  # type: ignore[attr-defined]
            self._stream = None


class LightningOPDTrainer(Trainer):
    """A `transformers.Trainer` that trains a causal LM with Lightning OPD on a served store.

    `model`: a `PreTrainedModel` or a path (loaded with `args.model_init_kwargs`);
    `processing_class`: the student's tokenizer (default: loaded from the model's path); `client`:
    a `StoreClient` to use instead of one built from `args.store_url` / `args.store_token`.
    """

    _tag_names = ["trl", "lightning-opd"]
    _name = "Lightning OPD"
    # compute_loss divides by the step's global token (sequence) count: already scaled for accumulation.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: Any,
        args: LightningOPDConfig,
        processing_class: Any = None,
        client: StoreClient | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(args, LightningOPDConfig):
            raise TypeError("LightningOPDTrainer needs args=LightningOPDConfig(...)")
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != args.world_size:  # every process would train alone on all of the data
            raise InvalidInput(
                f"launched on {launched} processes, but the Trainer sees {args.world_size}: on CPUs, pass "
                "use_cpu=True (or launch with `accelerate launch --cpu`, or set ACCELERATE_USE_CPU=1)"
            )
        if isinstance(model, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(str(model), **(args.model_init_kwargs or {}))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path)
        token = args.store_token or os.environ.get("LOPD_TOKEN")
        self.client = client if client is not None else StoreClient(args.store_url or "", token)
        self.info: DatasetInfo = self.client.manifest(args.dataset_name or "", args.dataset_version)
        super().__init__(model=model, args=args, processing_class=processing_class, **kwargs)
        if Version(transformers.__version__) < Version("5.19"):  # older Trainers read these two instead (as TRL does)
            self.model_accepts_loss_kwargs = False
            self.compute_loss_func = "non-None value to disable scaling"  # type: ignore[assignment]
        self._batches: _StoreBatches | None = None
        self._sequences = 1.0  # the step's sequence count over all processes (normalize="sequence")
        self._sums = torch.zeros(4, dtype=torch.float64)  # advantage, clip, weight (token-weighted), tokens
        self._steps_log: JSONLog | None = None

    # -- data ------------------------------------------------------------------------------------

    def _ranks(self) -> Ranks:
        return Ranks(
            rank=self.args.process_index, world_size=self.args.world_size, device=self.args.device
        )  # fmt: skip

    def _make_loader(self, checkpoint: str | None) -> OPDLoader:
        args: LightningOPDConfig = self.args  # type: ignore[assignment]
        ranks, state = self._ranks(), None
        if checkpoint is not None:
            path = Path(checkpoint) / LOADER_STATE
            if not path.is_file():
                raise NotFound(f"{checkpoint} has no {LOADER_STATE}: it was not written by LightningOPDTrainer")
            saved = json.loads(path.read_text())
            check_world_size(int(saved["world_size"]), ranks)
            state = saved["loaders"][ranks.rank]
            if state["version"] != self.info.version:  # continue on the checkpoint's version
                self.info = self.client.manifest(self.info.name, int(state["version"]))
        pad = getattr(self.processing_class, "pad_token_id", None)
        loader = OPDLoader(
            self.client, self.info.name, args.per_device_train_batch_size,
            seed=args.data_seed if args.data_seed is not None else args.seed, rank=ranks.rank,
            world_size=ranks.world_size, prefetch=args.prefetch, num_epochs=None, pad_id=pad or 0, info=self.info,
        )  # fmt: skip
        loader.sampler = loader.sampler.evened()
        if state is not None:
            loader.load_state_dict(state)  # refuses other content, batch size or seed
        return loader

    def get_train_dataloader(self) -> Any:
        """This process's batches from the store (already partitioned: not prepared by accelerate)."""
        if self._batches is None:
            raise RuntimeError("call train(): it pins the data and checks it first")
        return self._batches

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """A step's micro-batches, and its response-token count over every process (the loss's denominator)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = sum(int(b["response_mask"].sum()) for b in batches)
        sequences = sum(int((b["response_mask"].sum(-1) > 0).sum()) for b in batches)
        counts = self._ranks().sum([float(tokens), float(sequences)])
        self._sequences = max(counts[1], 1.0)
        if self.args.record_samples:  # type: ignore[attr-defined]
            consumed = step_samples(batches, self._ranks())
            if self._steps_log is not None and consumed is not None:
                self._steps_log.write({"step": self.state.global_step + 1, **consumed})
        return batches, torch.tensor(max(counts[0], 1.0), device=device)

    # -- the loss --------------------------------------------------------------------------------

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """`lightning_opd_loss` of the micro-batch, as its share of the global batch's mean."""
        args: LightningOPDConfig = self.args  # type: ignore[assignment]
        if num_items_in_batch is None:  # outside a training step: this batch alone
            num_items_in_batch = max(float(inputs["response_mask"].sum()), 1.0)
        loss, m = opd_batch_loss(args, model, None, inputs, num_items_in_batch)
        if args.normalize == "sequence":
            loss = loss * (float((inputs["response_mask"].sum(-1) > 0).sum()) / self._sequences)
        if model.training:
            m_tokens = m["tokens"].double().cpu()
            self._sums += torch.stack(
                [m["mean_advantage"].double().cpu() * m_tokens, m["clip_frac"].double().cpu() * m_tokens,
                 m["mean_importance_weight"].double().cpu() * m_tokens, m_tokens]
            )  # fmt: skip
        # DDP (and FSDP, DeepSpeed) average gradients over processes; the loss is already a share of the
        # global mean, so undo the average. The logged loss (mean over processes) is then the global one.
        loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds `mean_advantage`, `reverse_kl`, `clip_frac`, `mean_importance_weight` since the last log."""
        if "loss" in logs:  # a training log, on every process (the sum is a collective)
            adv, clip, weight, tokens = self._ranks().sum(self._sums.tolist())
            tokens = max(tokens, 1.0)
            logs = {**logs, "mean_advantage": adv / tokens, "reverse_kl": -adv / tokens,
                    "clip_frac": clip / tokens, "mean_importance_weight": weight / tokens}  # fmt: skip
            self._sums.zero_()
        super().log(logs, start_time)

    # -- train, save, resume ---------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """Check the dataset (teacher consistency, tokenizer), pin it, then train; `resume_from_checkpoint`
        (a `checkpoint-N` folder, or True for the last one in `output_dir`) continues exactly."""
        args: LightningOPDConfig = self.args  # type: ignore[assignment]
        checkpoint: str | None = None
        if resume_from_checkpoint is True:
            checkpoint = get_last_checkpoint(args.output_dir)
            if checkpoint is None:
                raise NotFound(f"resume_from_checkpoint=True: no checkpoint in {args.output_dir}")
        elif resume_from_checkpoint:
            checkpoint = str(resume_from_checkpoint)
        loader = self._make_loader(checkpoint)
        check_dataset_for_training(
            self.info, student_tokenizer=self.processing_class, sft_teacher=args.sft_teacher,
            allow_inconsistent=args.allow_inconsistent,
        )  # fmt: skip
        if self.is_world_process_zero():
            log.info("dataset %s v%s: %s samples, %s", self.info.name, self.info.version, self.info.num_samples,
                     self.info.verdict)  # fmt: skip
            if args.record_samples:
                step = int(Path(checkpoint).name.rsplit("-", 1)[-1]) if checkpoint else 0
                out = Path(str(args.output_dir))
                out.mkdir(parents=True, exist_ok=True)
                self._steps_log = JSONLog(out / STEPS, resume_step=step)
        self._batches = _StoreBatches(loader)
        try:
            return super().train(resume_from_checkpoint=checkpoint, **kwargs)
        finally:
            self._batches.close()

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._batches is None:
            return
        loaders = self._ranks().gather(self._batches.loader.state_dict())  # every process's position
        if self.is_world_process_zero():
            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if not folder.is_dir():
                raise InvalidInput(f"the Trainer wrote no checkpoint folder {folder}")
            tmp = folder / f".{LOADER_STATE}.tmp"
            tmp.write_text(json.dumps({"world_size": self.args.world_size, "loaders": loaders}, indent=1))
            os.replace(tmp, folder / LOADER_STATE)
