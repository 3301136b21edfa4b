"""`lopd demo`: the precompute pipeline end to end on a laptop CPU, with models built on the spot.

Builds a tiny teacher and a tiny student (random weights, shared tokenizer), samples rollouts from
the student as token ids, scores them once with the teacher into a store (computing the
student's own log-probs as the rollout policy), shows that a different teacher is refused, and
prints the dataset's stats. Every step is the library call a real pipeline would make.
"""

from __future__ import annotations

import json
import random
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


def run_demo(run_dir: Path, *, samples: int = 64, echo: Callable[[str], None] = print) -> None:
    from lopd.stats_text import render_text
    from lopd.storage import stats

    run_dir.mkdir(parents=True, exist_ok=True)
    echo(f"[1/5] building a tiny teacher, a second teacher and a student in {run_dir}")
    teacher = build_tiny_model(run_dir / "teacher", "llama", seed=1, hidden=64, layers=2)
    other = build_tiny_model(run_dir / "other-teacher", "llama", seed=2, hidden=64, layers=2)
    student = build_tiny_model(run_dir / "student", "llama", seed=3, hidden=32, layers=2, pad_vocab=False)
    echo(f"[2/5] sampling {samples} rollouts from the student (token ids as sampled)")
    rollouts = sample_rollouts(student, run_dir / "rollouts.jsonl", samples=samples)
    store = run_dir / "store"
    base = dict(rollouts=[rollouts], store=store, rollout_policy=student, samples_per_part=16, progress=True)
    echo("[3/5] a teacher that did not generate the SFT data is refused:")
    try:
        run_precompute(PrecomputeConfig(teacher=other, sft_teacher=str(teacher), dataset="demo-bad", **base))
    except TeacherMismatch as e:
        echo(f"      refused: {str(e)[:160]}...")
    echo("[4/5] scoring the rollouts once with the SFT-data teacher")
    result = run_precompute(PrecomputeConfig(teacher=teacher, sft_teacher=str(teacher), dataset="demo", **base))
    for notice in result.notices:
        echo(f"      note: {notice}")
    assert result.manifest is not None
    echo(f"      {result.status}: demo v{result.manifest.version} in {store}")
    echo("[5/5] stats (`lopd stats " + str(store) + " --dataset demo`)")
    echo(render_text(stats.coverage(store, "demo"), stats.consistency(store, "demo")))
