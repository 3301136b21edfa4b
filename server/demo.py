"""`lopd demo`: the Lightning OPD data path end to end on a laptop CPU, with models built on the spot.

Builds a tiny teacher and a tiny student (random weights, shared tokenizer), samples rollouts from
the student as token ids, scores them once with the teacher into a store (computing the
student's own log-probs as the rollout policy), shows that a different teacher is refused, prints
the dataset's stats, then serves the store over HTTP on loopback and trains the student for a
few steps through the client, with no teacher loaded. Every step is the library call a real
pipeline would make.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from lopd.errors import TeacherMismatch

from .precompute import PrecomputeConfig, run_precompute
from .tiny_models import build_tiny_model


def sample_rollouts(policy_dir: Path, out: Path, *, samples: int, seed: int = 0, max_new_tokens: int = 48) -> Path:
    """Sample chat rollouts from a policy and save them as JSONL token ids (the preferred input form)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    model = AutoModelForCausalLM.from_pretrained(str(policy_dir)).eval()
    end_id = tok.convert_tokens_to_ids("<|end|>")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    with out.open("w") as f:
        for i in range(samples):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            text = tok.apply_chat_template(
                [{"role": "user", "content": f"What is {a}+{b}?"}], tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                gen = model.generate(
                    torch.tensor([prompt_ids]),
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=rng.randint(8, max_new_tokens),
                    eos_token_id=end_id,
                    pad_token_id=tok.pad_token_id,
                )
            response = gen[0, len(prompt_ids) :].tolist()
            f.write(json.dumps({"id": f"demo-{i:05d}", "prompt_ids": prompt_ids, "response_ids": response}) + "\n")
    return out


def run_demo(run_dir: Path, *, samples: int = 64, train_steps: int = 4, echo: Callable[[str], None] = print) -> None:
    from lopd.client.trainer import TrainConfig, train_student
    from lopd.errors import Inconsistent
    from lopd.fingerprint import model_fingerprint
    from lopd.server.api.background import serve_in_background
    from lopd.server.api.settings import ServerSettings
    from lopd.stats_text import render_text
    from lopd.storage import stats

    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[1/7] building a tiny teacher, a second teacher and a student in {run_dir}")
    teacher = build_tiny_model(run_dir / "teacher", "llama", seed=1, hidden=64, layers=2)
    other = build_tiny_model(run_dir / "other-teacher", "llama", seed=2, hidden=64, layers=2)
    student = build_tiny_model(run_dir / "student", "llama", seed=3, hidden=32, layers=2, pad_vocab=False)
    echo(f"[2/7] sampling {samples} rollouts from the student (token ids as sampled)")
    rollouts = sample_rollouts(student, run_dir / "rollouts.jsonl", samples=samples)
    store = run_dir / "store"
    base = dict(rollouts=[rollouts], store=store, rollout_policy=student, samples_per_part=16, progress=True)
    echo("[3/7] a teacher that did not generate the SFT data is refused:")
    try:
        run_precompute(PrecomputeConfig(teacher=other, sft_teacher=str(teacher), dataset="demo-bad", **base))
    except TeacherMismatch as e:
        echo(f"      refused: {str(e)[:160]}...")
    echo("[4/7] scoring the rollouts once with the SFT-data teacher")
    result = run_precompute(PrecomputeConfig(teacher=teacher, sft_teacher=str(teacher), dataset="demo", **base))
    for notice in result.notices:
        echo(f"      note: {notice}")
    assert result.manifest is not None
    echo(f"      {result.status}: demo v{result.manifest.version} in {store}")
    echo("[5/7] stats (`lopd stats " + str(store) + " --dataset demo`)")
    echo(render_text(stats.coverage(store, "demo"), stats.consistency(store, "demo")))
    # An inconsistent dataset too, built on purpose, so the trainer's own gate can be seen refusing it.
    run_precompute(
        PrecomputeConfig(
            teacher=other, sft_teacher=str(teacher), dataset="demo-inconsistent", allow_teacher_mismatch=True, **base
        )
    )
    with serve_in_background(ServerSettings(store=store)) as server:
        echo(f"[6/7] serving {store} read-only at {server.base_url} (`lopd serve {store}`)")
        common = dict(url=server.base_url, student=student, steps=train_steps, batch_size=8, lr=1e-3, log_every=1)
        try:
            train_student(
                TrainConfig(dataset="demo-inconsistent", out=run_dir / "train-refused", **common), echo=lambda _: None
            )
        except Inconsistent as e:
            echo(f"      the trainer refuses demo-inconsistent: {str(e)[:150]}...")
        train_dir = run_dir / "train"
        if train_dir.exists():  # the demo starts its training run afresh each time
            shutil.rmtree(train_dir)
        echo(f"[7/7] training the student for {train_steps} steps on `demo` through the client (no teacher loaded)")
        result = train_student(
            TrainConfig(dataset="demo", out=train_dir, sft_teacher=model_fingerprint(teacher), **common),
            echo=lambda line: echo(f"      {line}"),
        )
    echo(f"      done: step {result.step}, checkpoint and metrics.csv in {result.out}")
