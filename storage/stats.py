"""Coverage and consistency statistics of a dataset, computed by DuckDB over the Parquet shards.

Coverage answers "what is in here": samples scored and skipped (and why), token counts, length
distribution, shards, bytes, and the progress of runs still writing. Consistency answers "can I
train on this": the fingerprints and whether they match, the distribution of teacher
log-probs, and, when the sampling policy's log-probs are stored, the mean per-token
`rollout_logprob - teacher_logprob`, a Monte Carlo estimate of KL(rollout policy || teacher) on
the rollouts. Under teacher consistency the SFT student imitates the teacher, so this is small;
a teacher that did not produce the SFT data makes it grow.

DuckDB runs in-memory and only reads the immutable published files, so stats never contend
with a writer for a lock. Over object storage it reads the shards through its httpfs extension,
loaded from the `duckdb-extension-httpfs` package's file (never downloaded at run time).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from . import layout
from .fs import ObjectPath, StoreDir, duckdb_s3_settings
from .manifest import Manifest, Route, verdict_explanation
from .publish import published_versions
from .reader import Store
from .schema import TOKEN_COLUMNS
from .staging import Staging, list_staging_plans, missing_parts

if TYPE_CHECKING:
    import duckdb

UNLIKELY_LOGPROB = math.log(1e-4)  # tokens the teacher finds very unlikely
_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)
_HIST_FLOOR = -20  # histogram bins are [k, k+1) for k in -20..-1; lower values fall in the first bin


class Distribution(BaseModel):
    count: int
    mean: float | None
    min: float | None
    max: float | None
    quantiles: dict[str, float | None]


class RunProgress(BaseModel):
    run_key: str
    parts_done: int
    parts_total: int
    samples_done: int
    samples_total: int


class ScoringSettings(BaseModel):
    settings: dict[str, int | float | str | bool | None] = Field(
        description="What the parts were scored with (batch budgets); empty when not recorded (an import)."
    )
    parts: list[int] = Field(description="Indices of the parts (shards, in order) scored with these settings.")


class CoverageStats(BaseModel):
    dataset: str
    version: int | None
    input_records: int
    scored: int
    skipped: int
    skipped_by_reason: dict[str, int]
    num_prompt_tokens: int
    num_response_tokens: int
    response_length: Distribution | None
    prompt_length: Distribution | None
    shards: int
    bytes: int
    bytes_per_response_token: float | None
    in_progress: list[RunProgress]
    scored_with: list[ScoringSettings] = Field(
        default_factory=list,
        description="Scoring settings and the parts scored with each; several entries when a run was resumed "
        "with other batch budgets (those parts may differ within float rounding).",
    )


class HistogramBin(BaseModel):
    lo: float
    hi: float
    count: int


class RolloutVsTeacher(BaseModel):
    tokens: int
    mean_rollout_logprob: float
    mean_teacher_logprob: float
    kl_rollout_teacher_estimate: float


class TeacherStats(BaseModel):
    """One routed teacher of a multi-teacher dataset: its verdict and its samples' teacher log-probs."""

    key: str = Field(description="The routing key (`provenance.teacher_key`'s value) of this teacher's samples.")
    verdict: Literal["consistent", "inconsistent"]
    teacher_fingerprint: str
    sft_teacher_fingerprint: str
    samples: int
    tokens: int
    mean_teacher_logprob: float | None
    share_below_log_1e_4: float | None
    rollout_vs_teacher: RolloutVsTeacher | None


class ConsistencyStats(BaseModel):
    dataset: str
    version: int
    verdict: Literal["consistent", "inconsistent"]
    explanation: str = Field(description="Why the verdict, and for an inconsistent version what would fix it.")
    provenance_known: bool = Field(description="False when the scoring or SFT-data teacher is unknown (an import).")
    teacher_consistent: bool
    mismatch_allowed: bool
    teacher_fingerprint: str
    sft_teacher_fingerprint: str
    tokenizer_fingerprint: str
    rollout_tokenizer_fingerprint: str | None
    rollout_tokenizer_checked: bool
    rollout_policy_fingerprint: str | None
    temperature: float
    teacher_logprobs: Distribution
    teacher_logprob_histogram: list[HistogramBin]
    share_below_log_1e_4: float | None
    rollout_vs_teacher: RolloutVsTeacher | None
    per_teacher: list[TeacherStats] = Field(
        default_factory=list,
        description="Multi-teacher datasets: each routed teacher on its own (absent for one teacher).",
        exclude_if=lambda v: not v,
    )


def _connect(store: StoreDir) -> duckdb.DuckDBPyConnection:
    try:
        import duckdb
    except ImportError as e:  # the models above are importable without it; queries are not
        raise ImportError("dataset stats need DuckDB: pip install 'lightning-opd[store]'") from e
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if isinstance(store, ObjectPath):
        con.execute(f"LOAD '{_httpfs_extension(duckdb.__version__)}'")
        settings = ", ".join(f"{k} '{v}'" for k, v in duckdb_s3_settings(store).items())
        con.execute(f"CREATE SECRET lopd_store (TYPE s3, {settings})")
    return con


