"""Benchmark precompute on CPU with a real vLLM: in process (`--backend vllm`), through vLLM's OpenAI server
(`--backend openai`) and with transformers, on the same model and rollouts, in one run.

The transformers backend is the baseline; every figure is also given as a ratio to it. Two measures:

* scoring: `teacher.score()` on all the rollouts, after loading and one warm-up pass, median of `--repeats`.
  vLLM in process runs in the vLLM environment (`bench/_vllm_score.py`); the openai backend runs here and
  talks to the server over loopback.
* job: `lopd precompute` end to end, as a user runs it, in a fresh process: imports, engine start-up,
  scanning, scoring, writing and publishing (the openai job's server is already up: its start-up is
  reported separately).

vLLM runs where `scripts/setup.sh` put it (`.venv-vllm`, or `--vllm-python`). On CPU, vLLM binds its
model to the cores it does not reserve for the serving process: on 2 cores, one thread. The
`vllm, 2 threads` variant lets it take both (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`).

    python bench/bench_vllm_cpu.py            # about 10 minutes on 2 CPU cores
    python bench/bench_vllm_cpu.py --quick    # a small model and 8 rollouts: a smoke run (about 5 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, print_table, quiet_offline, timed, write_json  # noqa: E402
from _synthetic import ID_RANGE, rollout_lengths, write_rollouts_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULTS: dict[str, Any] = dict(samples=64, hidden=256, layers=4, vocab=32000, repeats=3)
QUICK: dict[str, Any] = dict(samples=8, hidden=128, layers=2, vocab=4096, repeats=1)
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, few rollouts, one repeat")
    ap.add_argument("--samples", type=int, help=f"rollouts (default {DEFAULTS['samples']})")
    ap.add_argument("--hidden", type=int, help=f"teacher hidden size (default {DEFAULTS['hidden']}; 4 heads)")
    ap.add_argument("--layers", type=int, help=f"teacher layers (default {DEFAULTS['layers']})")
    ap.add_argument("--vocab", type=int, help=f"teacher vocabulary (default {DEFAULTS['vocab']})")
    ap.add_argument("--repeats", type=int, help=f"timed scoring passes (default {DEFAULTS['repeats']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm" / "bin" / "python")
    ap.add_argument("--no-two-threads", action="store_true", help="skip the vLLM variant that uses every core")
    ap.add_argument("--name", default="vllm_cpu", help="results file name (bench/results/NAME.json)")
    args = ap.parse_args(argv)
    base = {**DEFAULTS, **(QUICK if args.quick else {})}
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.vllm_python.exists():
        ap.error(f"no vLLM environment at {args.vllm_python}: run scripts/setup.sh (it makes .venv-vllm)")
    return args


def _records(path: Path) -> tuple[list[list[int]], list[list[int]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["prompt_ids"] for r in rows], [r["response_ids"] for r in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _openai_server(args: argparse.Namespace, model: Path, log: Path) -> Iterator[tuple[str, float]]:
    """vLLM's OpenAI server on loopback (`python -m vllm.entrypoints.openai.api_server`; `vllm serve` of vllm-cpu
    0.32.0 crashes at start); yields (its URL, seconds until it answered)."""
    import httpx

    port = _free_port()
    cmd = [
        str(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
        "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--served-model-name", "teacher",
    ]  # fmt: skip
    url, start = f"http://127.0.0.1:{port}", time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **VLLM_ENV}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"vLLM's server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - start > 900:
                    raise SystemExit(f"vLLM's server did not answer in 900 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield url, time.perf_counter() - start
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _time_scores(teacher: Any, prompts: list[list[int]], responses: list[list[int]], repeats: int) -> dict[str, Any]:
    warm = teacher.score(prompts, responses)
    times = [timed(lambda: teacher.score(prompts, responses))[0] for _ in range(repeats)]
    return {"times_s": times, "head": [w[:8].tolist() for w in warm[:4]]}


def _vllm_scores(args: argparse.Namespace, model: Path, rollouts: Path, work: Path, env: dict[str, str]) -> Any:
    spec, result = work / "spec.json", work / "result.json"
    spec.write_text(json.dumps({"model": str(model), "rollouts": str(rollouts), "options": {"dtype": "float32"},
                                "repeats": args.repeats}))  # fmt: skip
    with (work / "vllm_score.log").open("wb") as log:
        wall, _ = timed(lambda: subprocess.run(
            [str(args.vllm_python), str(REPO / "bench" / "_vllm_score.py"), str(spec), str(result)],
            cwd=REPO, env={**os.environ, **VLLM_ENV, **env}, stdout=log, stderr=subprocess.STDOUT, check=True,
        ))  # fmt: skip
    out = json.loads(result.read_text())
    out["process_s"] = wall
    out["head"] = out.pop("logprobs_head")
    return out


def _job(
    python: Path | str, model: Path, rollouts: Path, store: Path, log: Path, *extra: str, env: Any = None
) -> float:
    cmd = [
        str(python), "-m", "lopd", "precompute", str(rollouts), "--teacher", str(model), "--sft-teacher", str(model),
        "--store", str(store), "--dataset", "ds", "--no-progress", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        wall, proc = timed(lambda: subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out,
                                                  stderr=subprocess.STDOUT))  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_offline()
    from lopd.server.teachers.openai_backend import OpenAITeacher
    from lopd.server.teachers.transformers_backend import TransformersTeacher
    from lopd.testing import build_tiny_model

    results: dict[str, Any] = {"load_average_1min_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-cpu-") as tmp:
        work = Path(tmp)
        model = build_tiny_model(
            work / "teacher",
            "llama",
            seed=args.seed,
            hidden=args.hidden,
            layers=args.layers,
            vocab_size=args.vocab,
            max_positions=2048,  # rollouts reach 1,300 tokens
        )
        rng = np.random.default_rng(args.seed)
        plen, rlen = rollout_lengths(rng, args.samples)
        prompts_np = [rng.integers(*ID_RANGE, n) for n in plen]
        responses_np = [rng.integers(*ID_RANGE, n) for n in rlen]
        rollouts = write_rollouts_jsonl(work / "rollouts.jsonl", prompts_np, responses_np)
        prompts, responses = _records(rollouts)
        tokens = int(sum(plen) + sum(rlen))
        response_tokens = int(sum(rlen))
        print(
            f"{args.samples} rollouts, {tokens:,} tokens ({response_tokens:,} response); llama hidden {args.hidden}, "
            f"{args.layers} layers, vocabulary {args.vocab:,}, float32; load average {os.getloadavg()[0]:.1f}"
        )

        scoring: dict[str, Any] = {}
        teacher = TransformersTeacher(model, dtype="float32")
        try:
            scoring["transformers"] = _time_scores(teacher, prompts, responses, args.repeats)
        finally:
            teacher.close()
        (work / "v1").mkdir()
        scoring["vllm"] = _vllm_scores(args, model, rollouts, work / "v1", {})
        if not args.no_two_threads:
            (work / "v2").mkdir()
            scoring["vllm, 2 threads"] = _vllm_scores(args, model, rollouts, work / "v2",
                                                      {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"})  # fmt: skip

        jobs: dict[str, float] = {}
        jobs["transformers"] = _job(
            sys.executable, model, rollouts, work / "s-hf", work / "hf.log", "--dtype", "float32"
        )
        jobs["vllm"] = _job(args.vllm_python, model, rollouts, work / "s-vllm", work / "vllm.log", "--backend", "vllm",
                            "--dtype", "float32", env=VLLM_ENV)  # fmt: skip
        with _openai_server(args, model, work / "server.log") as (url, server_start_s):
            teacher = OpenAITeacher(model, teacher_url=url)
            try:
                scoring["openai (vLLM server)"] = _time_scores(teacher, prompts, responses, args.repeats)
            finally:
                teacher.close()
            jobs["openai (vLLM server)"] = _job(sys.executable, model, rollouts, work / "s-openai", work / "oa.log",
                                                "--backend", "openai", "--teacher-url", url)  # fmt: skip
        results["openai_server_start_s"] = server_start_s

    base = scoring["transformers"]["head"]
    rows, table = [], {}
    t_base = median(scoring["transformers"]["times_s"])
    for name, s in scoring.items():
        t = median(s["times_s"])
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(s["head"], base))
        table[name] = {"scoring_s": t, "tokens_per_s": tokens / t, "response_tokens_per_s": response_tokens / t,
                       "vs_transformers": t_base / t, "load_s": s.get("load_s"), "max_abs_diff_vs_transformers": diff,
                       "times_s": s["times_s"]}  # fmt: skip
        rows.append([name, t, tokens / t, response_tokens / t, t_base / t, diff])
    print_table(
        f"Scoring (teacher.score after a warm-up, median of {args.repeats}; speed-up = transformers time / time)",
        ["backend", "seconds", "tokens/s", "response tok/s", "speed-up", "max |diff| vs hf"], rows,
    )  # fmt: skip
    j_base = jobs["transformers"]
    print_table(
        "Job (`lopd precompute` end to end in a fresh process, start-up included; openai: server already up)",
        ["backend", "seconds", "tokens/s", "speed-up"],
        [[name, t, tokens / t, j_base / t] for name, t in jobs.items()],
    )
    print(f"\nvLLM OpenAI server start-up (process start to first answer): {results['openai_server_start_s']:.1f} s")
    results.update(tokens=tokens, response_tokens=response_tokens, scoring=table,
                   jobs={n: {"seconds": t, "tokens_per_s": tokens / t, "vs_transformers": j_base / t}
                         for n, t in jobs.items()})  # fmt: skip
    path = write_json(args.name, results, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
