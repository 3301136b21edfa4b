"""`lopd verify`: re-score a random sample of a dataset and compare with what is stored.

A manifest says which teacher scored a dataset; this checks it. Re-scoring a few dozen samples
with the named teacher (any backend) must reproduce the stored log-probs up to numerical noise;
a store scored by another teacher, at another temperature, or silently damaged does not. The
same check tells whether two backends (say transformers on CPU and vLLM on GPU) agree.

The teacher defaults to the one the manifest records. A multi-teacher dataset (`lopd precompute
--teacher-map`) is checked route by route: a sample of each route's samples, re-scored with that
route's teacher, found at the path its route records or in `--teacher-map` (precompute's map file),
and refused unless its fingerprint is the one that scored the route.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from lopd.arrow import list_column
from lopd.config import ARGUMENT, LopdSettings
from lopd.errors import InvalidInput
from lopd.fingerprint import model_fingerprint
from lopd.storage.layout import StorePath
from lopd.storage.manifest import ModelRef, Provenance
from lopd.storage.reader import Dataset, Store

from .routing import load_teacher_map
from .teachers import DEFAULT_BACKEND, BackendField, ScoringJob
from .teachers.base import DEFAULT_MAX_BATCH_TOKENS, MaxBatchTokens


@dataclass
class RouteReport:
    """One routed teacher of a multi-teacher dataset, re-scored on a random sample of its own samples."""

    key: str
    teacher: str | None  # the model directory re-scored with; None when the route has no samples
    teacher_fingerprint: str  # equal to the route's recorded one (checked before scoring)
    samples: int
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    worst_sample_id: str | None
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def summary(self) -> str:
        worst = "all samples identical" if self.worst_sample_id is None else f"worst sample {self.worst_sample_id}"
        return (
            f"route {self.key!r}: {'PASSED' if self.passed else 'FAILED'}, {self.samples} samples, {self.tokens} "
            f"tokens: max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} (teacher {self.teacher}; "
            f"{worst})"
        )


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
    teacher_key: str | None = None  # multi-teacher datasets: the routing field; None for one teacher
    routes: list[RouteReport] = field(default_factory=list)  # multi-teacher datasets: each route, in dataset order

    @property
    def fingerprint_matches(self) -> bool:
        return self.teacher_fingerprint == self.manifest_teacher_fingerprint

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "fingerprint_matches": self.fingerprint_matches, "passed": self.passed}
        if not self.routes:  # one teacher: the report keeps its form
            del out["teacher_key"], out["routes"]
        else:
            out["routes"] = [{**asdict(r), "passed": r.passed} for r in self.routes]
        return out

    def summary(self) -> str:
        """The verdict, what was compared, the differences, and the worst sample when any differs; then each route."""
        worst = "all samples identical" if self.worst_sample_id is None else f"worst sample {self.worst_sample_id}"
        line = (
            f"{'PASSED' if self.passed else 'FAILED'}: {self.dataset} v{self.version}, {self.samples} samples, "
            f"{self.tokens} tokens: max |diff| {self.max_abs_diff:.3g}, mean {self.mean_abs_diff:.3g} "
            f"(tolerance {self.tolerance:g}; {worst})"
        )
        return "\n".join([line, *(f"  {r.summary()}" for r in self.routes)])


class VerifyConfig(LopdSettings):
    """`lopd verify`: every setting, its default and its help, declared once (flags and `LOPD_*` derive)."""

    store: StorePath = Field(description="Store directory.", json_schema_extra=ARGUMENT)
    dataset: str = Field(description="Dataset name.")
    teacher: Path | None = Field(
        None,
        description="The teacher to re-score with (model directory); default: the one the manifest records, if it "
        "is there with the recorded fingerprint. Not for multi-teacher datasets (see --teacher-map).",
    )
    teacher_map: Path | None = Field(
        None,
        description="Multi-teacher datasets: precompute's --teacher-map file, for routes whose teacher is no longer "
        "at the path the manifest records (each route's teacher must have its recorded fingerprint).",
    )
    version: int | None = Field(None, ge=1, description="Version (default: latest).")
    samples: int = Field(64, ge=1, description="How many random samples to re-score (per route, multi-teacher).")
    seed: int = Field(0, description="Seed of the random sample.")
    tolerance: float = Field(1e-3, ge=0, description="Largest accepted |stored - rescored| per token.")
    backend: BackendField = Field(
        DEFAULT_BACKEND, validate_default=True, description="Teacher backend and its options."
    )
    max_batch_tokens: MaxBatchTokens = DEFAULT_MAX_BATCH_TOKENS

    @model_validator(mode="after")
    def _check(self) -> VerifyConfig:
        if self.teacher is not None and self.teacher_map is not None:
            raise ValueError("--teacher is for one teacher, --teacher-map for a multi-teacher dataset: give one")
        return self


@dataclass
class _Compared:
    """Stored against re-scored log-probs of some samples."""

    samples: int
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    worst_sample_id: str | None
    diffs: list[np.ndarray]
    ids: list[str]

    def summary(self) -> dict[str, Any]:
        """The figures a report carries (`VerifyReport`, `RouteReport`)."""
        return {"samples": self.samples, "tokens": self.tokens, "max_abs_diff": self.max_abs_diff,
                "mean_abs_diff": self.mean_abs_diff, "worst_sample_id": self.worst_sample_id}  # fmt: skip


def _compare(diffs: list[np.ndarray], ids: list[str]) -> _Compared:
    if not diffs:
        return _Compared(0, 0, 0.0, 0.0, None, [], [])
    per_sample_max = [float(d.max()) if d.size else 0.0 for d in diffs]
    worst = int(np.argmax(per_sample_max))
    all_diffs = np.concatenate(diffs)
    differs = per_sample_max[worst] != 0  # argmax of all zeros is sample 0, no worse than the others (NaN differs)
    return _Compared(
        samples=len(diffs),
        tokens=int(all_diffs.size),
        max_abs_diff=float(all_diffs.max()) if all_diffs.size else 0.0,
        mean_abs_diff=float(all_diffs.mean()) if all_diffs.size else 0.0,
        worst_sample_id=ids[worst] if differs else None,
        diffs=diffs,
        ids=ids,
    )


def _rescore(cfg: VerifyConfig, ds: Dataset, teacher: Path, picked: np.ndarray) -> _Compared:
    """Re-score the samples at dataset indices `picked` with `teacher` at the manifest's temperature."""
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
    return _compare(diffs, table["sample_id"].to_pylist())


