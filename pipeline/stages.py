"""The pipeline's stages, each a function with files in and files out, so any can be swapped.

    train_teacher      task -> a teacher that solves it in one style (A or B: choices drawn at its probabilities)
    generate_sft_data  teacher A + prompts -> SFT data (JSONL of token ids) + its provenance
    sft_student        SFT data -> the student checkpoint every method starts from
    sample_rollouts    a policy + prompts -> rollouts (ids as sampled, with their log-probs)

Scoring (`lopd precompute`), serving (`lopd serve`) and offline training (`lopd train`) are the
product's own commands; `pipeline.run` chains all of them. Files use the formats those commands
read: a user can replace any stage's output with their own (their teacher, their SFT checkpoint,
their rollouts) and run the rest.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lopd.fingerprint import model_fingerprint
from lopd.testing import build_tiny_model

from . import lm
from .config import ModelSize
from .task import Problem, StyleName, solve

SFT_PROVENANCE = "sft_provenance.json"  # next to the SFT data and inside the student checkpoint


def _fresh_model(out: Path, size: ModelSize, seed: int) -> tuple[Any, Any]:
    """A randomly initialised Llama with the char-level tokenizer; the vocabulary is exactly the
    tokenizer's, so sampling can only produce real tokens."""
    build_tiny_model(
        out, "llama", seed=seed, hidden=size.hidden, layers=size.layers, max_positions=128, pad_vocab=False,
        init_std=0.02,
    )  # fmt: skip
    return lm.load(out)


def train_teacher(
    out: Path,
    style: StyleName,
    problems: Sequence[Problem],
    size: ModelSize,
    fit: lm.FitConfig,
    *,
    progress: bool = True,
) -> Path:
    """Fine-tune a fresh model on worked solutions written in `style`, each column's choices drawn at the
    style's probabilities (seeded by `fit.seed`); save it to `out`."""
    model, tok = _fresh_model(out, size, fit.seed)
    rng = random.Random(fit.seed)
    examples = [(lm.encode_prompt(tok, p.prompt), lm.encode_response(tok, solve(p, style, rng))) for p in problems]
    lm.fit(model, examples, fit, pad_id=tok.pad_token_id, desc=f"teacher {style}", progress=progress)
    model.save_pretrained(str(out))
    return out


def generate_sft_data(
    teacher_dir: Path, problems: Sequence[Problem], out: Path, *, seed: int, max_new_tokens: int
) -> Path:
    """Sample one solution per problem from the teacher (temperature 1): the student's SFT data.

    The provenance file records the teacher's fingerprint: this is the model a Lightning OPD
    store must be scored with (`--sft-teacher`), and the consistency gate checks it.
    """
    model, tok = lm.load(teacher_dir)
    prompts = [lm.encode_prompt(tok, p.prompt) for p in problems]
    responses, _ = lm.sample(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed, desc="SFT data")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            f.write(json.dumps({"id": f"sft-{i:06d}", "prompt_ids": p, "response_ids": r}) + "\n")
    provenance = {"teacher": str(teacher_dir), "teacher_fingerprint": model_fingerprint(teacher_dir), "seed": seed}
    out.with_name(SFT_PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out


def read_examples(path: Path) -> list[lm.Example]:
    """(prompt_ids, response_ids) pairs of a JSONL file in the precompute input format."""
    with path.open() as f:
        return [(rec["prompt_ids"], rec["response_ids"]) for rec in map(json.loads, f)]


def sft_student(
    sft_data: Path,
    out: Path,
    size: ModelSize,
    fit: lm.FitConfig,
    *,
    progress: bool = True,
) -> Path:
    """Fine-tune a fresh, smaller model on the SFT data; the provenance travels with the checkpoint."""
    model, tok = _fresh_model(out, size, fit.seed)
    lm.fit(model, read_examples(sft_data), fit, pad_id=tok.pad_token_id, desc="SFT student", progress=progress)
    model.save_pretrained(str(out))
    provenance = sft_data.with_name(SFT_PROVENANCE)
    if provenance.is_file():
        (out / SFT_PROVENANCE).write_text(provenance.read_text())
    return out


def sft_teacher_of(student_dir: Path) -> str:
    """The fingerprint of the teacher that generated `student_dir`'s SFT data (from its provenance)."""
    path = student_dir / SFT_PROVENANCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the student's SFT-data teacher is unknown")
    return str(json.loads(path.read_text())["teacher_fingerprint"])


def sample_rollouts(
    policy_dir: Path, problems: Sequence[Problem], out: Path, *, seed: int, max_new_tokens: int
) -> Path:
    """One temperature-1 sample per problem, saved as `lopd precompute` input: the token ids as
    sampled and the policy's log-prob of each (`rollout_logprobs`)."""
    model, tok = lm.load(policy_dir)
    prompts = [lm.encode_prompt(tok, p.prompt) for p in problems]
    responses, logprobs = lm.sample(model, tok, prompts, max_new_tokens=max_new_tokens, seed=seed, desc="rollouts")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i, (p, r, lp) in enumerate(zip(prompts, responses, logprobs)):
            rec = {"id": f"rollout-{i:06d}", "prompt_ids": p, "response_ids": r, "rollout_logprobs": lp.tolist()}
            f.write(json.dumps(rec) + "\n")
    return out
