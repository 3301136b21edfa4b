"""slime (THUDM/slime, the Lightning OPD paper's own stack): a rollout function that reads the store.

    python train.py ... \\
        --rollout-function-path lopd.integrations.slime.generate_rollout \\
        --custom-config-path lopd.yaml \\
        --use-opd --opd-type sglang --opd-kl-coef 1.0 \\
        --rollout-batch-size 64 --n-samples-per-prompt 1 --global-batch-size 64

    # lopd.yaml (slime sets each key on its args)
    lopd_url: http://store:8000
    lopd_dataset: math-v1
    lopd_version: 3            # pin it: a restarted job then reads exactly the same batches
    lopd_seed: 0
    lopd_sft_teacher: sha256:...

Each rollout step reads `rollout_batch_size x n_samples_per_prompt` stored samples over HTTP,
instead of generating and scoring: slime's `Sample`s with `tokens` (prompt then response),
`response_length`, `reward` 0.0 (the signal is the OPD term), `status` COMPLETED, `loss_mask`
over the response, `teacher_log_probs` (a 1-D float32 tensor, one per response token: what
`--use-opd` reads) and `rollout_log_probs` (the stored sampling policy's, when every sample of
the batch has them; slime reads them only through `samples[0]`). No slime fork and no metadata
flag: upstream slime's OPD reads `Sample.teacher_log_probs` whatever produced it (`--opd-type
sglang` only says the teacher is not a Megatron model loaded for training).

**Deterministic by rollout id.** Rollout k is batch k of the store's epoch order for the seed
(`EpochSampler`, batches of the rollout size, epochs rolling over, the tail of each epoch
dropped so every rollout is full), so a restarted job that resumes at rollout k reads the same
batches, and the order is `lopd train`'s for the same seed. Settings come from slime's args
(`--custom-config-path` YAML), or else `LOPD_URL`, `LOPD_DATASET`, `LOPD_VERSION`, `LOPD_SEED`,
`LOPD_TOKEN`. The first call checks the dataset like `lopd train` (teacher consistency;
the tokenizer of `--hf-checkpoint`) and refuses to feed slime otherwise
(`lopd_allow_inconsistent: true` overrides).

The contract followed is slime's source at commit 624b824a898ab0ec1fcb4d373004c7f3852bf515
(2026-08-21): `slime/rollout/base_types.py` (`RolloutFnTrainOutput(samples: list[list[Sample]],
metrics)`, `RolloutFnEvalOutput`, `call_rollout_fn`), `slime/utils/types.py` (`Sample`, whose
`teacher_log_probs` slime's own `slime/rollout/on_policy_distillation.py` fills with float32
tensors), `slime/utils/arguments.py` (`--rollout-function-path`: `generate_rollout(args,
rollout_id, data_source, evaluation=False)` setting at least `tokens`, `response_length`,
`reward` and `status`; `--custom-config-path`; `--use-opd`), `slime/rollout/forge_load.py` (a
rollout function replaying stored samples), and `slime/ray/rollout.py`
(`_convert_samples_to_train_data`, which consumes them).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from lopd.arrow import list_column
from lopd.client.consistency import check_dataset_for_training
from lopd.client.http import StoreClient
from lopd.client.sampler import EpochSampler
from lopd.client.types import DatasetInfo
from lopd.errors import InvalidInput
from lopd.http_contract import PROMPT_IDS, RESPONSE_IDS, ROLLOUT_LOGPROBS, SAMPLE_ID, TEACHER_LOGPROBS

log = logging.getLogger(__name__)

SLIME_COMMIT = "624b824a898ab0ec1fcb4d373004c7f3852bf515"

__all__ = ["SLIME_COMMIT", "RolloutSource", "generate_rollout", "rollout_indices"]


def _setting(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, f"lopd_{name}", None)
    if value is None:
        value = os.environ.get(f"LOPD_{name.upper()}")
    return default if value is None else value


@dataclass
class RolloutSource:
    """A pinned dataset version and the order its rollouts are read in."""

    client: StoreClient
    info: DatasetInfo
    sampler: EpochSampler  # batches of one rollout step, drop_last

    @classmethod
    def from_args(cls, args: Any) -> RolloutSource:
        url, dataset = _setting(args, "url"), _setting(args, "dataset")
        if not url or not dataset:
            raise InvalidInput(
                "lopd.integrations.slime needs the store: set lopd_url and lopd_dataset in the YAML of "
                "--custom-config-path (or LOPD_URL and LOPD_DATASET)"
            )
        version = _setting(args, "version")
        client = StoreClient(str(url), _setting(args, "token"))
        info = client.manifest(str(dataset), None if version is None else int(version))
        if version is None:
            log.warning(
                "lopd: reading %s v%s, the latest version; set lopd_version: %s so that a restarted job reads the "
                "same batches even after a newer version is published", info.name, info.version, info.version,
            )  # fmt: skip
        check_dataset_for_training(
            info, student_tokenizer=getattr(args, "hf_checkpoint", None), sft_teacher=_setting(args, "sft_teacher"),
            allow_inconsistent=str(_setting(args, "allow_inconsistent", False)).lower() in ("1", "true", "yes"),
        )  # fmt: skip
        size = int(args.rollout_batch_size) * int(getattr(args, "n_samples_per_prompt", 1) or 1)
        if size > info.num_samples:
            raise InvalidInput(
                f"a rollout of {size} samples (rollout_batch_size x n_samples_per_prompt) is more than "
                f"{info.name} v{info.version} holds ({info.num_samples}); lower --rollout-batch-size"
            )
        seed = int(_setting(args, "seed", getattr(args, "seed", 0) or 0))
        sampler = EpochSampler(
            info.num_samples, size, seed=seed, drop_last=True, dataset=info.name, version=info.version,
            content_hash=info.content_hash,
        )  # fmt: skip
        return cls(client=client, info=info, sampler=sampler)

    def indices(self, rollout_id: int) -> np.ndarray:
        """The dataset indices of rollout `rollout_id`: batch `rollout_id` of the epochs laid end to end."""
        per_epoch = len(self.sampler)
        return self.sampler.epoch_batches(rollout_id // per_epoch)[rollout_id % per_epoch]


_sources: dict[tuple[Any, ...], RolloutSource] = {}
_lock = threading.Lock()


def _source(args: Any) -> RolloutSource:
    names = ("url", "dataset", "version", "seed", "token", "sft_teacher", "allow_inconsistent")
    shape = ("rollout_batch_size", "n_samples_per_prompt", "seed", "hf_checkpoint")
    key = tuple(_setting(args, k) for k in names) + tuple(getattr(args, k, None) for k in shape)
    with _lock:
        if key not in _sources:
            _sources[key] = RolloutSource.from_args(args)
        return _sources[key]


def rollout_indices(args: Any, rollout_id: int) -> list[int]:
    """The dataset indices `generate_rollout(args, rollout_id, ...)` reads, in order."""
    return _source(args).indices(int(rollout_id)).tolist()


def generate_rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False) -> Any:
    """slime's `--rollout-function-path`: rollout `rollout_id` read from the store (see the module docstring).

    Returns `RolloutFnTrainOutput(samples=...)`: `rollout_batch_size` groups of
    `n_samples_per_prompt` consecutive samples of the store's order. With `evaluation=True` there is
    nothing to generate offline: an empty `RolloutFnEvalOutput` (evaluate with slime's own
    `--eval-function-path`). `data_source` is not used: the store is the data source.
    """
    import torch

    try:
        from slime.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
        from slime.utils.types import Sample
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("lopd.integrations.slime runs inside slime (THUDM/slime)", name="slime") from e

    if evaluation:
        log.info("lopd: offline rollouts have nothing to evaluate; set --eval-function-path to evaluate")
        return RolloutFnEvalOutput(data={})
    source = _source(args)
    indices = source.indices(int(rollout_id))
    info = source.info
    table = source.client.fetch(info.name, indices, info.version, expected_content_hash=info.content_hash)
    prompts = list_column(table[PROMPT_IDS]).required_rows(PROMPT_IDS)
    responses = list_column(table[RESPONSE_IDS]).required_rows(RESPONSE_IDS)
    teachers = list_column(table[TEACHER_LOGPROBS], np.float32).required_rows(TEACHER_LOGPROBS)
    rollouts = list_column(table[ROLLOUT_LOGPROBS], np.float32).rows()
    ids = table.column(SAMPLE_ID).to_pylist()
    with_rollout = all(r is not None for r in rollouts)
    if not with_rollout and any(r is not None for r in rollouts):
        log.warning("lopd: rollout %s mixes samples with and without rollout log-probs; none are passed", rollout_id)

    per_group = int(getattr(args, "n_samples_per_prompt", 1) or 1)
    samples = []
    for j, (p, r, t, o) in enumerate(zip(prompts, responses, teachers, rollouts, strict=True)):
        samples.append(
            Sample(
                group_index=int(rollout_id) * int(args.rollout_batch_size) + j // per_group,
                index=int(rollout_id) * len(indices) + j,
                tokens=[int(x) for x in np.concatenate([p, r])],
                response_length=len(r),
                reward=0.0,
                loss_mask=[1] * len(r),
                rollout_log_probs=[float(x) for x in o] if with_rollout and o is not None else None,
                teacher_log_probs=torch.tensor(t, dtype=torch.float32),  # a copy: the batch's buffers are read-only
                status=Sample.Status.COMPLETED,
                metadata={
                    "source_name": f"lopd:{info.name}",
                    "lopd_sample_id": ids[j],
                    "lopd_index": int(indices[j]),
                    "lopd_version": info.version,
                },
            )
        )
    groups = [samples[i : i + per_group] for i in range(0, len(samples), per_group)]
    return RolloutFnTrainOutput(samples=groups)