def _httpfs_extension(duckdb_version: str) -> str:
    """The httpfs extension file shipped by `duckdb-extension-httpfs` for this DuckDB (which it pins)."""
    try:
        import duckdb_extension_httpfs
    except ImportError as e:
        raise ImportError("stats over object storage need DuckDB's httpfs: pip install 'lightning-opd[s3]'") from e
    root = Path(duckdb_extension_httpfs.__file__).parent / "extensions"
    path = root / f"v{duckdb_version}" / "httpfs.duckdb_extension"
    if not path.is_file():
        found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
        raise ImportError(
            f"duckdb-extension-httpfs has no build for DuckDB {duckdb_version} (it has {found}): install the DuckDB "
            "version it pins: pip install 'lightning-opd[s3]'"
        )
    return str(path).replace("'", "''")


def _distribution(con: duckdb.DuckDBPyConnection, expr_sql: str, params: list[object]) -> Distribution:
    qs = ", ".join(f"quantile_cont(x, {q})" for q in _QUANTILES)
    row = con.execute(f"SELECT count(x), avg(x), min(x), max(x), {qs} FROM ({expr_sql})", params).fetchone()
    assert row is not None  # an aggregate always returns one row
    count, mean, lo, hi, *qv = row
    return Distribution(
        count=int(count),
        mean=None if mean is None else float(mean),
        min=None if lo is None else float(lo),
        max=None if hi is None else float(hi),
        quantiles={f"p{round(q * 100)}": (None if v is None else float(v)) for q, v in zip(_QUANTILES, qv)},
    )


def progress(store: StoreDir, name: str) -> list[RunProgress]:
    """How far each unfinished run of `name` is (parts that exist in its staging directory)."""
    out = []
    for _, plan in list_staging_plans(store, name):
        missing = set(missing_parts(Staging(store, name, plan.run_key), plan))
        done = [p for p in plan.parts if p.index not in missing]
        out.append(
            RunProgress(
                run_key=plan.run_key,
                parts_done=len(done),
                parts_total=len(plan.parts),
                samples_done=sum(p.num_samples for p in done),
                samples_total=plan.num_samples,
            )
        )
    return out


def coverage(store_root: str | Path | StoreDir, name: str, version: int | None = None) -> CoverageStats:
    store = Store(store_root)
    exists = layout.dataset_dir(store.root, name).is_dir()
    running = progress(store.root, name) if exists else []
    if not (exists and published_versions(store.root, name)):
        if running:  # nothing published yet, but a run is writing: report its progress
            return CoverageStats(
                dataset=name, version=None, input_records=0, scored=0, skipped=0, skipped_by_reason={},
                num_prompt_tokens=0, num_response_tokens=0, response_length=None, prompt_length=None,
                shards=0, bytes=0, bytes_per_response_token=None, in_progress=running,
            )  # fmt: skip
        store.versions(name)  # raises NotFound with the catalogue in the message
    ds = store.open(name, version, verify=False)
    m = ds.manifest
    files = [str(p) for p in ds.shard_paths()]
    con = _connect(store.root)
    src = "SELECT len({col}) AS x FROM read_parquet(?)"  # a sample's tokens, as `schema.token_lengths` counts them
    prompt_col, response_col = TOKEN_COLUMNS
    resp = _distribution(con, src.format(col=response_col), [files]) if files else None
    prompt = _distribution(con, src.format(col=prompt_col), [files]) if files else None
    total_bytes = sum(f.bytes for f in m.files)
    return CoverageStats(
        dataset=name,
        version=m.version,
        input_records=m.coverage.input_records,
        scored=m.coverage.scored,
        skipped=m.coverage.skipped,
        skipped_by_reason=m.coverage.skipped_by_reason,
        num_prompt_tokens=m.num_prompt_tokens,
        num_response_tokens=m.num_response_tokens,
        response_length=resp,
        prompt_length=prompt,
        shards=len(m.files),
        bytes=total_bytes,
        bytes_per_response_token=(total_bytes / m.num_response_tokens) if m.num_response_tokens else None,
        in_progress=running,
        scored_with=_scored_with(ds.scored_with()),
    )


def _scored_with(per_part: list[dict[str, object]]) -> list[ScoringSettings]:
    groups: dict[str, ScoringSettings] = {}
    for index, settings in enumerate(per_part):
        key = repr(sorted(settings.items()))
        if key not in groups:
            groups[key] = ScoringSettings.model_validate({"settings": settings, "parts": []})
        groups[key].parts.append(index)
    return list(groups.values())


