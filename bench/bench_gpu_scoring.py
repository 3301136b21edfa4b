"""Benchmark teacher scoring on a CUDA GPU: agreement with the naive reference, throughput, peak memory.

Run where a GPU exists (it refuses to run without one). A Qwen2-0.5B-shaped model with random
weights (896 hidden, 24 layers, 14 heads, 151,936 vocabulary: the vocabulary is what makes
scoring memory-hungry) is built on the spot; what is measured does not depend on what the
weights learned. Every figure has a baseline from the same run:

* agreement: the float32 and bfloat16 CUDA scorers against a naive float32 full `log_softmax`
  + gather, one unpadded sequence at a time (max and mean |difference| per token); also the
  bfloat16 naive path against the float32 naive path, the noise floor that half precision itself adds;
* throughput: `TransformersTeacher.score` and the whole precompute job (`run_precompute`:
  fingerprinting, reading rollouts, Parquet writes, publish) against a bare batched forward of
  the same model over the same padded batches, and against a minimal body + response-rows head;
* memory: peak CUDA memory above the weights for one batch, scorer vs naive full log-softmax;
* vLLM, when it is installed: `VLLMTeacher` agreement and throughput on the same rollouts.

    python bench/bench_gpu_scoring.py             # about 3 minutes on one H100
    python bench/bench_gpu_scoring.py --quick     # smaller model and fewer rollouts
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, quiet_offline, write_json  # noqa: E402
from _synthetic import ID_RANGE, rollout_lengths, write_rollouts_jsonl  # noqa: E402
from bench_precompute import _job_phases  # noqa: E402

QWEN2_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
_COLUMNS = (
    "seconds_median",
    "seq_tokens_per_s",
    "response_tokens_per_s",
    "ratio_vs_bare_forward",
    "ratio_vs_minimal_forward",
)
QUICK = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512, vocab=32000)


def _build_model(work: Path, shape: dict[str, int]) -> Path:
    from lopd.testing import build_tiny_model

    return build_tiny_model(
        work / "teacher",
        "qwen2",
        seed=0,
        hidden=shape["hidden"],
        layers=shape["layers"],
        vocab_size=shape["vocab"],
        max_positions=4096,
        init_std=0.02,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"],
    )


def _padded_batches(prompts: list[np.ndarray], responses: list[np.ndarray], budget: int, size: int) -> list[Any]:
    """The right-padded batches `TransformersTeacher` runs (same plan), as CUDA tensors."""
    import torch

    from lopd.server.batching import plan_batches

    lengths = [len(p) + len(r) - 1 for p, r in zip(prompts, responses)]
    out = []
    for batch in plan_batches(lengths, budget, size):
        width = max(lengths[i] for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        rows, cols = [], []
        for b, i in enumerate(batch):
            p, r, n = prompts[i], responses[i], lengths[i]
            ids[b, : len(p)], ids[b, len(p) : n] = torch.from_numpy(p), torch.from_numpy(r[:-1])
            mask[b, :n] = 1
            rows.append(torch.full((len(r),), b))
            cols.append(torch.arange(len(p) - 1, n))
        out.append((ids.cuda(), mask.cuda(), torch.cat(rows).cuda(), torch.cat(cols).cuda()))
    return out


def _cuda_time(fn: Any) -> float:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _naive(model: Any, p: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Full-vocabulary float32 log_softmax of one unpadded sequence, gathered at the response tokens."""
    import torch

    ids = torch.from_numpy(np.concatenate([p, r]))[None].cuda()
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=lp.device)
    return lp[pos, torch.from_numpy(r).cuda()].cpu().numpy()


def _diff(got: list[np.ndarray], ref: list[np.ndarray]) -> dict[str, float]:
    d = np.concatenate([np.abs(g.astype(np.float64) - r) for g, r in zip(got, ref)])
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "tokens": int(d.size)}


