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
from pydantic import Field

from lopd.arrow import list_column
from lopd.config import ARGUMENT, LopdSettings
from lopd.fingerprint import model_fingerprint
from lopd.storage.layout import StorePath
from lopd.storage.reader import Store

from .teachers import DEFAULT_BACKEND, BackendField, ScoringJob
from .teachers.base import DEFAULT_MAX_BATCH_TOKENS, MaxBatchTokens


@dataclass
class VerifyReport:
    dataset: str
    version: int
    samples: int
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    worst_sample_id: str | None  # the sample with the largest difference; None when every difference is 0
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

    def summary(self) -> str:
        """One line: the verdict, what was compared, the differences, and the worst sample when any differs."""
        worst = "all samples identical" if self.worst_sample_id is None else f"worst sample {self.worst_sample_id}"
        return (
            f"{'PASSED' if self.passed else 'FAILED'}: {self.dataset} v{self.version}, {self.samples} samples, "
            f"{self.tokens} tokens: max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} "
            f"(tolerance {self.tolerance:g}; {worst})"
        )


class VerifyConfig(LopdSettings):
    """`lopd verify`: every setting, its default and its help, declared once (flags and `LOPD_*` derive)."""

    store: StorePath = Field(description="Store directory.", json_schema_extra=ARGUMENT)
    dataset: str = Field(description="Dataset name.")
    teacher: Path = Field(description="The teacher to re-score with (model directory).")
    version: int | None = Field(None, ge=1, description="Version (default: latest).")
    samples: int = Field(64, ge=1, description="How many random samples to re-score.")
    seed: int = Field(0, description="Seed of the random sample.")
    tolerance: float = Field(1e-3, ge=0, description="Largest accepted |stored - rescored| per token.")
    backend: BackendField = Field(
        DEFAULT_BACKEND, validate_default=True, description="Teacher backend and its options."
    )
    max_batch_tokens: MaxBatchTokens = DEFAULT_MAX_BATCH_TOKENS


def verify_dataset(cfg: VerifyConfig) -> VerifyReport:
    """Re-score `cfg.samples` random samples with `cfg.teacher` at the manifest's temperature and compare."""
    store_dir, dataset, teacher, version, samples = cfg.store, cfg.dataset, cfg.teacher, cfg.version, cfg.samples
    seed, tolerance = cfg.seed, cfg.tolerance
    ds = Store(store_dir).open(dataset, version)
    n = len(ds)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(n, size=min(samples, n), replace=False))
    table = ds.take(picked, columns=["sample_id", "prompt_ids", "response_ids", "teacher_logprobs"])
    job = ScoringJob(temperature=ds.manifest.provenance.temperature, max_batch_tokens=cfg.max_batch_tokens)
    scorer = cfg.backend.load(teacher, job)
    try:
        prompts = list_column(table["prompt_ids"], np.int64).required_rows("prompt_ids")
        responses = list_column(table["response_ids"], np.int64).required_rows("response_ids")
        rescored = scorer.score(prompts, responses)
    finally:
        scorer.close()
    stored = [np.asarray(t, dtype=np.float32) for t in table["teacher_logprobs"].to_pylist()]
    diffs = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(rescored, stored)]
    per_sample_max = [float(d.max()) for d in diffs]
    worst = int(np.argmax(per_sample_max))
    all_diffs = np.concatenate(diffs)
    differs = per_sample_max[worst] != 0  # argmax of all zeros is sample 0, no worse than the others (NaN differs)
    return VerifyReport(
        dataset=ds.name,
        version=ds.version,
        samples=len(picked),
        tokens=int(all_diffs.size),
        max_abs_diff=float(all_diffs.max()),
        mean_abs_diff=float(all_diffs.mean()),
        worst_sample_id=table["sample_id"][worst].as_py() if differs else None,
        tolerance=tolerance,
        teacher_fingerprint=model_fingerprint(teacher),
        manifest_teacher_fingerprint=ds.manifest.provenance.teacher.fingerprint,
    )
