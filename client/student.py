"""The student model of `lopd train`: loading (precision, LoRA, gradient checkpointing), its
trainable state for checkpoints, and the model directory a run leaves behind.

Precision is mixed, not low: the weights the optimizer updates stay float32 (so are AdamW's
moments) and `--dtype` applies to the forward through autocast, as in most fine-tuning recipes.
Frozen weights (the base model under LoRA) have no update to lose, so they are held in `--dtype`,
which halves their memory. The student's log-probs and the loss are always float32 (`trainer.py`).

With LoRA the run directory holds `adapter/` (the peft adapter, small) and `model/`, the adapter
merged into a float32 copy of the student: a plain model directory that `from_pretrained`, vLLM
and `lopd precompute --rollout-policy` load without peft. The merge loads the student once more,
on the CPU, at each checkpoint (peft's own way; merging the live model in place and back would
not restore its weights bit for bit, and resume must be exact).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from lopd.errors import InvalidInput

from .config import TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _import_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise InvalidInput("--lora-rank needs the peft package: pip install 'lightning-opd[train]'") from e
    return peft


def load_student(cfg: TrainConfig, device: torch.device) -> Any:
    """The student of `cfg.student` on `device`, with LoRA and gradient checkpointing as configured.

    Parameters that will be trained are float32; with LoRA, the frozen base is held in `cfg.dtype`.
    Seed torch first: LoRA initialises its A matrices from torch's generator.
    """
    from transformers import AutoModelForCausalLM

    peft = _import_peft() if cfg.lora_rank else None  # a missing package fails before the weights load
    base_dtype = DTYPES[cfg.dtype] if cfg.lora_rank else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(str(cfg.student), dtype=base_dtype)  # type: ignore[arg-type]
    if cfg.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise InvalidInput(f"{type(model).__name__} does not support gradient checkpointing; drop the flag")
        # Non-reentrant checkpointing needs no input that requires grad, so it works under LoRA as is.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if peft is not None:
        modules = cfg.lora_target_modules
        lora = peft.LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
            target_modules=modules if modules == "all-linear" else modules.split(","),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            model = peft.get_peft_model(model, lora)
        except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
            raise InvalidInput(f"--lora-target-modules {modules}: {e}") from e
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.to(device)


def autocast(cfg: TrainConfig, device: torch.device) -> AbstractContextManager[Any]:
    """The forward's precision context: nothing for float32, autocast to `cfg.dtype` otherwise."""
    if cfg.dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[cfg.dtype])


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """float16's narrow range needs dynamic loss scaling; for the other dtypes a disabled (pass-through) scaler."""
    return torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def student_state(cfg: TrainConfig, model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: everything, or under LoRA only the adapter (the base
    is reloaded from `cfg.student`, unchanged by training)."""
    state = model.state_dict()
    if not cfg.lora_rank:
        return state
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def load_student_state(cfg: TrainConfig, model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load `student_state`'s dict back, refusing one of another shape of run (LoRA or not, other modules)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=not cfg.lora_rank)
    except RuntimeError as e:
        raise InvalidInput(f"the checkpoint's model does not fit this one (other --lora-* settings?): {e}") from e
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or trainable & set(missing):
        raise InvalidInput(
            "the checkpoint's model does not fit this one: resume with the --lora-* settings it was trained with "
            f"(unexpected: {sorted(unexpected)[:3]}, missing: {sorted(trainable & set(missing))[:3]})"
        )


def _swap_in(dest: Path, write: Callable[[Path], None]) -> None:
    """Write into a fresh directory, then swap it in, so `dest` is never half-written."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    old = dest.with_name(f".{dest.name}.old")
    for p in (tmp, old):
        shutil.rmtree(p, ignore_errors=True)
    write(tmp)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def export_student(
    cfg: TrainConfig,
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    adapter_dir: Path,
    state: dict[str, Any] | None = None,
) -> None:
    """`save_pretrained` the student into `model_dir`; under LoRA, the adapter into `adapter_dir` and
    the adapter merged into a float32 copy of `cfg.student` (loaded on the CPU) into `model_dir`.

    `state`: the student's full state dict, when `model` itself cannot save it (sharded by FSDP):
    it is loaded into a float32 copy of `cfg.student` on the CPU, which is saved instead."""

    def save(obj: Any) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            obj.save_pretrained(str(path))
            tokenizer.save_pretrained(str(path))

        return write

    if state is not None:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(cfg.student), dtype=torch.float32)  # type: ignore[arg-type]
        plain.load_state_dict(state)
        _swap_in(model_dir, save(plain))
        return
    if not cfg.lora_rank:
        _swap_in(model_dir, save(model))
        return
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _swap_in(adapter_dir, save(model))
    base = AutoModelForCausalLM.from_pretrained(str(cfg.student), dtype=torch.float32)  # type: ignore[arg-type]
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    _swap_in(model_dir, save(merged))
