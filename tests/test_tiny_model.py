"""`lopd tiny-model` makes a model to try things on: what it samples must be scorable by `lopd precompute`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lopd.server.precompute import PrecomputeConfig, run_precompute
from lopd.testing import build_tiny_model


def _sample(model_dir: Path, prompts: list[str], new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, sampled response ids) per prompt, with transformers `generate` at temperature 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.manual_seed(0)
    out = []
    for text in prompts:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            seq = model.generate(
                ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id
            )
        out.append((ids[0].tolist(), seq[0, ids.shape[1] :].tolist()))
    return out


@pytest.mark.slow
def test_rollouts_sampled_from_a_tiny_model_are_scored(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "lopd", "tiny-model", str(model_dir)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    sampled = _sample(model_dir, ["1+1=", "hello", "abc", "xyz"], 40)
    rollouts = tmp_path / "rollouts.jsonl"
    with rollouts.open("w") as f:
        for i, (prompt, response) in enumerate(sampled):
            f.write(json.dumps({"id": f"s{i}", "prompt_ids": prompt, "response_ids": response}) + "\n")

    result = run_precompute(
        PrecomputeConfig(
            rollouts=[rollouts], teacher=model_dir, sft_teacher=str(model_dir), store=tmp_path / "store",
            dataset="sampled", progress=False,
        )
    )  # fmt: skip
    assert result.manifest is not None and result.manifest.num_samples == len(sampled)


def test_a_padded_tiny_model_samples_only_real_tokens(tmp_path: Path) -> None:
    """The library's default model pads its vocabulary (as real ones do) and never samples the padding."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = build_tiny_model(tmp_path / "padded", "llama", seed=4, hidden=32, layers=1)
    vocab, real = AutoConfig.from_pretrained(str(model_dir)).vocab_size, len(AutoTokenizer.from_pretrained(model_dir))
    assert vocab > real
    responses = [r for _, r in _sample(model_dir, ["1+1=", "hello"], 60)]
    assert all(0 <= t < real for r in responses for t in r)
