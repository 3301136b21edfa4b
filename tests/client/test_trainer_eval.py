"""Evaluation on held-out samples: the right steps, a fixed split that is never trained on, and
exact resume with it."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest

from lopd.client.evaluation import held_out_indices
from lopd.client.trainer import EVAL, train_student
from lopd.errors import InvalidInput
from tests.client.test_trainer import read_metrics, run_training, train_config

N_SCORED = 24  # samples of the `scored` dataset


def _eval_rows(out: Path) -> list[dict[str, str]]:
    with open(out / EVAL, newline="") as f:
        return list(csv.DictReader(f))


def test_held_out_split_is_fixed_nested_and_leaves_something_to_train_on():
    a = held_out_indices(N_SCORED, 4)
    assert a.tolist() == sorted(set(a.tolist())) and len(a) == 4 and a.max() < N_SCORED
    assert np.array_equal(a, held_out_indices(N_SCORED, 4))  # no seed: the same for every run
    assert set(a.tolist()) <= set(held_out_indices(N_SCORED, 8).tolist())  # a larger set contains it
    with pytest.raises(InvalidInput, match="use at most 23"):
        held_out_indices(N_SCORED, 24)


def test_eval_runs_at_the_start_every_n_steps_and_at_the_end_on_samples_never_trained_on(
    served, tiny_qwen2_dir, tmp_path
):
    client = served.client(retries=2, backoff_s=0.01)
    fetches: list[tuple[str, list[int]]] = []
    fetch = client.fetch

    def spy(name, indices, *args, **kwargs):
        fetches.append((threading.current_thread().name, [int(i) for i in indices]))
        return fetch(name, indices, *args, **kwargs)

    client.fetch = spy  # type: ignore[method-assign]
    lines: list[str] = []
    # 20 training samples in batches of 4: 5 batches an epoch; 5 steps x 2 micro-batches = 2 epochs.
    cfg = train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=5, eval_samples=4, eval_every=2, prefetch=2)
    result = train_student(cfg, echo=lines.append, client=client)

    rows = _eval_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]
    assert all(int(r["eval_tokens"]) > 0 and float(r["eval_reverse_kl"]) == float(r["eval_reverse_kl"]) for r in rows)
    assert float(rows[-1]["eval_reverse_kl"]) == pytest.approx(result.last_eval["eval_reverse_kl"])
    assert [line.split(":")[0] for line in lines if line.startswith("eval at")] == [
        "eval at step 0", "eval at step 2", "eval at step 4", "eval at step 5",
    ]  # fmt: skip

    held_out = set(held_out_indices(N_SCORED, 4).tolist())
    # Training batches are fetched by the loader's prefetch threads, the held-out set by the trainer itself, once.
    trained = [i for thread, idx in fetches if thread.startswith("lopd-prefetch") for i in idx]
    evaluated = [i for thread, idx in fetches if not thread.startswith("lopd-prefetch") for i in idx]
    assert not held_out & set(trained)
    assert sorted(evaluated) == sorted(held_out)  # fetched once, kept for every evaluation
    assert set(trained) == set(range(N_SCORED)) - held_out  # two whole epochs of the rest
    # The progress line's loss is the training loss; at step 0 the eval's is the untrained student's.
    assert float(rows[0]["eval_loss"]) != float(read_metrics(tmp_path / "run")[0]["loss"])


@pytest.mark.slow
def test_resume_with_eval_continues_exactly_and_refuses_another_split(served, tiny_qwen2_dir, tmp_path):
    kw = dict(eval_samples=4, eval_every=2, checkpoint_every=2)
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "straight", steps=4, **kw))
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=2, **kw))
    with pytest.raises(InvalidInput, match="--eval-samples 4, not 8"):
        run_training(
            served,
            train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=4, resume=True, **{**kw, "eval_samples": 8}),
        )
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=4, resume=True, **kw))
    straight, split = _eval_rows(tmp_path / "straight"), _eval_rows(tmp_path / "split")
    assert [r["step"] for r in split] == [r["step"] for r in straight] == ["0", "2", "4"]
    for a, b in zip(straight, split):
        for key in ("eval_loss", "eval_reverse_kl", "eval_tokens"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
