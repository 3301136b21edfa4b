"""Sampling returns the policy's true log-probs (checked against the naive reference), with left padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lopd.pipeline import lm
from tests.utils.naive import naive_logprobs


@pytest.fixture(scope="module")
def policy(tiny_llama_dir: Path):
    return lm.load(tiny_llama_dir)


def _prompts(tok, texts):
    return [lm.encode_prompt(tok, t) for t in texts]


def test_sampled_logprobs_match_the_naive_reference_with_mixed_prompt_lengths(policy):
    model, tok = policy
    prompts = _prompts(tok, ["1+2=", "123+456=", "7", "99+1="])  # different lengths: left padding is exercised
    responses, logprobs = lm.sample(model, tok, prompts, max_new_tokens=12, seed=3, batch_size=3)
    assert len(responses) == len(logprobs) == 4
    for p, r, lp in zip(prompts, responses, logprobs):
        assert 1 <= len(r) <= 12 and len(lp) == len(r) and lp.dtype == np.float32
        assert tok.eos_token_id not in r[:-1]  # nothing after the end token
        np.testing.assert_allclose(lp, naive_logprobs(model, p, r), atol=1e-4)


def test_sampling_is_seeded_and_greedy_takes_the_argmax(policy):
    model, tok = policy
    prompts = _prompts(tok, ["12+34=", "5+6="])
    a, _ = lm.sample(model, tok, prompts, max_new_tokens=8, seed=1)
    b, _ = lm.sample(model, tok, prompts, max_new_tokens=8, seed=1)
    assert a == b
    greedy, lps = lm.sample(model, tok, prompts[:1], greedy=True, max_new_tokens=6)
    ids = list(prompts[0])
    for token in greedy[0]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert token == int(logits.argmax())
        ids.append(token)
        if token == tok.eos_token_id:
            break


def test_fit_lowers_the_loss_on_response_tokens(tmp_path: Path):
    from lopd.testing import build_tiny_model

    model, tok = lm.load(build_tiny_model(tmp_path / "m", "llama", seed=0, hidden=32, layers=1, pad_vocab=False))
    examples = [(lm.encode_prompt(tok, f"{i}+{i}="), lm.encode_response(tok, str(2 * i))) for i in range(10, 40)]
    losses = lm.fit(model, examples, lm.FitConfig(steps=60, batch_size=16, lr=3e-3, warmup=5), pad_id=0, progress=False)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert not model.training
