"""Synthetic but realistically shaped benchmark data: rollout lengths, token ids, text, log-probs.

What matters for the numbers is the shape, so each generator says what it imitates:
lengths of math/chat rollouts, a Zipf-like token distribution over a 150k vocabulary (low ids
frequent, as in BPE vocabularies whose merges are ordered by frequency), English-like text at
about 4 characters per token, and teacher log-probs quantised the way float32 `logit - logsumexp`
quantises them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Ids for the tiny char-level tokenizer (105 tokens, the first 8 special), whatever the model's vocabulary.
ID_RANGE = (8, 105)
PROMPT_LEN = (50, 300)  # inclusive ranges, in tokens
RESPONSE_LEN = (100, 1000)


def rollout_lengths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response lengths drawn uniformly from `PROMPT_LEN` and `RESPONSE_LEN`."""
    return rng.integers(PROMPT_LEN[0], PROMPT_LEN[1] + 1, n), rng.integers(RESPONSE_LEN[0], RESPONSE_LEN[1] + 1, n)


def write_rollouts_jsonl(path: Path, prompts: list[np.ndarray], responses: list[np.ndarray], *, start: int = 0) -> Path:
    """Rollouts in the job's preferred input form: `id`, `prompt_ids`, `response_ids`."""
    with path.open("w") as f:
        for i, (p, r) in enumerate(zip(prompts, responses)):
            f.write(json.dumps({"id": f"r{start + i:07d}", "prompt_ids": p.tolist(), "response_ids": r.tolist()}))
            f.write("\n")
    return path


def zipf_ids(rng: np.random.Generator, size: int, vocab: int = 150_000, s: float = 1.0, q: float = 2.7) -> np.ndarray:
    """Token ids with Zipf-Mandelbrot frequencies `1 / (rank + q) ** s`; id = rank."""
    p = 1.0 / (np.arange(vocab) + q) ** s
    cdf = np.cumsum(p / p.sum())
    return np.minimum(np.searchsorted(cdf, rng.random(size)), vocab - 1).astype(np.int64)


def zipf_entropy_bits(vocab: int = 150_000, s: float = 1.0, q: float = 2.7) -> float:
    p = 1.0 / (np.arange(vocab) + q) ** s
    p /= p.sum()
    return float(-(p * np.log2(p)).sum())


def word_list(rng: np.random.Generator, n: int = 5000) -> list[str]:
    """Pronounceable lowercase words of 1-12 letters, most frequent first and mostly short, as in English."""
    consonants, vowels = "bcdfghklmnprstvwyz", "aeiou"
    words: set[str] = {"a", "i", "the", "of", "and", "to", "in", "is", "it", "that"}
    while len(words) < n:
        k = int(np.clip(rng.poisson(5.0), 1, 12))
        words.add("".join(rng.choice(list(consonants if j % 2 == 0 else vowels)) for j in range(k)))
    ordered = sorted(words)
    noise = rng.normal(0.0, 2.0, len(ordered))
    return [w for _, w in sorted(zip([len(w) + e for w, e in zip(ordered, noise)], ordered))]


class TextModel:
    """English-like text: Zipf word frequencies plus recurring phrases (each word has a few usual successors).

    The phrases give text the redundancy LZ compressors find in real prose: zstd-3 gets it to
    about 3 bits per character, near what it achieves on English prose (2.5-3).
    """

    def __init__(self, rng: np.random.Generator, n_words: int = 5000, s: float = 1.1, follow: float = 0.6) -> None:
        self.rng, self.follow = rng, follow
        self.words = word_list(rng, n_words)
        p = 1.0 / (np.arange(n_words) + 2.7) ** s
        self.p = p / p.sum()
        self.successors = rng.choice(n_words, size=(n_words, 4), p=self.p)

    def text(self, n_chars: int) -> str:
        """Exactly `n_chars` characters of words, spaces and some punctuation and numbers."""
        rng, out, size, prev = self.rng, [], 0, 0
        while size <= n_chars:  # the joined text is size - 1 characters long
            m = n_chars // 4 + 8
            fresh, coin, pick = rng.choice(len(self.words), m, p=self.p), rng.random(m), rng.integers(0, 4, m)
            for k in range(m):
                prev = int(self.successors[prev, pick[k]] if coin[k] < self.follow else fresh[k])
                w = self.words[prev]
                if k % 13 == 12:
                    w += str(rng.choice([".", ",", "?", ":", " ="]))
                    if k % 5 == 0:
                        w += " " + str(int(rng.integers(0, 1000)))
                out.append(w)
                size += len(w) + 1
                if size > n_chars:
                    break
        return " ".join(out)[:n_chars]


def trained_teacher_logprobs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Float32 log-probs shaped like a trained teacher scoring its student's on-policy rollouts.

    Most tokens are near-certain (log-prob within a few thousandths of 0), a quarter are
    plausible alternatives, an eighth are surprises with a heavy tail (mean about -0.45 overall).
    Values go through float32 `target_logit - logsumexp` with logits of magnitude 5-35, so the
    near-zero ones carry the same coarse quantisation real scorers produce.
    """
    kind = rng.random(n)
    lp = np.where(
        kind < 0.63,
        -rng.exponential(0.003, n),
        np.where(kind < 0.88, -rng.exponential(0.3, n), -rng.gamma(1.5, 2.0, n)),
    )
    target = rng.uniform(5.0, 35.0, n).astype(np.float32)
    lse = (target.astype(np.float64) - lp).astype(np.float32)
    return np.minimum(target - lse, np.float32(0.0)).astype(np.float32)


def logprob_summary(lp: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(lp.mean()),
        "median": float(np.median(lp)),
        "frac_above_-0.01": float((lp > -0.01).mean()),
        "frac_below_-5": float((lp < -5).mean()),
        "distinct_values_frac": float(np.unique(lp).size / lp.size),
    }
