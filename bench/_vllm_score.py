"""Helper of `bench_vllm_cpu.py`, run by the vLLM environment's interpreter: time `VLLMTeacher.score()`.

    .venv-vllm/bin/python bench/_vllm_score.py SPEC.json RESULT.json

SPEC: {"model", "rollouts" (a JSONL of prompt_ids/response_ids), "options", "repeats"}. Loads the teacher
once (timed), scores every record once to warm up, then `repeats` times (timed). vLLM spawns its engine
process, hence the `__main__` guard.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from lopd.server.teachers.vllm_backend import VLLMTeacher

    records = [json.loads(line) for line in Path(spec["rollouts"]).read_text().splitlines()]
    prompts = [r["prompt_ids"] for r in records]
    responses = [r["response_ids"] for r in records]
    start = time.perf_counter()
    teacher = VLLMTeacher(spec["model"], **spec["options"])
    load_s = time.perf_counter() - start
    try:
        warm = teacher.score(prompts, responses)
        times = []
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            teacher.score(prompts, responses)
            times.append(time.perf_counter() - start)
        result = {
            "load_s": load_s,
            "times_s": times,
            "logprobs_head": [w[:8].tolist() for w in warm[:4]],
            "max_batch_tokens": teacher.max_batch_tokens,
        }
    finally:
        teacher.close()
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
