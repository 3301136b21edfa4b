"""Builders of synthetic stored data for storage tests (no model involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from lopd.storage.manifest import Consistency, Manifest, ModelRef, Provenance, RolloutSource
from lopd.storage.schema import build_table
from lopd.storage.staging import RunPlan, Staging
from lopd.storage.writer import write_run

TEACHER_FP = "sha256:" + "a" * 64
OTHER_FP = "sha256:" + "b" * 64
TOKENIZER_FP = "sha256:" + "c" * 64


def provenance(*, consistent: bool = True) -> Provenance:
    return Provenance(
        teacher=ModelRef(name_or_path="teacher", fingerprint=TEACHER_FP, architecture="LlamaForCausalLM"),
        tokenizer_fingerprint=TOKENIZER_FP,
        sft_teacher_fingerprint=TEACHER_FP if consistent else OTHER_FP,
        sft_teacher_source="teacher",
        rollout_policy=None,
        rollout_tokenizer_fingerprint=TOKENIZER_FP,
        rollout_logprobs_source="mixed",
        rollouts=RolloutSource(paths=["r.jsonl"], fingerprint="sha256:" + "d" * 64, records=0, retokenized=0),
        backend="transformers",
        dtype="float32",
        temperature=1.0,
        consistency=Consistency(
            teacher_consistent=consistent, mismatch_allowed=not consistent, rollout_tokenizer_checked=True
        ),
        tool_version="test",
    )


def random_samples(n: int, seed: int = 0, vocab: int = 1000) -> dict[str, list]:
    """n samples of varied lengths; every third has no rollout log-probs."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {k: [] for k in ("ids", "prompts", "responses", "teacher", "rollout")}
    for i in range(n):
        p, r = int(rng.integers(1, 40)), int(rng.integers(1, 120))
        out["ids"].append(f"s{seed}-{i:05d}")
        out["prompts"].append(rng.integers(0, vocab, p).astype(np.int32))
        out["responses"].append(rng.integers(0, vocab, r).astype(np.int32))
        out["teacher"].append(-rng.gamma(1.0, 1.5, r).astype(np.float32))
        out["rollout"].append(None if i % 3 == 0 else -rng.gamma(1.0, 1.0, r).astype(np.float32))
    return out


def make_plan(
    samples: dict[str, list], *, run_key: str, dataset: str, per_part: int, skipped=(), prov: Provenance | None = None
) -> RunPlan:
    return RunPlan.build(
        run_key=run_key,
        dataset=dataset,
        sample_ids=samples["ids"],
        samples_per_part=per_part,
        input_records=len(samples["ids"]) + len(skipped),
        skipped=skipped,
        provenance=prov if prov is not None else provenance(),
    )


def part_table(plan: RunPlan, samples: dict[str, list], index: int) -> pa.Table:
    """The table of part `index` of `plan` (samples in the `random_samples` layout)."""
    s = plan.part_rows(index)
    topk = (samples["topk_ids"][s], samples["topk_logprobs"][s]) if "topk_ids" in samples else (None, None)
    return build_table(
        samples["ids"][s], samples["prompts"][s], samples["responses"][s], samples["teacher"][s], samples["rollout"][s],
        *topk,
    )  # fmt: skip


def add_topk(samples: dict[str, list], k: int, seed: int = 0, vocab: int = 1000) -> dict[str, list]:
    """`samples` with a synthetic teacher top-k ([len(response), K] ids and descending log-probs) per sample."""
    rng = np.random.default_rng(seed)
    out = dict(samples)
    out["topk_ids"] = [rng.integers(0, vocab, (len(r), k)).astype(np.int32) for r in samples["responses"]]
    out["topk_logprobs"] = [
        -np.sort(rng.gamma(1.0, 2.0, (len(r), k)), axis=1).astype(np.float32) for r in samples["responses"]
    ]
    return out


def write_parts(staging: Staging, plan: RunPlan, samples: dict[str, list], only: set[int] | None = None) -> None:
    for part in plan.parts:
        if only is not None and part.index not in only:
            continue
        staging.write_part(part.index, part_table(plan, samples, part.index), plan.provenance.teacher.fingerprint)


def publish_samples(
    store: Path,
    dataset: str,
    samples: dict[str, list],
    *,
    prov: Provenance | None = None,
    per_part: int = 16,
    run_key: str | None = None,
    skipped=(),
) -> Manifest:
    """Stage, write and publish `samples` (the `random_samples` layout) as a new dataset version."""
    run_key = run_key if run_key is not None else dataset.encode().hex().ljust(64, "0")[:64]
    plan = make_plan(samples, run_key=run_key, dataset=dataset, per_part=per_part, skipped=skipped, prov=prov)
    return write_run(store, plan, lambda part: part_table(plan, samples, part.index))


def build_dataset(
    store: Path, dataset: str, n: int = 100, per_part: int = 16, seed: int = 0, skipped=()
) -> tuple[Manifest, dict[str, list]]:
    samples = random_samples(n, seed)
    run_key = f"{seed:04d}" + "e" * 60
    return publish_samples(store, dataset, samples, per_part=per_part, run_key=run_key, skipped=skipped), samples
