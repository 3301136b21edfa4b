"""The language-model plumbing the pipeline needs: encode, fine-tune, sample.

Small and explicit on purpose: batched sampling that returns the token ids exactly as sampled
with their log-probs under the sampling policy (what a rollout store needs), and a supervised
fine-tuning loop with the loss on response tokens only (how teachers and the SFT student learn).
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

Example = tuple[list[int], list[int]]  # (prompt ids, response ids)


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """(model in eval mode on CPU, float32; tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tok


def encode_prompt(tok: Any, prompt: str) -> list[int]:
    return [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]


def encode_response(tok: Any, response: str) -> list[int]:
    return [*tok(response, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def decode_response(tok: Any, ids: Sequence[int]) -> str:
    return tok.decode([i for i in ids if i != tok.eos_token_id], skip_special_tokens=True)


def _pad(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels (-100 outside the response)."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(r)
    return ids, mask, labels


@dataclass
class FitConfig:
    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    seed: int = 0


def fit(
    model: Any,
    examples: Sequence[Example],
    cfg: FitConfig,
    *,
    pad_id: int,
    desc: str = "fine-tune",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Supervised fine-tuning on (prompt, response) pairs; cross-entropy on response tokens only.

    AdamW with linear warmup then cosine decay to 10%: short runs on a small task converge fast
    and then need a small learning rate to stop oscillating. Returns the per-step losses.
    """
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, dynamic_ncols=True, leave=False)
    for step in bar:
        if len(order) < cfg.batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        batch, order = [examples[i] for i in order[: cfg.batch_size]], order[cfg.batch_size :]
        warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1)))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * decay
        ids, mask, labels = _pad(batch, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


@torch.no_grad()
def sample(
    model: Any,
    tok: Any,
    prompts: Sequence[Sequence[int]],
    *,
    greedy: bool = False,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    desc: str | None = None,
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Responses (token ids as sampled, through the end token when one was sampled) and the
    sampling policy's log-prob of each, `log_softmax(logits / T)[token]` over the full vocabulary.

    Plain ancestral sampling (no top-k, no top-p): the log-probs are those of the distribution the
    tokens were really drawn from, which is what an on-policy estimator needs. Prompts are
    left-padded into batches with a KV cache. `desc` shows a progress bar over the prompts.
    """
    gen = torch.Generator().manual_seed(seed)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    out_ids: list[list[int]] = []
    out_lp: list[np.ndarray] = []
    bar = tqdm(total=len(prompts), desc=desc, disable=desc is None, dynamic_ncols=True, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        done = torch.zeros(len(chunk), dtype=torch.bool)
        tokens, logprobs = [], []
        step_ids = ids
        for _ in range(max_new_tokens):
            with warnings.catch_warnings():  # newer transformers rename past_key_values; older ones lack the new name
                warnings.simplefilter("ignore", FutureWarning)
                out = model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            if not greedy:
                logits = logits / temperature
            lp = torch.log_softmax(logits, dim=-1)
            nxt = lp.argmax(-1) if greedy else torch.multinomial(lp.exp(), 1, generator=gen).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            logprobs.append(lp.gather(1, nxt[:, None]).squeeze(1))
            done |= nxt == eos
            if bool(done.all()):
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
            position = position[:, -1:] + 1
        toks = torch.stack(tokens, 1).tolist()
        lps = torch.stack(logprobs, 1).numpy()
        for row, lrow in zip(toks, lps):
            n = row.index(eos) + 1 if eos in row else len(row)
            out_ids.append(row[:n])
            out_lp.append(lrow[:n].astype(np.float32))
        bar.update(len(chunk))
    bar.close()
    return out_ids, out_lp
