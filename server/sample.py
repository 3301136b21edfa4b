"""`lopd sample`: sample rollouts from a policy (the SFT student) on prompts, as `lopd precompute` reads them.

Input: JSONL files, one prompt a line: `{"id"?, "messages": [...]}` (a chat, rendered with the policy's
chat template and its generation prompt), `{"id"?, "prompt": "text"}` or `{"id"?, "prompt_ids": [...]}`;
ids default to `p<line>` and must be unique. Output: a directory of `part-NNNNN.jsonl` files, one record a
sample, `{"id": "<prompt id>/<k>", "prompt_ids", "response_ids", "rollout_logprobs", "finish_reason",
"prompt_id", "sample"}`, with the token ids exactly as sampled (through the end token when one was
sampled), and `_sampling.json`: the policy's fingerprint, its tokenizer's, the settings and the plan.
Rollout readers skip names starting with `_` or `.`, so `lopd precompute OUT` reads the parts unchanged.

`rollout_logprobs` are the policy's log-probs of the sampled tokens at the sampling settings: the
log-softmax of the logits after temperature and top-p, the distribution each token was drawn from
(vLLM's `logprobs_mode="processed_logprobs"`; transformers' processed `scores`). With `--top-p 1` they
are `log_softmax(logits / T)`, what `lopd precompute --rollout-policy` computes at `--rollout-temperature
T`. Only the flags shape sampling: the model's `generation_config` (its temperature, top-k, penalties) is
not applied, except the ids it must never emit (`suppress_tokens`, transformers backend).

Like precompute, the job is planned from the inputs alone: prompts, in order, split into parts of
`--prompts-per-part`; workers take parts round-robin (`--num-workers`, `--worker-index`); each part is
written atomically, and a rerun writes only the missing ones. An output directory sampled with other
settings or prompts is refused. The transformers backend seeds each prompt from `--seed` and its
index, so parts do not depend on workers or resumption; vLLM's CPU engine fails with per-request seeds
(`CPU Generator does not use offset`), so there parts are valid draws but not repeatable ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lopd.config import ARGUMENT, LopdSettings
from lopd.errors import InvalidInput
from lopd.fingerprint import model_fingerprint, tokenizer_fingerprint
from lopd.server.sampling import Sampled, load_sampler
from lopd.storage.atomic import atomic_write_bytes
from lopd.storage.manifest import ModelRef, Sampling

log = logging.getLogger(__name__)

SAMPLING_FILE = "_sampling.json"
PART_NAME = "part-{:05d}.jsonl"
# What must be equal for a rerun to add parts to an existing output (the workers' split may differ).
PLAN_KEYS = ("policy_fingerprint", "tokenizer_fingerprint", "backend", "dtype", "n", "temperature", "top_p",
             "max_tokens", "seed", "prompts_fingerprint", "num_prompts", "prompts_per_part")  # fmt: skip


class SampleConfig(LopdSettings):
    """`lopd sample`: every setting, its default and its help, declared once (flags and `LOPD_*` derive)."""

    prompts: list[Path] = Field(
        description="Prompt files (JSONL: one {id, messages | prompt | prompt_ids} a line).", json_schema_extra=ARGUMENT
    )
    policy: Path = Field(description="The sampling policy's model directory (the SFT student).")
    out: Path = Field(description="Output directory: rollout parts for `lopd precompute`, and _sampling.json.")
    backend: Literal["transformers", "vllm"] = Field("transformers", description="Sampling engine.")
    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the most likely tokens up to this mass.")
    max_tokens: int = Field(256, ge=1, description="Most tokens sampled per response.")
    seed: int = Field(0, ge=0, description="Seed (transformers: per prompt, from the seed and the prompt's index).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The policy's dtype.")
    device: str = Field("cpu", description="transformers backend: cpu, cuda or cuda:N (vllm picks its own).")
    prompts_per_part: int = Field(256, ge=1, description="Prompts per output part (the unit of resumption).")
    num_workers: int = Field(1, ge=1, description="Number of workers splitting the job (each runs this command).")
    worker_index: int = Field(0, ge=0, description="This worker's index, 0..num_workers-1.")
    progress: bool = Field(True, description="Show a progress bar.")

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.worker_index >= self.num_workers:
            raise ValueError(f"--worker-index must be in 0..{self.num_workers - 1} (got {self.worker_index})")
        if self.backend == "vllm" and self.device != "cpu":
            raise ValueError("--device applies to --backend transformers only (vLLM picks its device itself)")
        return self


@dataclass
class SampleResult:
    out: Path
    parts_sampled: int
    parts_missing: list[int] = field(default_factory=list)
    samples_written: int = 0


@dataclass(frozen=True)
class Prompt:
    id: str
    ids: list[int]


def read_prompts(paths: list[Path], tokenizer: Any) -> list[Prompt]:
    """Every prompt of `paths`, tokenized; refuses (naming file and line) anything unusable, before any sampling."""
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for path in paths:
        if not path.is_file():
            raise InvalidInput(f"prompt file {path} does not exist")
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path.name}:{line_no}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInput(f"{where}: not JSON ({e})") from None
                if not isinstance(rec, dict):
                    raise InvalidInput(f"{where}: expected an object with messages, prompt or prompt_ids")
                pid = str(rec.get("id", f"p{len(prompts):07d}"))
                if pid in seen:
                    raise InvalidInput(f"{where}: prompt id {pid!r} repeats {seen[pid]}")
                seen[pid] = where
                prompts.append(Prompt(pid, _prompt_ids(rec, tokenizer, where)))
    if not prompts:
        raise InvalidInput(f"no prompts in {', '.join(map(str, paths))}")
    return prompts


def _prompt_ids(rec: dict[str, Any], tokenizer: Any, where: str) -> list[int]:
    given = [k for k in ("messages", "prompt", "prompt_ids") if k in rec]
    if len(given) != 1:
        raise InvalidInput(f"{where}: give exactly one of messages, prompt or prompt_ids (got {given or 'none'})")
    value = rec[given[0]]
    if given[0] == "prompt_ids":
        if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
            raise InvalidInput(f"{where}: prompt_ids must be a non-empty list of token ids")
        ids = list(value)
    elif given[0] == "prompt":
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{where}: prompt must be non-empty text")
        ids = list(tokenizer.encode(value))
    else:
        ok = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
        )  # fmt: skip
        if not ok:
            raise InvalidInput(f"{where}: messages must be a non-empty list of {{role, content}} objects")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidInput(f"{where}: messages need a chat template and the policy's tokenizer has none")
        text = tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer.encode(text, add_special_tokens=False))  # the template writes the special tokens
    if not ids or max(ids) >= len(tokenizer):
        raise InvalidInput(f"{where}: the prompt has no tokens or ids outside the policy's vocabulary")
    return [int(t) for t in ids]


def _plan(cfg: SampleConfig, tokenizer: Any, prompts: list[Prompt]) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([[p.id, p.ids] for p in prompts]).encode()).hexdigest()
    return {
        "policy": str(cfg.policy),
        "policy_fingerprint": model_fingerprint(cfg.policy),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "n": cfg.n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_tokens,
        "seed": cfg.seed,
        "prompts": [str(p) for p in cfg.prompts],
        "prompts_fingerprint": f"sha256:{digest}",
        "num_prompts": len(prompts),
        "prompts_per_part": cfg.prompts_per_part,
        "num_parts": -(-len(prompts) // cfg.prompts_per_part),
        "rollout_logprobs": "processed: log-softmax of the logits after temperature and top-p, at the sampled token",
    }


def read_sampling(out: str | Path) -> dict[str, Any] | None:
    """What `_sampling.json` in a `lopd sample` output directory records, or None where there is none."""
    path = Path(out) / SAMPLING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# What every sample directory read by one precompute must share (prompts may differ).
SHARED_BY_INPUTS = ("policy_fingerprint", "tokenizer_fingerprint", "backend", "dtype", "n", "temperature", "top_p",
                    "max_tokens", "seed")  # fmt: skip


def sampling_of_inputs(paths: list[Path]) -> Sampling | None:
    """How the `lopd sample` outputs among `paths` were sampled, for the store's provenance; None if none is one.

    Refuses, naming the fix: a sample directory with parts still missing (some worker has not
    finished; its rollouts would be silently partial), a rollout file of a sample directory named
    alone (its settings would be lost), and sample directories or plain rollouts mixed with
    directories of other settings (one store records one sampling).
    """
    plans: list[tuple[Path, dict[str, Any]]] = []
    plain: list[Path] = []
    for given in paths:
        path = Path(given)
        plan = read_sampling(path) if path.is_dir() else None
        if plan is None and path.is_file() and read_sampling(path.parent) is not None:
            raise InvalidInput(
                f"{path} is one part of the `lopd sample` output {path.parent}: pass the directory, so that its "
                "settings (policy, temperature) are checked and recorded"
            )
        if plan is None:
            plain.append(path)
            continue
        missing = [k for k in range(plan["num_parts"]) if not (path / PART_NAME.format(k)).is_file()]
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise InvalidInput(
                f"the `lopd sample` output {path} is incomplete: {len(missing)} of {plan['num_parts']} parts are "
                f"missing ({shown}). Run `lopd sample` again (every worker) until it reports all parts, then precompute"
            )
        plans.append((path, plan))
    if not plans:
        return None
    if plain:
        raise InvalidInput(
            f"{', '.join(map(str, plain))} did not come from `lopd sample`, unlike {plans[0][0]}: score them "
            "in another store, so that its provenance says how every rollout was sampled"
        )
    first_dir, first = plans[0]
    for path, plan in plans[1:]:
        differs = [k for k in SHARED_BY_INPUTS if plan.get(k) != first.get(k)]
        if differs:
            raise InvalidInput(
                f"{path} and {first_dir} were sampled with different settings ({', '.join(differs)}): "
                "score them into separate datasets"
            )
    return Sampling(
        policy=ModelRef(name_or_path=first["policy"], fingerprint=first["policy_fingerprint"]),
        tokenizer_fingerprint=first["tokenizer_fingerprint"],
        **{k: first[k] for k in ("backend", "dtype", "n", "temperature", "top_p", "max_tokens", "seed")},
        prompts_fingerprints=[plan["prompts_fingerprint"] for _, plan in plans],
    )


def _check_or_write_plan(out: Path, plan: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    existing = read_sampling(out)
    if existing is None:
        atomic_write_bytes(out / SAMPLING_FILE, (json.dumps(plan, indent=2) + "\n").encode())
        return
    differs = [k for k in PLAN_KEYS if existing.get(k) != plan[k]]
    if differs:
        raise InvalidInput(
            f"{out} holds samples of other settings or prompts ({', '.join(differs)} differ); "
            "sample into another --out, or delete it to start over"
        )


def _record(prompt: Prompt, k: int, s: Sampled) -> dict[str, Any]:
    return {
        "id": f"{prompt.id}/{k}",
        "prompt_ids": prompt.ids,
        "response_ids": s.token_ids,
        "rollout_logprobs": [float(x) for x in s.logprobs],
        "finish_reason": s.finish_reason,
        "prompt_id": prompt.id,
        "sample": k,
    }


def run_sample(cfg: SampleConfig) -> SampleResult:
    """Sample this worker's missing parts into `cfg.out`; returns what it wrote and what other workers still owe."""
    from transformers import AutoTokenizer

    if not (cfg.policy / "config.json").is_file():
        raise InvalidInput(f"policy directory {cfg.policy} has no config.json: is it a model directory?")
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.policy))
    prompts = read_prompts(list(cfg.prompts), tokenizer)
    plan = _plan(cfg, tokenizer, prompts)
    _check_or_write_plan(cfg.out, plan)
    num_parts = plan["num_parts"]

    def done(k: int) -> bool:
        return (cfg.out / PART_NAME.format(k)).is_file()

    mine = [k for k in range(num_parts) if k % cfg.num_workers == cfg.worker_index and not done(k)]
    written = 0
    if mine:
        sampler = load_sampler(cfg, tokenizer)
        try:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(prompts[k * cfg.prompts_per_part :][: cfg.prompts_per_part]) for k in mine),
                       desc="prompts", unit="prompt", disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
            for k in mine:
                start = k * cfg.prompts_per_part
                chunk = prompts[start : start + cfg.prompts_per_part]
                samples = sampler.sample([p.ids for p in chunk], first_index=start)
                lines = [json.dumps(_record(p, j, s)) for p, per in zip(chunk, samples) for j, s in enumerate(per)]
                atomic_write_bytes(cfg.out / PART_NAME.format(k), ("\n".join(lines) + "\n").encode())
                written += len(lines)
                bar.update(len(chunk))
            bar.close()
        finally:
            sampler.close()
    return SampleResult(cfg.out, len(mine), [k for k in range(num_parts) if not done(k)], written)