def _recorded_teacher(ref: ModelRef, label: str, fix: str) -> Path:
    """The model directory `ref` records, checked to be there with the recorded fingerprint."""
    path = Path(ref.name_or_path) if ref.name_or_path else None
    if path is None or not path.is_dir():
        where = "records no teacher path" if path is None else f"records {path}, which is not a model directory here"
        raise InvalidInput(f"{label}: the manifest {where}; {fix} (fingerprint {ref.fingerprint})")
    _check_fingerprint(path, ref, label, "the manifest records it", fix)
    return path


def _check_fingerprint(path: Path, ref: ModelRef, label: str, where: str, fix: str) -> None:
    fp = model_fingerprint(path)
    if fp != ref.fingerprint:
        raise InvalidInput(
            f"{label}: the teacher at {path} ({where}) has fingerprint {fp}, not {ref.fingerprint}, the model that "
            f"scored it; {fix}"
        )


def route_teachers(prov: Provenance, teacher_map: Path | None) -> dict[str, Path]:
    """Each route's teacher (routes with samples only): from `teacher_map` where it names the route's key, else the
    path the route records; `InvalidInput` naming the route when one is missing or has another fingerprint."""
    given = load_teacher_map(teacher_map) if teacher_map is not None else {}
    keys = [r.key for r in prov.routes]
    unknown = sorted(set(given) - set(keys))
    if unknown:
        raise InvalidInput(
            f"--teacher-map {teacher_map} routes {', '.join(map(repr, unknown))}, which this dataset has no route for "
            f"(its routes: {', '.join(map(repr, keys))}): is it the map of another dataset?"
        )
    out: dict[str, Path] = {}
    for route in prov.routes:
        if route.num_samples == 0:
            continue
        label = f"route {route.key!r}"
        fix = (
            f'give its teacher in --teacher-map FILE ({{"{route.key}": {{"teacher": DIR, "sft_teacher": ...}}}}, '
            "the map precompute took)"
        )
        if route.key in given:
            path = given[route.key].teacher
            if not path.is_dir():
                raise InvalidInput(
                    f"{label}: its teacher {path} (--teacher-map {teacher_map}) is not a model directory"
                )
            _check_fingerprint(path, route.teacher, label, f"--teacher-map {teacher_map}", fix)
            out[route.key] = path
        else:
            out[route.key] = _recorded_teacher(route.teacher, label, fix)
    return out


