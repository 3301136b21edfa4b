"""Peak memory of the chunked scorer against the naive full log-softmax, each in a fresh process.

torch's CPU allocations are invisible to `tracemalloc` and torch keeps no CPU allocator
statistics, so each variant runs in its own subprocess (this file run as a script) that loads
the model, settles, resets the kernel's peak-RSS counter and scores one batch: the figure is
peak RSS minus RSS after loading. Both variants return their log-probs, which must agree.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, quiet_offline, timed  # noqa: E402
from _synthetic import ID_RANGE  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _worker(argv: list[str]) -> None:
    import resource

    import torch

    p = argparse.ArgumentParser()
    p.add_argument("variant", choices=("naive", "chunked", "chunked-topk"))
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--seqs", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=0, help="chunked-topk: K")
    p.add_argument("--head-chunk-bytes", type=int, default=256 * 2**20)
    args = p.parse_args(argv)
    quiet_offline()

    rng = np.random.default_rng(args.seed)
    n_prompt = args.seq_len // 4
    prompts = [rng.integers(*ID_RANGE, n_prompt) for _ in range(args.seqs)]
    responses = [rng.integers(*ID_RANGE, args.seq_len - n_prompt) for _ in range(args.seqs)]
    full = torch.from_numpy(np.stack([np.concatenate([p, r]) for p, r in zip(prompts, responses)]))
    if args.variant == "naive":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()

        @torch.inference_mode()
        def run() -> np.ndarray:
            logits = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)[:, n_prompt - 1 : -1]
            return logp.gather(-1, full[:, n_prompt:, None]).squeeze(-1).flatten().numpy()

        with torch.inference_mode():  # warm-up, as the teacher's load-time self-check is for the other
            model(input_ids=full[:1, :16])
        chunk = None
    else:
        from lopd.server.teachers.transformers_backend import TransformersTeacher

        top_k = args.top_k if args.variant == "chunked-topk" else 0
        teacher = TransformersTeacher(
            args.model_dir, max_batch_tokens=full.numel(), max_batch_size=args.seqs, top_k=top_k,
            head_chunk_bytes=args.head_chunk_bytes,
        )  # fmt: skip
        chunk = teacher.head_chunk_bytes

        def run() -> np.ndarray:
            if top_k:  # the sampled tokens' log-probs, to compare; the top-k arrays are held until the end
                return np.concatenate([s.logprobs for s in teacher.score_topk(prompts, responses)])
            return np.concatenate(teacher.score(prompts, responses))

    gc.collect()
    base_kb = _status_kb("VmRSS")
    exact = _reset_peak_rss()
    dt, out = timed(run)
    peak_kb = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.out, out.astype(np.float32))
    res = {"base_mb": base_kb / 1024, "peak_mb": peak_kb / 1024, "seconds": dt, "peak_reset": exact}
    print(json.dumps({**res, "head_chunk_bytes": chunk}))


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lopd.testing import build_tiny_model

    model_dir = build_tiny_model(
        work / "teacher-mem",
        "llama",
        seed=0,
        hidden=args.mem_hidden,
        layers=2,
        vocab_size=args.mem_vocab,
        max_positions=max(2048, args.mem_seq_len),
    )
    res: dict[str, Any] = {}
    outs = {}
    for variant in ("naive", "chunked"):
        outs[variant] = work / f"mem-{variant}.npy"
        cmd = [
            sys.executable,
            __file__,
            variant,
            str(model_dir),
            str(outs[variant]),
            f"--seqs={args.mem_seqs}",
            f"--seq-len={args.mem_seq_len}",
            f"--seed={args.seed}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-3000:]}")
        res[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        res[variant]["delta_mb"] = res[variant]["peak_mb"] - res[variant]["base_mb"]
    diff = float(np.max(np.abs(np.load(outs["naive"]) - np.load(outs["chunked"]))))
    ratio = res["chunked"]["delta_mb"] / res["naive"]["delta_mb"]
    tokens = args.mem_seqs * args.mem_seq_len
    logits_mb = tokens * args.mem_vocab * 4 / 2**20
    print_table(
        f"Peak memory: {args.mem_seqs} x {args.mem_seq_len} tokens, vocab {args.mem_vocab:,} (full fp32 logits "
        f"are {logits_mb:,.0f} MB); peak RSS above the loaded model, a fresh process each",
        ["variant", "peak MB", "seconds"],
        [
            ["naive log_softmax(logits.float())", res["naive"]["delta_mb"], res["naive"]["seconds"]],
            ["chunked scorer (TransformersTeacher)", res["chunked"]["delta_mb"], res["chunked"]["seconds"]],
            ["ratio chunked / naive", ratio, res["chunked"]["seconds"] / res["naive"]["seconds"]],
        ],
    )
    chunk_mb = res["chunked"]["head_chunk_bytes"] / 2**20
    print(f"  max |naive - chunked| log-prob: {diff:.2e}; the scorer's head_chunk_bytes: {chunk_mb:.0f} MB")
    return {
        "vocab": args.mem_vocab,
        "hidden": args.mem_hidden,
        "tokens": tokens,
        "full_logits_mb": logits_mb,
        "naive": res["naive"],
        "chunked": res["chunked"],
        "ratio_chunked_over_naive": ratio,
        "max_abs_diff": diff,
    }


if __name__ == "__main__":
    _worker(sys.argv[1:])
