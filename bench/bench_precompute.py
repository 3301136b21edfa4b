"""Benchmark the precompute job: throughput, peak memory of the scorer, and bytes per stored token.

Three sections, each against a baseline measured in the same run (ratios, not absolute numbers,
are what to compare across machines):

* throughput: the real job (`run_precompute` on a JSONL of rollouts) and `TransformersTeacher.score`
  alone, against a bare batched forward pass of the same model over the same padded batches;
  the job's wall time is split into phases to show where any overhead goes.
* memory: peak memory of the chunked scorer against the naive full `log_softmax` at a large
  vocabulary, each in a fresh subprocess (peak RSS above the RSS after loading the model).
* storage: bytes per response token of our Parquet layout against the reference Lightning-OPD
  (slime) layout, on the same samples, and a bit-exact read-back check of our float32 log-probs.

    python bench/bench_precompute.py            # about 3 minutes on 2 CPU cores
    python bench/bench_precompute.py --quick    # about 30 seconds
    python bench/bench_precompute.py --only storage --storage-samples 2000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, parse_with_defaults, print_table, quiet_offline, timed, timed_cpu, write_json  # noqa: E402
from _precompute_memory import bench_memory  # noqa: E402
from _precompute_storage import bench_storage  # noqa: E402
from _synthetic import ID_RANGE, rollout_lengths, write_rollouts_jsonl  # noqa: E402

SECTIONS = ("throughput", "memory", "storage")
DEFAULTS: dict[str, Any] = dict(
    hidden=256,
    layers=4,
    vocab=32000,
    samples=20,
    repeats=5,
    max_batch_tokens=16384,
    max_batch_size=256,
    samples_per_part=1024,
    pipeline_samples=256,
    mem_vocab=151936,
    mem_hidden=256,
    mem_seqs=4,
    mem_seq_len=1024,
    storage_samples=1024,
)
QUICK: dict[str, Any] = dict(samples=4, repeats=2, pipeline_samples=32, mem_seqs=2, mem_seq_len=512, storage_samples=64)


# ---------------------------------------------------------------- throughput


@dataclass
class _Batch:
    ids: Any  # torch.Tensor [B, T], right-padded like TransformersTeacher pads
    mask: Any
    rows: Any  # indices of the positions that predict response tokens
    cols: Any


def _job_batches(prompts: list[np.ndarray], responses: list[np.ndarray], args: argparse.Namespace) -> list[_Batch]:
    """The padded batches the job runs: per part of `samples_per_part`, planned by `plan_batches`."""
    import torch

    from lopd.server.batching import plan_batches

    out = []
    for s in range(0, len(prompts), args.samples_per_part):
        ps, rs = prompts[s : s + args.samples_per_part], responses[s : s + args.samples_per_part]
        lengths = [len(p) + len(r) - 1 for p, r in zip(ps, rs)]
        for batch in plan_batches(lengths, args.max_batch_tokens, args.max_batch_size):
            width = max(lengths[i] for i in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            rows, cols = [], []
            for b, i in enumerate(batch):
                p, r, n = ps[i], rs[i], lengths[i]
                ids[b, : len(p)] = torch.from_numpy(p)
                ids[b, len(p) : n] = torch.from_numpy(r[:-1])
                mask[b, :n] = 1
                rows.append(torch.full((len(r),), b))
                cols.append(torch.arange(len(p) - 1, n))
            out.append(_Batch(ids, mask, torch.cat(rows), torch.cat(cols)))
    return out


@contextmanager
def _job_phases() -> Iterator[dict[str, float]]:
    """Time the job's phases by wrapping the functions it calls (negligible overhead)."""
    import lopd.server.precompute as pre
    import lopd.server.teachers as teachers
    from lopd.server.teachers.transformers_backend import TransformersTeacher
    from lopd.storage.staging import Staging

    times: dict[str, float] = defaultdict(float)
    targets = [
        (pre, "model_fingerprint", "fingerprint models"),
        (pre, "resolve_model_fingerprint", "fingerprint models"),
        (pre, "_load_tokenizer", "load tokenizer"),
        (pre, "scan_rollouts", "scan rollouts"),
        (teachers, "load_teacher", "load teacher + self-check"),
        (pre, "load_rollouts", "read rollouts"),
        (TransformersTeacher, "score", "score"),
        (pre, "build_table", "build table"),
        (Staging, "write_part", "write part"),
        (pre, "publish", "publish"),
    ]
    saved = []
    for owner, attr, label in targets:
        original = owner.__dict__.get(attr) if isinstance(owner, type) else getattr(owner, attr, None)
        if original is None:
            continue  # renamed upstream: that phase lands in "other"

        def wrapper(*a: Any, _f: Any = original, _label: str = label, **kw: Any) -> Any:
            dt, out = timed(lambda: _f(*a, **kw))
            times[_label] += dt
            return out

        saved.append((owner, attr, original))
        setattr(owner, attr, wrapper)
    try:
        yield times
    finally:
        for owner, attr, original in reversed(saved):
            setattr(owner, attr, original)