def consistency(store_root: str | Path | StoreDir, name: str, version: int | None = None) -> ConsistencyStats:
    store = Store(store_root)
    ds = store.open(name, version, verify=False)
    m, prov = ds.manifest, ds.manifest.provenance
    files = [str(p) for p in ds.shard_paths()]
    con = _connect(store.root)
    tokens_sql = "SELECT unnest(teacher_logprobs) AS x FROM read_parquet(?)"
    dist = _distribution(con, tokens_sql, [files])
    hist_rows = con.execute(
        f"SELECT greatest(floor(x), {_HIST_FLOOR}) AS b, count(*) FROM ({tokens_sql}) GROUP BY b ORDER BY b", [files]
    ).fetchall()
    hist = [HistogramBin(lo=float(b), hi=float(b) + 1, count=int(c)) for b, c in hist_rows]
    below_row = con.execute(f"SELECT avg((x < {UNLIKELY_LOGPROB})::DOUBLE) FROM ({tokens_sql})", [files]).fetchone()
    below = below_row[0] if below_row else None
    rvt_row = con.execute(
        "SELECT sum(len(rollout_logprobs)), sum(list_sum(rollout_logprobs)), sum(list_sum(teacher_logprobs)) "
        "FROM read_parquet(?) WHERE rollout_logprobs IS NOT NULL",
        [files],
    ).fetchone()
    rvt = None
    if rvt_row and rvt_row[0]:
        n, sr, st = int(rvt_row[0]), float(rvt_row[1]), float(rvt_row[2])
        rvt = RolloutVsTeacher(
            tokens=n,
            mean_rollout_logprob=sr / n,
            mean_teacher_logprob=st / n,
            kl_rollout_teacher_estimate=(sr - st) / n,
        )
    c = prov.consistency
    return ConsistencyStats(
        dataset=name,
        version=m.version,
        verdict=c.verdict,
        explanation=verdict_explanation(prov),
        provenance_known=prov.provenance_known,
        teacher_consistent=c.teacher_consistent,
        mismatch_allowed=c.mismatch_allowed,
        teacher_fingerprint=prov.teacher.fingerprint,
        sft_teacher_fingerprint=prov.sft_teacher_fingerprint,
        tokenizer_fingerprint=prov.tokenizer_fingerprint,
        rollout_tokenizer_fingerprint=prov.rollout_tokenizer_fingerprint,
        rollout_tokenizer_checked=c.rollout_tokenizer_checked,
        rollout_policy_fingerprint=prov.rollout_policy.fingerprint if prov.rollout_policy else None,
        temperature=prov.temperature,
        teacher_logprobs=dist,
        teacher_logprob_histogram=hist,
        share_below_log_1e_4=None if below is None else float(below),
        rollout_vs_teacher=rvt,
        per_teacher=[_teacher_stats(con, ds.manifest, files, r) for r in prov.routes],
    )


def _teacher_stats(con: duckdb.DuckDBPyConnection, m: Manifest, files: list[str], route: Route) -> TeacherStats:
    """`route`'s samples (dataset indices start .. start + num_samples - 1) read from the shards that hold them."""
    end = route.start + route.num_samples
    selects, params = [], []
    for path, f in zip(files, m.files):
        lo, hi = max(route.start, f.first_index), min(end, f.first_index + f.num_samples)
        if lo < hi:
            selects.append(
                "SELECT teacher_logprobs, rollout_logprobs FROM read_parquet(?, file_row_number=true) "
                "WHERE file_row_number >= ? AND file_row_number < ?"
            )
            params += [path, lo - f.first_index, hi - f.first_index]
    rows = (
        " UNION ALL ".join(selects)
        or "SELECT NULL::FLOAT[] AS teacher_logprobs, NULL::FLOAT[] AS rollout_logprobs LIMIT 0"
    )
    n, tokens, total, rn, sr, st = con.execute(
        "SELECT count(*), sum(len(teacher_logprobs)), sum(list_sum(teacher_logprobs)), "
        "sum(len(rollout_logprobs)), sum(list_sum(rollout_logprobs)), "
        f"sum(CASE WHEN rollout_logprobs IS NOT NULL THEN list_sum(teacher_logprobs) END) FROM ({rows})",
        params,
    ).fetchone() or (0, 0, None, None, None, None)
    below = con.execute(
        f"SELECT avg((x < {UNLIKELY_LOGPROB})::DOUBLE) FROM (SELECT unnest(teacher_logprobs) AS x FROM ({rows}))",
        params,
    ).fetchone()
    rvt = None
    if rn:
        rvt = RolloutVsTeacher(
            tokens=int(rn), mean_rollout_logprob=float(sr) / rn, mean_teacher_logprob=float(st) / rn,
            kl_rollout_teacher_estimate=(float(sr) - float(st)) / rn,
        )  # fmt: skip
    return TeacherStats(
        key=route.key,
        verdict=route.consistency.verdict,
        teacher_fingerprint=route.teacher.fingerprint,
        sft_teacher_fingerprint=route.sft_teacher_fingerprint,
        samples=int(n),
        tokens=int(tokens or 0),
        mean_teacher_logprob=float(total) / tokens if tokens else None,
        share_below_log_1e_4=None if not below or below[0] is None else float(below[0]),
        rollout_vs_teacher=rvt,
    )
