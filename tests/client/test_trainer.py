"""The reference trainer on a tiny model on CPU: steps, checkpoints, exact resume, refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lopd.client.trainer import CHECKPOINT, METRIC_COLUMNS, METRICS, MODEL_DIR, TrainConfig, train_student
from lopd.errors import Conflict, InvalidInput, NotFound, TokenizerMismatch


def train_config(served, student: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        url=served.url,
        dataset="scored",
        student=student,
        out=out,
        steps=3,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        seed=0,
        sft_teacher=served.store.teacher_fingerprint,
        log_every=1,
        checkpoint_every=3,
        prefetch=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_training(served, cfg: TrainConfig, lines: list[str] | None = None, **kw):
    echo = lines.append if lines is not None else lambda s: None
    return train_student(cfg, echo=echo, client=served.client(retries=2, backoff_s=0.01), **kw)


def read_metrics(out: Path) -> list[dict[str, str]]:
    with open(out / METRICS, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_train_checkpoint_resume_continues_exactly(served, tiny_qwen2_dir, tmp_path):
    # Reference: five uninterrupted steps.
    straight = run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "straight", steps=5))
    assert straight.step == 5

    # Three steps, stop; resume with --steps 5.
    lines: list[str] = []
    first = run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "split"), lines)
    assert first.step == 3
    ckpt = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert ckpt["step"] == 3
    # 3 steps x 2 micro-batches of 4 = 6 batches = one whole epoch of 24 samples: the loader is at epoch 1.
    assert (ckpt["loader"]["epoch"], ckpt["loader"]["batches_consumed"]) == (1, 0)
    assert ckpt["loader"]["content_hash"] == served.client().manifest("scored").content_hash
    assert "token" not in ckpt["config"]
    assert (tmp_path / "split" / MODEL_DIR / "config.json").is_file()

    resumed = run_training(
        served, train_config(served, tiny_qwen2_dir, tmp_path / "split", steps=5, resume=True), lines
    )
    assert resumed.step == 5
    assert any("resumed from" in line and "at step 3" in line for line in lines)
    assert any(line.startswith("step 4/5") for line in lines)

    rows_straight, rows_split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in rows_split] == ["1", "2", "3", "4", "5"]
    assert list(rows_split[0]) == list(METRIC_COLUMNS)
    for a, b in zip(rows_straight, rows_split):
        for key in ("loss", "mean_advantage", "reverse_kl", "clip_frac", "tokens", "epoch"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (a["step"], key)
        assert float(b["data_wait_s"]) >= 0 and float(b["step_time_s"]) > 0 and int(b["tokens"]) > 0

    final_a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    final_b = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert final_a["loader"] == final_b["loader"]
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-5, atol=1e-6)
    # The model actually moved.
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in final_a["model"].items() if k in initial)


def test_existing_run_needs_resume_and_resume_needs_a_run(served, tiny_qwen2_dir, tmp_path):
    with pytest.raises(NotFound, match="no checkpoint"):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "empty", resume=True))
    out = tmp_path / "taken"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"")
    with pytest.raises(Conflict, match="--resume"):
        run_training(served, train_config(served, tiny_qwen2_dir, out))


def test_refuses_a_dataset_of_another_tokenizer_before_training(served, tiny_qwen2_dir, tmp_path):
    # `alpha` records a made-up tokenizer fingerprint: the tiny student's tokenizer is not it.
    with pytest.raises(TokenizerMismatch):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", dataset="alpha", sft_teacher=None))
    assert not (tmp_path / "run" / METRICS).exists()


def test_declared_sft_teacher_of_another_model_is_refused(served, tiny_qwen2_dir, tiny_llama_b_dir, tmp_path):
    from lopd.errors import TeacherMismatch

    with pytest.raises(TeacherMismatch, match="teacher consistency"):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", sft_teacher=str(tiny_llama_b_dir)))


def test_missing_optional_logger_fails_fast_with_the_fix(served, tiny_qwen2_dir, tmp_path, monkeypatch):
    import sys

    from lopd.errors import InvalidInput

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(InvalidInput, match="pip install wandb"):
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", wandb=True))


@pytest.mark.slow
def test_train_command_line(served, tiny_qwen2_dir, tmp_path):
    from typer.testing import CliRunner

    from lopd.cli import app

    out = tmp_path / "cli"
    args = ["train", "--url", served.url, "--dataset", "scored", "--student", str(tiny_qwen2_dir), "--out", str(out)]
    args += ["--steps", "2", "--batch-size", "4", "--sft-teacher", served.store.teacher_fingerprint, "--log-every", "1"]
    args += ["--dtype", "bfloat16", "--gradient-checkpointing", "--eval-samples", "4", "--eval-every", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "step 2/2" in result.output and (out / CHECKPOINT).is_file()
    assert "forward in bfloat16, gradient checkpointing" in result.output and "eval at step 2" in result.output
    other = ["train", "--url", served.url, "--dataset", "alpha", "--student", str(tiny_qwen2_dir)]
    refused = CliRunner().invoke(app, other + ["--out", str(tmp_path / "other")])
    assert refused.exit_code == 2 and "refusing to train" in refused.output


@pytest.mark.gpu
def test_trains_on_cuda(served, tiny_qwen2_dir, tmp_path):
    import math

    result = run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "cuda", steps=2, device="cuda"))
    assert result.step == 2 and math.isfinite(result.last_metrics["loss"])


def test_on_step_sees_every_step_in_eval_mode(served, tiny_qwen2_dir, tmp_path):
    seen: list[tuple[int, bool]] = []
    result = train_student(
        train_config(served, tiny_qwen2_dir, tmp_path / "hook", steps=3, grad_accum=1),
        echo=lambda s: None,
        client=served.client(retries=2, backoff_s=0.01),
        on_step=lambda step, model: seen.append((step, model.training)),
    )
    assert result.step == 3
    assert seen == [(1, False), (2, False), (3, False)]


def test_ratio_reference_rollout_weighs_by_the_rollout_policy(served, tiny_qwen2_dir, tmp_path):
    # With the current policy as reference the ratio is exactly 1, so the loss is minus the mean
    # advantage. The store's rollout log-probs come from another model than this student, so with
    # the rollout policy as reference the ratio exp(student - rollout) is far from 1 and the loss differs.
    current = run_training(
        served,
        train_config(served, tiny_qwen2_dir, tmp_path / "current", steps=1, grad_accum=1, ratio_reference="current",
                     tis_cap=0),
    )  # fmt: skip
    # The default is the trust region, as lopd demo's evidence says (README); --tis-cap 0 means off.
    default = TrainConfig(url="u", dataset="d", student=tmp_path, out=tmp_path)
    assert (default.ratio_reference, default.tis_cap) == ("rollout", None)
    assert TrainConfig(url="u", dataset="d", student=tmp_path, out=tmp_path, tis_cap=0).tis_cap is None
    rollout = run_training(
        served,
        train_config(served, tiny_qwen2_dir, tmp_path / "rollout", steps=1, grad_accum=1, ratio_reference="rollout"),
    )
    assert current.last_metrics["loss"] == pytest.approx(-current.last_metrics["mean_advantage"], abs=1e-5)
    # Same data and weights at step 1: the advantage is the same, only the ratio changed.
    assert rollout.last_metrics["mean_advantage"] == pytest.approx(current.last_metrics["mean_advantage"], abs=1e-5)
    assert abs(rollout.last_metrics["loss"] + rollout.last_metrics["mean_advantage"]) > 1e-3
    with pytest.raises(Exception, match="ratio_reference"):
        TrainConfig(url="http://x", dataset="d", student=tmp_path, out=tmp_path, ratio_reference="old").validate()


def test_progress_line_reports_throughput_and_data_wait_share(served, tiny_qwen2_dir, tmp_path):
    import re

    lines: list[str] = []
    run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "run", steps=3, log_every=2), lines)
    progress = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in progress] == ["step 2/3", "step 3/3"]  # every --log-every, and the end
    for line in progress:
        assert re.search(r"\| [\d,]+ response tokens/s, data wait \d+\.\d%, \d+\.\d\d s/step$", line), line


@pytest.fixture(scope="module")
def no_rollout_logprobs(client_store, tmp_path_factory):
    """The `scored` samples republished without rollout log-probs (as `lopd precompute` without
    --rollout-policy stores rollouts that carry none), served on their own."""
    samples = dict(client_store.samples["scored"])
    samples["rollout"] = [None] * len(samples["ids"])
    root = tmp_path_factory.mktemp("no-rollout-store")
    yield from _republished(client_store, root, samples, rollout_logprobs_source="none")


def _republished(client_store, root, samples, **provenance_update):
    """`samples` published into `root` with the client store's teacher (consistent) and served; yields `Served`."""
    from lopd.storage.manifest import Consistency
    from tests.client.conftest import Served, _real_server
    from tests.utils.factories import provenance, publish_samples

    base = provenance()
    prov = base.model_copy(
        update={
            "teacher": base.teacher.model_copy(update={"fingerprint": client_store.teacher_fingerprint}),
            "sft_teacher_fingerprint": client_store.teacher_fingerprint,
            "tokenizer_fingerprint": client_store.tokenizer_fingerprint,
            "rollout_tokenizer_fingerprint": client_store.tokenizer_fingerprint,
            "consistency": Consistency(teacher_consistent=True, mismatch_allowed=False, rollout_tokenizer_checked=True),
            **provenance_update,
        }
    )
    publish_samples(root, "scored", samples, prov=prov, per_part=8)
    with _real_server(root) as url:
        yield Served(url=url, store=client_store)