def _run_job(args: argparse.Namespace, model_dir: Path, rollouts: Path, store: Path) -> None:
    from lopd.server.precompute import PrecomputeConfig, run_precompute

    cfg = PrecomputeConfig(
        rollouts=[rollouts],
        teacher=model_dir,
        sft_teacher=str(model_dir),
        store=store,
        dataset="bench",
        samples_per_part=args.samples_per_part,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_size=args.max_batch_size,
        progress=False,
    )
    result = run_precompute(cfg)
    if result.status != "published":
        raise RuntimeError(f"precompute ended as {result.status}")


def _pipeline_ceiling(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The job around the model: everything but scoring, timed with a trivial teacher on more rollouts.

    On this CPU the real teacher's compute hides the job's own costs; a GPU teacher scores
    hundreds of times faster, so what the job does around the model must keep up on its own.
    """
    from lopd.testing import build_tiny_model

    model_dir = build_tiny_model(work / "teacher-trivial", "llama", seed=0, hidden=32, layers=1, max_positions=2048)
    rng = np.random.default_rng(args.seed + 1)
    plen, rlen = rollout_lengths(rng, args.pipeline_samples)
    prompts = [rng.integers(*ID_RANGE, k) for k in plen]
    responses = [rng.integers(*ID_RANGE, k) for k in rlen]
    rollouts = write_rollouts_jsonl(work / "rollouts-trivial.jsonl", prompts, responses)
    seq_tokens = int(plen.sum() + rlen.sum())
    with _job_phases() as ph:
        job = timed(lambda: _run_job(args, model_dir, rollouts, work / "store-trivial"))[0]
    around = job - ph["score"] - ph["load teacher + self-check"]
    print(
        f"\nAround the model: trivial teacher, {args.pipeline_samples} rollouts, {seq_tokens:,} tokens: job "
        f"{job:.2f}s, scoring {ph['score']:.2f}s, loading {ph['load teacher + self-check']:.2f}s, the rest "
        f"{around:.2f}s = {seq_tokens / around:,.0f} tokens/s ("
        + ", ".join(f"{k} {v:.3f}s" for k, v in sorted(ph.items(), key=lambda kv: -kv[1]) if k != "score")
        + ")"
    )
    return {
        "samples": args.pipeline_samples,
        "seq_tokens": seq_tokens,
        "job_seconds": job,
        "phases_seconds": dict(ph),
        "seconds_excluding_scoring_and_loading": around,
        "seq_tokens_per_s_excluding_scoring_and_loading": seq_tokens / around,
    }


def bench_throughput(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from lopd.server.teachers.transformers_backend import TransformersTeacher
    from lopd.testing import build_tiny_model

    model_dir = build_tiny_model(
        work / "teacher",
        "llama",
        seed=0,
        hidden=args.hidden,
        layers=args.layers,
        vocab_size=args.vocab,
        max_positions=2048,
    )
    rng = np.random.default_rng(args.seed)
    plen, rlen = rollout_lengths(rng, args.samples)
    prompts = [rng.integers(*ID_RANGE, k) for k in plen]
    responses = [rng.integers(*ID_RANGE, k) for k in rlen]
    rollouts = write_rollouts_jsonl(work / "rollouts.jsonl", prompts, responses)
    warm_rollouts = write_rollouts_jsonl(work / "warm.jsonl", prompts[:2], responses[:2], start=10**6)
    seq_tokens, resp_tokens = int(plen.sum() + rlen.sum()), int(rlen.sum())

    teacher = TransformersTeacher(model_dir, max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size)
    model, body, head = teacher.model, teacher.model.get_decoder(), teacher.model.get_output_embeddings()
    batches = _job_batches(prompts, responses, args)
    parts = [slice(s, s + args.samples_per_part) for s in range(0, args.samples, args.samples_per_part)]

    @torch.inference_mode()
    def bare(bs: list[_Batch]) -> None:
        for b in bs:
            _ = model(input_ids=b.ids, attention_mask=b.mask, use_cache=False).logits

    @torch.inference_mode()
    def minimal(bs: list[_Batch]) -> None:
        for b in bs:
            hidden = body(input_ids=b.ids, attention_mask=b.mask, use_cache=False).last_hidden_state
            head(hidden[b.rows, b.cols])

    def score() -> None:
        for part in parts:
            teacher.score(prompts[part], responses[part])

    # Warm-up: first-call costs (kernel selection, imports, page cache) are not what we measure.
    bare(batches[:1])
    minimal(batches[:1])
    teacher.score(prompts[:2], responses[:2])
    _run_job(args, model_dir, warm_rollouts, work / "store-warm")

    times: dict[str, list[float]] = defaultdict(list)
    cpu: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, list[float]] = defaultdict(list)
    variants_fn = {
        "bare forward": lambda: bare(batches),
        "minimal forward": lambda: minimal(batches),
        "teacher.score()": score,
        "precompute job": lambda: _run_job(args, model_dir, rollouts, work / f"store-{len(phases['other'])}"),
    }
    for k in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in variants_fn.items():
            with _job_phases() if name == "precompute job" else nullcontext({}) as ph:
                wall, cpu_s, _ = timed_cpu(fn)
            times[name].append(wall)
            cpu[name].append(cpu_s)
            if name == "precompute job":
                for label, t in ph.items():
                    phases[label].append(t)
                phases["other"].append(wall - sum(ph.values()))
        print(f"  repeat {k + 1}/{args.repeats}: " + ", ".join(f"{n} {v[-1]:.2f}s" for n, v in times.items()))
    head_chunk_bytes = teacher.head_chunk_bytes
    teacher.close()

    med = {n: median(v) for n, v in times.items()}
    med_cpu = {n: median(v) for n, v in cpu.items()}
    variants = {
        name: {
            "seconds_median": t,
            "seconds_all": times[name],
            "cpu_seconds_median": med_cpu[name],
            "cpu_seconds_all": cpu[name],
            "seq_tokens_per_s": seq_tokens / t,
            "response_tokens_per_s": resp_tokens / t,
            "ratio_vs_bare_forward": t / med["bare forward"],
            "ratio_vs_minimal_forward": t / med["minimal forward"],
            "cpu_ratio_vs_bare_forward": med_cpu[name] / med_cpu["bare forward"],
            "cpu_ratio_vs_minimal_forward": med_cpu[name] / med_cpu["minimal forward"],
        }
        for name, t in med.items()
    }
    keys = (
        "seconds_median",
        "seq_tokens_per_s",
        "response_tokens_per_s",
        "ratio_vs_bare_forward",
        "ratio_vs_minimal_forward",
        "cpu_ratio_vs_bare_forward",
        "cpu_ratio_vs_minimal_forward",
    )
    rows = [[name, *(v[k] for k in keys)] for name, v in variants.items()]
    print_table(
        f"Throughput: {args.samples} rollouts, {seq_tokens:,} tokens ({resp_tokens:,} response), llama hidden "
        f"{args.hidden} x {args.layers} layers, vocab {args.vocab:,}, budget {args.max_batch_tokens:,} tokens, "
        f"{len(batches)} batches; median of {args.repeats}",
        ["variant", "seconds", "seq tok/s", "resp tok/s", "/ bare", "/ minimal", "cpu / bare", "cpu / minimal"],
        rows,
    )
    job_med = med["precompute job"]
    breakdown = {label: median(v) for label, v in phases.items()}
    print_table(
        "Precompute job, where the time goes (median seconds per phase)",
        ["phase", "seconds", "% of job"],
        [[label, t, 100 * t / job_med] for label, t in sorted(breakdown.items(), key=lambda kv: -kv[1])],
    )
    return {
        "model": {"arch": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "samples": args.samples,
        "seq_tokens": seq_tokens,
        "response_tokens": resp_tokens,
        "batches": len(batches),
        "padded_token_slots": int(sum(b.ids.numel() for b in batches)),
        "variants": variants,
        "job_phases_seconds_median": breakdown,
        "head_chunk_bytes": head_chunk_bytes,
        "around_the_model": _pipeline_ceiling(args, work),
        "goal": "precompute job / bare forward <= 1.15 (wall time)",
    }


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, about 30 seconds")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="precompute", help="results go to bench/results/<name>.json")
    g = p.add_argument_group("throughput")
    g.add_argument("--hidden", type=int, help=f"teacher hidden size (default {DEFAULTS['hidden']})")
    g.add_argument("--layers", type=int, help=f"teacher layers (default {DEFAULTS['layers']})")
    g.add_argument("--vocab", type=int, help=f"teacher vocabulary (default {DEFAULTS['vocab']})")
    g.add_argument("--samples", type=int, help=f"rollouts (default {DEFAULTS['samples']}, quick {QUICK['samples']})")
    g.add_argument("--repeats", type=int, help=f"timed repeats (default {DEFAULTS['repeats']})")
    g.add_argument("--max-batch-tokens", type=int, help=f"token budget (default {DEFAULTS['max_batch_tokens']})")
    g.add_argument("--max-batch-size", type=int, help=f"sequences per batch (default {DEFAULTS['max_batch_size']})")
    g.add_argument("--samples-per-part", type=int, help=f"job part size (default {DEFAULTS['samples_per_part']})")
    g.add_argument(
        "--pipeline-samples",
        type=int,
        help=f"rollouts for the trivial-teacher job (default {DEFAULTS['pipeline_samples']})",
    )
    g = p.add_argument_group("memory")
    g.add_argument("--mem-vocab", type=int, help=f"vocabulary (default {DEFAULTS['mem_vocab']})")
    g.add_argument("--mem-hidden", type=int, help=f"hidden size (default {DEFAULTS['mem_hidden']})")
    g.add_argument("--mem-seqs", type=int, help=f"sequences in the batch (default {DEFAULTS['mem_seqs']})")
    g.add_argument("--mem-seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['mem_seq_len']})")
    g = p.add_argument_group("storage")
    g.add_argument("--storage-samples", type=int, help=f"samples (default {DEFAULTS['storage_samples']})")
    args = parse_with_defaults(p, argv, DEFAULTS, QUICK)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_offline()
    results: dict[str, Any] = {"load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        work = Path(tmp)
        for section, fn in (("throughput", bench_throughput), ("memory", bench_memory), ("storage", bench_storage)):
            if section in args.only:
                (work / section).mkdir()
                dt, results[section] = timed(lambda fn=fn, section=section: fn(args, work / section))
                results[section]["section_seconds"] = dt
    path = write_json(args.name, results, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
