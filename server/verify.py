"""`lopd verify`: re-score a random sample of a dataset and compare with what is stored.

A manifest says which teacher scored a dataset; this checks it. Re-scoring a few dozen samples
with the named teacher (any backend) must reproduce the stored log-probs up to numerical noise;
a store scored by another teacher, at another temperature, or silently damaged does not. The
same check tells whether two backends (say transformers on CPU and vLLM on GPU) agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lopd.fingerprint import model_fingerprint
from lopd.storage.reader import Store


@dataclass
class VerifyReport:
    dataset: str
    version: int
    samples: int
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    worst_sample_id: str
    tolerance: float
    teacher_fingerprint: str
    manifest_teacher_fingerprint: str

    @property
    def fingerprint_matches(self) -> bool:
        return self.teacher_fingerprint == self.manifest_teacher_fingerprint

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fingerprint_matches": self.fingerprint_matches, "passed": self.passed}


def verify_dataset(
    store_dir: Path,
    dataset: str,
    teacher: Path,
    *,
    version: int | None = None,
    samples: int = 64,
    seed: int = 0,
    tolerance: float = 1e-3,
    backend: str = "transformers",
    device: str | None = None,
    dtype: str | None = None,
    max_batch_tokens: int = 16384,
    teacher_url: str | None = None,
    max_concurrency: int | None = None,
    served_model_name: str | None = None,
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int | None = None,
) -> VerifyReport:
    """Re-score `samples` random samples with `teacher` at the manifest's temperature and compare.

    `device` and `dtype` default to the backend's own; `teacher_url` (and `max_concurrency`,
    `served_model_name`) are for the server-backed backends, the last two options for vllm.
    """
    from .teachers import BackendOptions

    options = BackendOptions(
        backend=backend,
        device=device,
        dtype=dtype,
        teacher_url=teacher_url,
        max_concurrency=max_concurrency,
        served_model_name=served_model_name,
        gpu_memory_utilization=gpu_memory_utilization,
        tensor_parallel_size=tensor_parallel_size,
    ).resolved()
    ds = Store(store_dir).open(dataset, version)
    n = len(ds)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(samples, n), replace=False))
    table = ds.take(picked, columns=["sample_id", "prompt_ids", "response_ids", "teacher_logprobs"])
    scorer = options.load(teacher, temperature=ds.manifest.provenance.temperature, max_batch_tokens=max_batch_tokens)
    try:
        prompts = [np.asarray(p, dtype=np.int64) for p in table["prompt_ids"].to_pylist()]
        responses = [np.asarray(r, dtype=np.int64) for r in table["response_ids"].to_pylist()]
        rescored = scorer.score(prompts, responses)
    finally:
        scorer.close()
    stored = [np.asarray(t, dtype=np.float32) for t in table["teacher_logprobs"].to_pylist()]
    diffs = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(rescored, stored)]
    per_sample_max = [float(d.max()) for d in diffs]
    worst = int(np.argmax(per_sample_max))
    all_diffs = np.concatenate(diffs)
    return VerifyReport(
        dataset=ds.name,
        version=ds.version,
        samples=len(picked),
        tokens=int(all_diffs.size),
        max_abs_diff=float(all_diffs.max()),
        mean_abs_diff=float(all_diffs.mean()),
        worst_sample_id=table["sample_id"][worst].as_py(),
        tolerance=tolerance,
        teacher_fingerprint=model_fingerprint(teacher),
        manifest_teacher_fingerprint=ds.manifest.provenance.teacher.fingerprint,
    )