def verify_dataset(cfg: VerifyConfig) -> VerifyReport:
    """Re-score `cfg.samples` random samples (of each route, multi-teacher) with their teacher and compare."""
    ds = Store(cfg.store).open(cfg.dataset, cfg.version)
    prov = ds.manifest.provenance
    rng = np.random.default_rng(cfg.seed)
    if prov.routes:
        return _verify_routes(cfg, ds, rng)
    if cfg.teacher_map is not None:
        raise InvalidInput(
            f"{ds.name!r} v{ds.version} has one teacher: --teacher-map is for multi-teacher datasets (leave it out, or "
            "give --teacher DIR)"
        )
    teacher = cfg.teacher
    if teacher is None:
        teacher = _recorded_teacher(prov.teacher, f"{ds.name!r} v{ds.version}", "give the teacher with --teacher DIR")
    n = len(ds)
    picked = np.sort(rng.choice(n, size=min(cfg.samples, n), replace=False))
    got = _rescore(cfg, ds, teacher, picked)
    return VerifyReport(
        dataset=ds.name,
        version=ds.version,
        **got.summary(),
        tolerance=cfg.tolerance,
        teacher_fingerprint=model_fingerprint(teacher),
        manifest_teacher_fingerprint=prov.teacher.fingerprint,
    )


def _verify_routes(cfg: VerifyConfig, ds: Dataset, rng: np.random.Generator) -> VerifyReport:
    prov = ds.manifest.provenance
    if cfg.teacher is not None:
        raise InvalidInput(
            f"{ds.name!r} v{ds.version} has {len(prov.routes)} routed teachers "
            f"({', '.join(r.key for r in prov.routes)}): leave out --teacher; each route is re-scored with its own "
            "teacher, found where the manifest records it or in --teacher-map FILE"
        )
    teachers = route_teachers(prov, cfg.teacher_map)  # every route's teacher checked before any is loaded
    routes, diffs, ids = [], [], []
    for route in prov.routes:
        n = route.num_samples
        picked = route.start + np.sort(rng.choice(n, size=min(cfg.samples, n), replace=False))
        teacher = teachers.get(route.key)
        got = _rescore(cfg, ds, teacher, picked) if teacher is not None else _compare([], [])
        diffs += got.diffs
        ids += got.ids
        routes.append(
            RouteReport(
                key=route.key,
                teacher=None if teacher is None else str(teacher),
                teacher_fingerprint=route.teacher.fingerprint,
                **got.summary(),
                tolerance=cfg.tolerance,
            )
        )
    total = _compare(diffs, ids)
    return VerifyReport(
        dataset=ds.name,
        version=ds.version,
        **total.summary(),
        tolerance=cfg.tolerance,
        # Each route's teacher has its recorded fingerprint (refused otherwise): the routes' digest is the manifest's.
        teacher_fingerprint=prov.teacher.fingerprint,
        manifest_teacher_fingerprint=prov.teacher.fingerprint,
        teacher_key=prov.teacher_key,
        routes=routes,
    )
