"""Runs the vllm teacher backend on a real engine, inside the vLLM environment (see `tests/utils/vllm_env.py`).

    .venv-vllm/bin/python tests/utils/vllm_worker.py SPEC.json RESULT.json

SPEC: {"jobs": [{"name", "model", "options", "prompts", "responses", "chunk_tokens"?, "topk"?}]}. For each job
it loads `VLLMTeacher(model, **options)`, scores the records (with `score_topk` too when the options have a
`top_k`), checks what must be refused, and (with "topk") asks the same engine for `prompt_logprobs=K` to
record what vLLM returns. The tests compare everything with
the naive reference in the project's environment; this script only reports (no pytest here). vLLM spawns
its engine process, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _error(fn: Any) -> str | None:
    try:
        fn()
    except Exception as e:  # the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def _entries(position: Any) -> dict[str, list[Any]] | None:
    if position is None:
        return None
    return {str(tok): [lp.logprob, lp.rank] for tok, lp in position.items()}


def _topk(teacher: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """What `prompt_logprobs=K` returns on this engine, for the records in `spec` (prompt + response as one prompt)."""
    import numpy as np
    import vllm

    llm = teacher.llm
    prompts = [{"prompt_token_ids": p + r} for p, r in spec["records"]]
    out: dict[str, Any] = {"by_k": {}, "errors": {}}

    def params(**kw: Any) -> Any:
        return vllm.SamplingParams(max_tokens=1, detokenize=False, **kw)

    for k in spec["ks"]:
        results = llm.generate(prompts, sampling_params=params(prompt_logprobs=k), use_tqdm=False)
        out["by_k"][str(k)] = [[_entries(pos) for pos in r.prompt_logprobs] for r in results]
    k = spec["ks"][-1]
    flat = llm.generate(prompts, sampling_params=params(prompt_logprobs=k, flat_logprobs=True), use_tqdm=False)
    out["flat_type"] = type(flat[0].prompt_logprobs).__name__
    out["flat"] = [
        [_entries(flat[i].prompt_logprobs[t]) for t in range(len(flat[i].prompt_logprobs))] for i in range(len(flat))
    ]
    for bad in spec.get("bad_ks", []):
        out["errors"][str(bad)] = _error(lambda b=bad: llm.generate(prompts[:1], params(prompt_logprobs=b)))
    out["max_logprobs"] = getattr(llm.llm_engine.model_config, "max_logprobs", None)
    # This release also has `prompt_logprob_token_ids` (ids to score per row) from `prompt_logprob_start` (the
    # first row): here, the response rows only, each with its own token. Recorded whether it works here.
    p, r = spec["records"][0]
    sp = params(prompt_logprob_token_ids=np.asarray([[t] for t in r], np.int64), prompt_logprob_start=len(p) - 1)
    rows: list[Any] = []
    prompt = {"prompt_token_ids": p + r}
    out["token_id_rows_error"] = _error(
        lambda: rows.extend(_entries(pos) for pos in llm.generate([prompt], sp, use_tqdm=False)[0].prompt_logprobs)
    )
    out["token_id_rows"] = rows
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import lopd.server.teachers.vllm_backend as vb
    from lopd.server.teachers.vllm_backend import VLLMTeacher

    result: dict[str, Any] = {"name": job["name"]}
    # Refused before vLLM loads anything: the temperature.
    result["refused_temperature"] = _error(lambda: VLLMTeacher(job["model"], temperature=0.7, **job["options"]))
    start = time.perf_counter()
    teacher = VLLMTeacher(job["model"], **job["options"])
    result["load_s"] = time.perf_counter() - start
    try:
        info = teacher.info
        result["info"] = {k: getattr(info, k) for k in info.__dataclass_fields__}
        result["max_batch_tokens"] = teacher.max_batch_tokens
        try:  # what the engine was started with
            config = teacher.llm.llm_engine.vllm_config
            result["engine"] = {
                "kv_cache_memory_bytes": config.cache_config.kv_cache_memory_bytes,
                "enforce_eager": config.model_config.enforce_eager,
                "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
                "logprobs_mode": str(config.model_config.logprobs_mode),
            }
        except AttributeError as e:
            result["engine"] = {"error": repr(e)}
        if job.get("chunk_tokens"):
            vb.GENERATE_CHUNK_TOKENS = int(job["chunk_tokens"])  # several LLM.generate calls per score()
        start = time.perf_counter()
        got = teacher.score(job["prompts"], job["responses"])
        result["score_s"] = time.perf_counter() - start
        result["logprobs"] = [g.tolist() for g in got]
        result["dtypes"] = sorted({str(g.dtype) for g in got})
        if job["options"].get("top_k"):
            start = time.perf_counter()
            scored = teacher.score_topk(job["prompts"], job["responses"])
            result["score_topk_s"] = time.perf_counter() - start
            result["scored_topk"] = [
                {"logprobs": s.logprobs.tolist(), "ids": s.ids.tolist(), "topk": s.topk_logprobs.tolist(),
                 "dtypes": [str(s.ids.dtype), str(s.topk_logprobs.dtype)]}
                for s in scored
            ]  # fmt: skip
            result["max_logprobs"] = getattr(teacher.llm.llm_engine.model_config, "max_logprobs", None)
        result["empty"] = teacher.score([], [])
        limit = teacher.info.max_context
        result["refused"] = {
            "too_long": _error(lambda: teacher.score([[5] * (limit - 10)], [[6] * 10])),
            "id_outside": _error(lambda: teacher.score([[1], [1]], [[2], [int(job["id_limit"])]])),
            "empty_prompt": _error(lambda: teacher.score([[]], [[2]])),
        }
        # The longest record the engine accepts: the context minus the one token it generates.
        longest = teacher.score([[5] * (limit - 11)], [[6] * 10])
        result["longest_ok"] = len(longest[0]) == 10 and bool((longest[0] <= 0).all())
        if job.get("topk"):
            result["topk"] = _topk(teacher, job["topk"])
    finally:
        teacher.close()
    teacher.close()  # idempotent
    result["after_close"] = _error(lambda: teacher.score([[1]], [[2]]))
    return result


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    results = [run_job(job) for job in spec["jobs"]]
    Path(sys.argv[2]).write_text(json.dumps({"jobs": results}))


if __name__ == "__main__":
    main()
