"""Standard (online) on-policy distillation: the baseline Lightning OPD removes the teacher server from.

Every step samples fresh responses from the *current* student and scores them with a live
teacher, then takes the same policy-gradient step as the offline trainer: the same loss
(`lightning_opd_loss`), the same batch layout (`build_table` + `collate_batch`, so the two
methods cannot differ by an alignment convention), the same optimizer and clipping. The only
difference is where the teacher log-probs come from, which is the point of the comparison; the
teacher forward tokens this costs are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lopd.client.collate import collate_batch, token_logprobs
from lopd.client.loss import lightning_opd_loss
from lopd.storage.schema import build_table

from . import lm


@dataclass
class OnlineOPDConfig:
    steps: int
    batch_size: int
    lr: float
    max_grad_norm: float = 1.0
    seed: int = 0
    max_new_tokens: int = 64


@dataclass
class OnlineOPDResult:
    train_seconds: float  # wall-clock of the training steps (sampling, teacher scoring, update), no evaluation
    train_cpu_seconds: float  # CPU time of the same (all threads of this process)
    teacher_forward_tokens: int  # prompt + response tokens the live teacher scored
    sampled_tokens: int  # response tokens the student generated


def opd_loss(
    model: Any,
    pad_id: int,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    teacher_lp: Sequence[np.ndarray],
) -> torch.Tensor:
    """The offline trainer's loss at ratio 1 (the paper's update) on one batch: `-mean(A_t * log p_student)`.

    Built like the trainer's batches (`build_table` + `collate_batch`), so the online baseline and
    the gradient comparison cannot differ from offline training by an alignment convention.
    """
    ids = [f"b{i}" for i in range(len(prompts))]
    rows = ([list(p) for p in prompts], [list(r) for r in responses], list(teacher_lp), [None] * len(ids))
    table = build_table(ids, *rows)
    b = collate_batch(table, pad_id=pad_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss, _ = lightning_opd_loss(token_logprobs(logits, b["input_ids"]), b["teacher_logprobs"], b["response_mask"])
    return loss


def train_online_opd(
    student_dir: Path,
    teacher: Any,
    prompts: Sequence[Sequence[int]],
    cfg: OnlineOPDConfig,
    *,
    out: Path,
    on_step: Callable[[int, Any], None] | None = None,
    progress: bool = True,
) -> OnlineOPDResult:
    """Train the student in `student_dir` online against `teacher` (a `Teacher`) on `prompts`; save to `out`.

    `on_step(step, model)` runs after each optimizer step (evaluation); its time is not counted.
    """
    model, tok = lm.load(student_dir)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    order: list[int] = []
    train_seconds, train_cpu, teacher_tokens, sampled_tokens = 0.0, 0.0, 0, 0
    for step in tqdm(range(1, cfg.steps + 1), desc="online OPD", disable=not progress, dynamic_ncols=True, leave=False):
        t0, c0 = time.perf_counter(), time.process_time()
        if len(order) < cfg.batch_size:
            order += rng.permutation(len(prompts)).tolist()
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch_prompts = [list(prompts[i]) for i in picked]

        # 1. Sample from the current policy; 2. score with the live teacher.
        model.eval()
        responses, _ = lm.sample(
            model, tok, batch_prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed * 1_000_003 + step
        )
        teacher_lp = teacher.score(batch_prompts, responses)
        teacher_tokens += sum(len(p) + len(r) for p, r in zip(batch_prompts, responses))
        sampled_tokens += sum(len(r) for r in responses)

        # 3. The offline trainer's update, on this batch.
        model.train()
        loss = opd_loss(model, tok.pad_token_id, batch_prompts, responses, teacher_lp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        train_seconds += time.perf_counter() - t0
        train_cpu += time.process_time() - c0
        if on_step is not None:
            model.eval()
            on_step(step, model)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return OnlineOPDResult(train_seconds, train_cpu, teacher_tokens, sampled_tokens)