def bench_agreement(model_dir: Path, prompts: list[np.ndarray], responses: list[np.ndarray]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.server.teachers.transformers_backend import TransformersTeacher

    ref_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    ref = [_naive(ref_model, p, r) for p, r in zip(prompts, responses)]
    del ref_model
    bf16_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    naive_bf16 = [_naive(bf16_model, p, r) for p, r in zip(prompts, responses)]
    del bf16_model
    torch.cuda.empty_cache()
    out: dict[str, Any] = {"naive bfloat16 (per sequence)": _diff(naive_bf16, ref)}
    for dtype in ("float32", "bfloat16"):
        teacher = TransformersTeacher(model_dir, device="cuda", dtype=dtype)
        out[f"transformers {dtype} (batched)"] = _diff(teacher.score(prompts, responses), ref)
        teacher.close()
    try:
        import vllm  # noqa: F401

        from lopd.server.teachers.vllm_backend import VLLMTeacher
    except ImportError as e:
        out["vllm"] = f"not measured: {e}"
    else:
        teacher = VLLMTeacher(model_dir, dtype="bfloat16")
        out["vllm bfloat16"] = _diff(teacher.score(prompts, responses), ref)
        teacher.close()
    print_table(
        f"Agreement with the naive float32 full log-softmax, {len(prompts)} rollouts",
        ["scorer", "max |diff|", "mean |diff|", "tokens"],
        [[k, v["max_abs_diff"], v["mean_abs_diff"], v["tokens"]] for k, v in out.items() if isinstance(v, dict)],
    )
    return out


def bench_throughput(
    args: argparse.Namespace, model_dir: Path, work: Path, prompts: list[np.ndarray], responses: list[np.ndarray]
) -> dict[str, Any]:
    import torch

    from lopd.server.precompute import PrecomputeConfig, run_precompute
    from lopd.server.teachers.transformers_backend import TransformersTeacher

    seq_tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_tokens = sum(len(r) for r in responses)
    teacher = TransformersTeacher(
        model_dir, device="cuda", dtype="bfloat16", max_batch_tokens=args.max_batch_tokens, max_batch_size=256
    )
    model, body, head = teacher.model, teacher.model.get_decoder(), teacher.model.get_output_embeddings()
    batches = _padded_batches(prompts, responses, args.max_batch_tokens, 256)
    rollouts = write_rollouts_jsonl(work / "rollouts.jsonl", prompts, responses)

    @torch.inference_mode()
    def bare() -> None:
        for ids, mask, _, _ in batches:
            _ = model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    @torch.inference_mode()
    def minimal() -> None:
        for ids, mask, rows, cols in batches:
            hidden = body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            head(hidden[rows, cols])

    runs = {"n": 0}

    def job() -> None:
        runs["n"] += 1
        cfg = PrecomputeConfig(
            rollouts=[rollouts],
            teacher=model_dir,
            sft_teacher=str(model_dir),
            store=work / f"store-{runs['n']}",
            dataset="bench",
            device="cuda",
            dtype="bfloat16",
            max_batch_tokens=args.max_batch_tokens,
            samples_per_part=args.samples_per_part,
            progress=False,
        )
        if run_precompute(cfg).status != "published":
            raise RuntimeError("the precompute job did not publish")

    fused = teacher._fused  # the torch.compile'd normalisation, None where it is unavailable

    def score(chunk_mb: int, use_fused: bool) -> Any:
        def run() -> None:
            teacher.head_chunk_bytes = chunk_mb * 2**20
            teacher._fused = fused if use_fused else None
            try:
                teacher.score(prompts, responses)
            finally:
                teacher._fused = fused

        return run

    default_chunk = teacher.head_chunk_bytes
    variants = {
        "bare forward (all logits)": bare,
        "minimal forward": minimal,
        **{f"score(), eager, head chunk {mb} MB": score(mb, False) for mb in args.head_chunk_mb},
        **({f"score(), fused, head chunk {mb} MB": score(mb, True) for mb in args.head_chunk_mb} if fused else {}),
        "precompute job": job,
    }
    for fn in variants.values():  # warm-up: kernel selection, allocator growth, page cache
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    phases: dict[str, list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in variants.items():
            teacher.head_chunk_bytes = default_chunk
            with _job_phases() if name == "precompute job" else nullcontext({}) as ph:
                times[name].append(_cuda_time(fn))
            for label, t in ph.items():
                phases.setdefault(label, []).append(t)
    teacher.close()
    med = {k: median(v) for k, v in times.items()}
    rows = {
        k: {
            "seconds_median": t,
            "seconds_all": times[k],
            "seq_tokens_per_s": seq_tokens / t,
            "response_tokens_per_s": resp_tokens / t,
            "ratio_vs_bare_forward": t / med["bare forward (all logits)"],
            "ratio_vs_minimal_forward": t / med["minimal forward"],
        }
        for k, t in med.items()
    }
    print_table(
        f"Throughput (bfloat16): {len(prompts)} rollouts, {seq_tokens:,} tokens ({resp_tokens:,} response), "
        f"{len(batches)} batches of <= {args.max_batch_tokens:,} tokens; median of {args.repeats}",
        ["variant", "seconds", "seq tok/s", "resp tok/s", "/ bare", "/ minimal"],
        [[k, *(v[c] for c in _COLUMNS)] for k, v in rows.items()],
    )
    breakdown = {label: median(v) for label, v in phases.items()}
    print_table(
        f"Precompute job, where the time goes (median seconds per phase; head chunk {default_chunk // 2**20} MB)",
        ["phase", "seconds", "% of job"],
        [[k, t, 100 * t / med["precompute job"]] for k, t in sorted(breakdown.items(), key=lambda kv: -kv[1])],
    )
    return {
        "seq_tokens": seq_tokens,
        "response_tokens": resp_tokens,
        "batches": len(batches),
        "default_head_chunk_bytes": default_chunk,
        "variants": rows,
        "job_phases_seconds_median": breakdown,
    }


def bench_memory(model_dir: Path, seqs: int, seq_len: int) -> dict[str, Any]:
    """Peak CUDA memory above the loaded weights for one batch: the scorer vs the naive log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    from lopd.server.teachers.transformers_backend import TransformersTeacher

    rng = np.random.default_rng(1)
    prompts = [rng.integers(*ID_RANGE, 64) for _ in range(seqs)]
    responses = [rng.integers(*ID_RANGE, seq_len - 64) for _ in range(seqs)]
    out: dict[str, Any] = {"batch": f"{seqs} x {seq_len} tokens"}

    teacher = TransformersTeacher(model_dir, device="cuda", dtype="bfloat16", max_batch_tokens=seqs * seq_len)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    teacher.score(prompts, responses)
    out["scorer_peak_above_weights_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    teacher.close()

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    ids = torch.from_numpy(np.stack([np.concatenate([p, r]) for p, r in zip(prompts, responses)])).cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        lp[:, :-1].gather(-1, ids[:, 1:, None])
    out["naive_peak_above_weights_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["ratio_scorer_vs_naive"] = out["scorer_peak_above_weights_mb"] / out["naive_peak_above_weights_mb"]
    del model, lp
    torch.cuda.empty_cache()
    print(
        f"\nPeak CUDA memory above the weights, one batch of {out['batch']}: scorer "
        f"{out['scorer_peak_above_weights_mb']:,.0f} MB, naive log-softmax "
        f"{out['naive_peak_above_weights_mb']:,.0f} MB "
        f"(ratio {out['ratio_scorer_vs_naive']:.3f})"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and few rollouts")
    p.add_argument("--samples", type=int, default=512, help="rollouts for throughput (default 512)")
    p.add_argument("--agreement-samples", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch-tokens", type=int, default=65536)
    p.add_argument("--samples-per-part", type=int, default=1024)
    p.add_argument(
        "--head-chunk-mb",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[256, 1024, 4096],
        help="LM-head chunk sizes to time teacher.score() with (default 256,1024,4096)",
    )
    p.add_argument("--mem-seqs", type=int, default=8)
    p.add_argument("--mem-seq-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="gpu_scoring", help="results go to bench/results/<name>.json")
    p.add_argument("--out", type=Path, help="also copy the JSON here")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu_scoring needs a CUDA device")
    quiet_offline()
    if args.quick:
        args.samples, args.agreement_samples, args.repeats, args.mem_seq_len = 64, 8, 2, 1024
    shape = QUICK if args.quick else QWEN2_05B
    rng = np.random.default_rng(args.seed)
    plen, rlen = rollout_lengths(rng, args.samples)
    prompts = [rng.integers(*ID_RANGE, k) for k in plen]
    responses = [rng.integers(*ID_RANGE, k) for k in rlen]
    with tempfile.TemporaryDirectory(prefix="lopd-bench-gpu-") as tmp:
        work = Path(tmp)
        model_dir = _build_model(work, shape)
        results = {
            "model": {"arch": "qwen2", **shape},
            "agreement": bench_agreement(
                model_dir, prompts[: args.agreement_samples], responses[: args.agreement_samples]
            ),
            "throughput": bench_throughput(args, model_dir, work, prompts, responses),
            "memory": bench_memory(model_dir, args.mem_seqs, args.mem_seq_len),
        }
    path = write_json(args.name, results, args)
    if args.out is not None:
        args.out.write_bytes(path.read_bytes())
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
