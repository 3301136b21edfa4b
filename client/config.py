"""`TrainConfig`: the reference trainer's settings, declared once (no torch: `lopd --help` stays light).

Every field is a `lopd train` flag and a `LOPD_<FIELD>` variable (`LOPD_TOKEN` for the server's
bearer token); the whole config, less the token, is saved in every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lopd.config import LopdSettings

# The losses on the teacher's stored top-k (`lopd.client.topk_loss`), and every loss `--loss` takes.
TopKLoss = Literal["forward-kl-topk", "reverse-kl-topk", "jsd-topk"]
LossName = Literal["lightning-opd", TopKLoss]


class TrainConfig(LopdSettings):
    """Everything a run depends on; saved in every checkpoint."""

    url: str = Field(description="Base URL of a `lopd serve` endpoint, e.g. http://host:8000.")
    dataset: str = Field(description="Dataset name on the server.")
    student: Path = Field(description="Student model directory (Hugging Face format, with tokenizer).")
    out: Path = Field(description="Run directory: checkpoint.pt, metrics.csv, eval.csv, model/ (adapter/ with LoRA).")
    steps: int = Field(100, ge=1, description="Optimizer steps to train to (counted from the run's start).")
    # The global batch is batch_size x grad_accum x processes (torchrun's world size; client/distributed.py).
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch, on each process.")
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step, on each process: a step trains on batch-size x grad-accum x "
        "processes sequences.",
    )
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warmup steps.")
    max_grad_norm: float | None = Field(1.0, description="Gradient-norm clipping (0: off).")
    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    # Mixed precision, not pure low-precision weights: the weights the optimizer updates (and its
    # moments) stay float32, only the forward runs in --dtype. Distillation lrs of 1e-6 on weights
    # of ~1e-2 are updates bfloat16's 8-bit mantissa would round away.
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Forward precision (autocast); trained weights stay float32 and the loss is computed in float32. "
        "float16 adds a dynamic loss scaler. With LoRA the frozen base weights are held in this dtype.",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp replicates the student on every process; fsdp shards its weights, gradients "
        "and optimizer state over them (FSDP2, per decoder layer), for students too large for one device. Not with "
        "LoRA.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: much less memory, about a third more compute."
    )
    lora_rank: int = Field(0, ge=0, description="Train a LoRA adapter of this rank instead of every weight (0: off).")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA scale numerator (the update is scaled by alpha / rank; default: 2 x rank)."
    )
    lora_target_modules: str = Field(
        "all-linear",
        description="Modules that get LoRA adapters: comma-separated names (e.g. q_proj,v_proj) or all-linear "
        "(every linear layer but the output head).",
    )
    eval_samples: int = Field(
        0,
        ge=0,
        description="Hold out N samples of the dataset from training and evaluate on them (0: off). They depend "
        "on N and the dataset version only, not on --seed, so runs compare on the same samples.",
    )
    eval_every: int = Field(100, ge=1, description="Evaluate on the held-out samples every N steps (and at the end).")
    seed: int = Field(0, description="Seed of the data order and of torch.")
    version: int | None = Field(None, ge=1, description="Dataset version (default: the latest, pinned).")
    sft_teacher: str | None = Field(
        None, description="Fingerprint (or directory) of the model that generated the student's SFT data."
    )
    allow_inconsistent: bool = Field(False, description="Train even if teacher or tokenizer consistency fails.")
    resume: bool = Field(False, description="Continue the run saved in --out.")
    token: str | None = Field(None, repr=False, description="Bearer token for the server (or set LOPD_TOKEN).")
    log_every: int = Field(
        10, ge=1, description="Print a progress line (loss, KL, tokens/s, data-wait share) every N steps."
    )
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    record_samples: bool = Field(
        False, description="Write steps.jsonl: the dataset indices and sample ids each step trained on, in order."
    )
    prefetch: int = Field(4, ge=0, description="Batches fetched ahead of the trainer.")
    clip_eps_low: float = Field(0.2, ge=0, description="PPO ratio clipping epsilon below 1.")
    clip_eps_high: float = Field(0.2, ge=0, description="PPO ratio clipping epsilon above 1.")
    # Truncated importance weights min(p_current / p_rollout, cap) over the stored rollout log-probs (the paper's
    # option; with --ratio-reference rollout they are 1). Rows without rollout log-probs get weight 1.
    tis_cap: float | None = Field(
        None, ge=0, description="Truncated importance weight cap over the stored rollout log-probs (0 or unset: off)."
    )
    # "rollout" (the default): the stored rollout log-probs are the PPO old log-probs, a trust region around the
    # policy that sampled the data. "current": ratio 1, the paper's algorithm. The default follows what `lopd demo`
    # measured (README, "What lopd demo shows"): the paper's update, even with TIS, collapsed on some seeds where
    # the trust region was stable and best (docs/results/). Rows without rollout log-probs get ratio 1.
    ratio_reference: Literal["rollout", "current"] = Field(
        "rollout",
        description="PPO ratio against the rollout policy (stored log-probs) or the current policy (ratio 1).",
    )
    normalize: Literal["token", "sequence"] = Field("token", description="Loss mean over tokens or over sequences.")
    # lightning-opd needs only the sampled token's teacher log-prob; the others read the teacher's stored
    # top-k (a dataset built with `lopd precompute --top-k K`) and fetch it: K more ids and floats a token.
    loss: LossName = Field(
        "lightning-opd",
        description="lightning-opd (policy gradient on the teacher's log-prob of each sampled token), or a "
        "distillation loss on the teacher's stored top-k: forward-kl-topk (verl's), reverse-kl-topk, jsd-topk "
        "(GKD's generalised JSD). The top-k ones need a dataset built with --top-k.",
    )
    jsd_beta: float = Field(0.5, ge=0, le=1, description="jsd-topk's beta (0: forward KL, 1: reverse KL).")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (out/tensorboard).")
    wandb: bool = Field(False, description="Also log to Weights & Biases.")
    wandb_project: str = Field("lightning-opd", description="Weights & Biases project.")
    retries: int = Field(5, ge=0, description="Retries of a failed request to the server.")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for the server's answer.")

    @field_validator("lora_target_modules")
    @classmethod
    def _module_names(cls, value: str) -> str:
        names = [m.strip() for m in value.split(",") if m.strip()]
        if not names:
            raise ValueError("name at least one module (e.g. q_proj,v_proj), or use all-linear")
        return ",".join(names)

    @field_validator("max_grad_norm", "tis_cap")
    @classmethod
    def _zero_is_off(cls, value: float | None) -> float | None:
        return value or None

    def to_json(self) -> dict[str, Any]:
        """The config as saved in checkpoints and logged to trackers: everything but the token."""
        return self.model_dump(mode="json", exclude={"token"})