def test_rollout_reference_without_rollout_logprobs_warns_once_at_start(
    no_rollout_logprobs, served, tiny_qwen2_dir, tmp_path
):
    import logging

    events: list[str] = []  # progress lines and warnings, in the order they happened

    class Record(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                events.append("warning: " + record.getMessage())

    logger = logging.getLogger("lopd.client.trainer")
    handler = Record()
    logger.addHandler(handler)
    try:
        cfg = train_config(no_rollout_logprobs, tiny_qwen2_dir, tmp_path / "plain", steps=3, log_every=1,
                           ratio_reference="rollout", tis_cap=0)  # fmt: skip
        run_training(no_rollout_logprobs, cfg, events)
        said = [i for i, e in enumerate(events) if e.startswith("warning: ") and "--rollout-policy" in e]
        assert len(said) == 1  # exactly once, for a run of several steps...
        assert said[0] < min(i for i, e in enumerate(events) if e.startswith("step "))  # ...before the first step
        message = events[said[0]]
        assert "falls back to ratio 1" in message and "plain policy gradient" in message and "trust region" in message
        assert "lopd precompute ... --rollout-policy DIR" in message and "--ratio-reference current" in message
        rows = read_metrics(tmp_path / "plain")
        assert all(float(r["clip_frac"]) == 0.0 for r in rows)  # what it warns of: no clipping can happen
        assert float(rows[0]["loss"]) == pytest.approx(-float(rows[0]["mean_advantage"]), abs=1e-5)

        # Ratio 1 with TIS on such a dataset: the importance weights have nothing to weigh with.
        events.clear()
        tis_config = train_config(
            no_rollout_logprobs, tiny_qwen2_dir, tmp_path / "tis", steps=1, ratio_reference="current", tis_cap=2.0
        )
        run_training(no_rollout_logprobs, tis_config, events)
        [tis] = [e for e in events if e.startswith("warning: ")]
        assert "--tis-cap 2.0 has nothing to weigh with" in tis and "--rollout-policy DIR" in tis

        # Not said when there is nothing to fall back from: the plain gradient asked for, or rollout log-probs stored.
        events.clear()
        plain_config = train_config(
            no_rollout_logprobs, tiny_qwen2_dir, tmp_path / "current", steps=1, ratio_reference="current", tis_cap=0
        )
        run_training(no_rollout_logprobs, plain_config, events)
        run_training(served, train_config(served, tiny_qwen2_dir, tmp_path / "mixed", steps=1), events)
        assert not [e for e in events if e.startswith("warning: ")]
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def topk_served(client_store, tmp_path_factory):
    """The `scored` samples with a top-4 of real token ids (descending log-probs), built as with --top-k 4."""
    from tests.utils.factories import add_topk

    samples = add_topk(client_store.samples["scored"], 4, seed=2, vocab=100)
    yield from _republished(client_store, tmp_path_factory.mktemp("topk-store"), samples, top_k=4)


@pytest.mark.parametrize("loss", ["forward-kl-topk", "reverse-kl-topk", "jsd-topk"])
def test_train_with_a_top_k_loss(topk_served, tiny_qwen2_dir, tmp_path, loss):
    cfg = train_config(topk_served, tiny_qwen2_dir, tmp_path / "run", loss=loss, steps=2, grad_accum=1, eval_samples=4)
    result = run_training(topk_served, cfg)
    rows = read_metrics(cfg.out)
    assert [int(r["step"]) for r in rows] == [1, 2] and result.step == 2
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # finite (not NaN)
    assert float(rows[0]["clip_frac"]) == 0.0
    if loss != "forward-kl-topk":  # a divergence of renormalised distributions: >= 0
        assert all(float(r["loss"]) >= 0 for r in rows)


def test_a_top_k_loss_on_a_dataset_without_top_k_is_refused_before_training(served, tiny_qwen2_dir, tmp_path):
    cfg = train_config(served, tiny_qwen2_dir, tmp_path / "run", loss="forward-kl-topk")
    with pytest.raises(InvalidInput, match="--top-k"):
        run_training(served, cfg)
    assert not (cfg.out / CHECKPOINT).exists()
