"""The precompute job: score SFT-policy rollouts once with the teacher, into the store.

Read top to bottom it is the pipeline: check teacher consistency (before any weights are
loaded), scan and validate the rollouts, fix a plan of parts, score this worker's missing parts,
and publish when every part exists. Everything that can be refused is refused before anything is
written. Workers (`num_shards`, `shard_index`) split the same plan, so any number of them, killed
and restarted in any way, produce the same dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm

import lopd
from lopd.config import ARGUMENT, LopdSettings
from lopd.errors import BadRecords, InvalidInput, TeacherMismatch, TeacherServerError, TokenizerMismatch
from lopd.fingerprint import (
    is_fingerprint,
    model_fingerprint,
    resolve_model_fingerprint,
    short_fingerprint,
    tokenizer_fingerprint,
)
from lopd.storage import layout
from lopd.storage.faults import store_fault
from lopd.storage.fs import StoreDir
from lopd.storage.layout import StorePath
from lopd.storage.manifest import Consistency, Manifest, ModelRef, Provenance, RolloutSource, Route, Sampling
from lopd.storage.publish import find_published_run
from lopd.storage.schema import FORMAT_VERSION, build_table
from lopd.storage.staging import RunPlan
from lopd.storage.writer import RunWriter

from .cluster import default_num_workers, default_worker_index
from .rollouts import RolloutScan, expand_rollout_paths, load_rollouts, scan_rollouts
from .routing import TeacherRoute, load_teacher_map, route_of_rows, route_records
from .sample import sampling_of_inputs
from .teachers import DEFAULT_BACKEND, BackendField, ScoringJob
from .teachers.base import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_TEMPERATURE,
    MaxBatchSize,
    MaxBatchTokens,
    Temperature,
    TopK,
    config_context_length,
)

log = logging.getLogger(__name__)

CONSISTENCY_HELP = (
    "Lightning OPD is only unbiased under teacher consistency: the teacher that scores the rollouts must be "
    "the model that generated the student's SFT data. With another teacher the policy gradient carries an "
    "irreducible bias and training converges to a worse point (Lightning OPD, arXiv 2604.13010, Sec. 3)."
)


class PrecomputeConfig(LopdSettings):
    """`lopd precompute`: every setting, its default and its help, declared once (flags and `LOPD_*` derive)."""

    rollouts: list[Path] = Field(
        description="Rollout files (JSONL, JSONL.gz, Parquet) or directories.", json_schema_extra=ARGUMENT
    )
    teacher: Path | None = Field(
        None, description="Teacher model directory (Hugging Face format); required unless --teacher-map is given."
    )
    sft_teacher: str | None = Field(
        None,
        description="The model (directory or fingerprint) that generated the student's SFT data; required unless "
        "--teacher-map is given.",
    )
    teacher_map: Path | None = Field(
        None,
        description="Multi-teacher dataset: a JSON (or .yaml) file mapping each routing key to its teacher and "
        'SFT-data teacher, {"math": {"teacher": DIR, "sft_teacher": DIR_OR_FINGERPRINT}, ...}, instead of '
        "--teacher/--sft-teacher. Each record is scored by the teacher of its --teacher-key.",
    )
    teacher_key: str = Field(
        "data_source", description="With --teacher-map: the rollout record field whose value chooses the teacher."
    )
    store: StorePath = Field(description="Store directory (created if missing).")
    dataset: str = Field(description="Dataset name inside the store.")
    backend: BackendField = Field(
        DEFAULT_BACKEND, validate_default=True, description="Teacher backend and its options."
    )
    temperature: Temperature = DEFAULT_TEMPERATURE
    top_k: TopK = 0
    allow_teacher_mismatch: bool = Field(
        False, description="Build even if the teacher is not the SFT-data teacher (marked inconsistent)."
    )
    rollout_policy: Path | None = Field(
        None, description="The sampling policy: computes rollout_logprobs where records lack them."
    )
    rollout_tokenizer: str | None = Field(
        None,
        description="Tokenizer (directory or fingerprint) the rollouts were sampled with "
        "(default: the one `lopd sample` recorded in its output).",
    )
    rollout_temperature: float | None = Field(
        None,
        gt=0,
        description="Sampling temperature of the rollout policy (default: the one `lopd sample` recorded, else 1).",
    )
    num_workers: int = Field(
        default_factory=default_num_workers,
        ge=1,
        description="Number of workers splitting the job (each runs this command); default: the Slurm array's "
        "size (SLURM_ARRAY_TASK_COUNT), else 1.",
    )
    worker_index: int = Field(
        default_factory=default_worker_index,
        ge=0,
        description="This worker's index, 0..num_workers-1; default: the Slurm array task's (SLURM_ARRAY_TASK_ID) or "
        "the Kubernetes Indexed Job pod's (JOB_COMPLETION_INDEX), else 0.",
    )
    on_bad_record: Literal["stop", "skip"] = Field(
        "stop", description="stop: refuse and write nothing; skip: leave bad records out."
    )
    samples_per_part: int = Field(1024, ge=1, description="Samples per part file (the unit of resumption).")
    max_batch_tokens: MaxBatchTokens = DEFAULT_MAX_BATCH_TOKENS
    max_batch_size: MaxBatchSize = DEFAULT_MAX_BATCH_SIZE
    publish: bool = Field(
        True, description="Publish when every part exists (--no-publish: leave it to `lopd finalize`)."
    )
    progress: bool = Field(True, description="Show progress bars.")

    @model_validator(mode="after")
    def _check(self) -> PrecomputeConfig:
        layout.validate_name(self.dataset)
        if self.teacher_map is None and (self.teacher is None or self.sft_teacher is None):
            raise ValueError(
                "--teacher and --sft-teacher are required (or --teacher-map FILE for a multi-teacher dataset)"
            )
        if self.teacher_map is not None and (self.teacher is not None or self.sft_teacher is not None):
            raise ValueError(
                "--teacher-map names every teacher and SFT-data teacher: leave out --teacher and --sft-teacher"
            )
        if self.teacher_map is not None and self.backend.uses_server:
            # One --teacher-url serves one model: every route would be scored by it, whatever the map says.
            raise ValueError(
                f"--teacher-map with --backend {self.backend.name}: a server backend has one --teacher-url, so every "
                "route would be scored by the same served model. Use an in-process backend (transformers, vllm), or "
                "run one precompute per route into separate datasets"
            )
        if self.top_k and not self.backend.supports_top_k:
            raise ValueError(
                f"--top-k: the {self.backend.name} backend does not store the teacher's top-k yet; use --backend "
                "transformers (see the README for each engine's limits)"
            )
        if self.worker_index >= self.num_workers:
            hint = (
                " (in a Kubernetes Indexed Job set LOPD_NUM_WORKERS to the Job's completions)"
                if os.environ.get("JOB_COMPLETION_INDEX")
                else ""
            )
            raise ValueError(f"--worker-index must be in 0..{self.num_workers - 1} (got {self.worker_index}){hint}")
        return self

    def job(self, temperature: float | None = None, top_k: int | None = None) -> ScoringJob:
        """What every teacher this run loads is asked: the temperature, the top K and the batch budgets."""
        return ScoringJob(
            temperature=self.temperature if temperature is None else temperature,
            max_batch_tokens=self.max_batch_tokens,
            max_batch_size=self.max_batch_size,
            top_k=self.top_k if top_k is None else top_k,
        )


@dataclass
class PrecomputeResult:
    status: Literal["published", "already_published", "waiting_for_workers"]
    dataset: str
    run_key: str
    manifest: Manifest | None = None
    parts_scored: int = 0
    parts_missing: list[int] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def run_precompute(cfg: PrecomputeConfig) -> PrecomputeResult:
    routes = _routes(cfg)
    _check_model_dirs(cfg, routes)
    notices: list[str] = []

    # 1. Teacher consistency and tokenizer agreement, from files only: refuse before loading weights. With a
    # teacher map, each routed teacher against its own domain's SFT-data teacher.
    fps = {key: (model_fingerprint(r.teacher), resolve_model_fingerprint(r.sft_teacher)) for key, r in routes.items()}
    for key, r in routes.items():
        teacher_fp, sft_fp = fps[key]
        if teacher_fp != sft_fp and not cfg.allow_teacher_mismatch:
            which = "" if key is None else f"routed teacher {key!r}: "
            raise TeacherMismatch(
                f"{which}refusing to score with teacher {r.teacher} ({short_fingerprint(teacher_fp)}): the student's "
                f"SFT data came from {r.sft_teacher} ({short_fingerprint(sft_fp)}). {CONSISTENCY_HELP} Score with the "
                "SFT-data teacher, or pass --allow-teacher-mismatch to build a dataset marked inconsistent."
            )
    consistent = all(t == s_ for t, s_ in fps.values())
    if not consistent:
        notices.append("teacher mismatch allowed: the dataset is marked INCONSISTENT in its manifest")
    first = next(iter(routes.values())).teacher
    sampling = sampling_of_inputs(cfg.rollouts)
    rollout_temperature = _rollout_temperature(cfg, sampling)
    tokenizer = _load_tokenizer(first)
    tok_fp = tokenizer_fingerprint(tokenizer)
    for key, r in routes.items():
        if key is not None and tokenizer_fingerprint(str(r.teacher)) != tok_fp:
            raise TokenizerMismatch(
                f"routed teacher {key!r} ({r.teacher}) has another tokenizer than {first}: one dataset holds one "
                "vocabulary, the student's. Route only teachers that share the student's tokenizer."
            )
    rollout_tok_fp = _rollout_tokenizer_fingerprint(cfg, sampling)
    if rollout_tok_fp is not None and rollout_tok_fp != tok_fp:
        raise TokenizerMismatch(
            f"the rollouts' tokenizer ({short_fingerprint(rollout_tok_fp)}) differs from the teacher's "
            f"({short_fingerprint(tok_fp)}): the same token id would mean different tokens, so the teacher's "
            "log-probs would score other text than the student sampled. Use a teacher with the student's tokenizer."
        )
    if rollout_tok_fp is None:
        notices.append(
            "the rollouts' tokenizer was not declared (--rollout-tokenizer or --rollout-policy): assumed to be "
            "the teacher's; the manifest records it as unchecked"
        )

    # 2. Scan and validate every record before writing anything (against the shortest routed teacher's context).
    max_context = min(_max_context(r.teacher) for r in routes.values())
    if cfg.backend.generates_token:
        max_context -= 1  # the engine generates one token after the record (see teachers/__init__.py)
    scan = scan_rollouts(
        expand_rollout_paths(cfg.rollouts),
        tokenizer,
        vocab_size=len(tokenizer),
        max_context=max_context,
        progress=cfg.progress,
    )
    if scan.problems and cfg.on_bad_record == "stop":
        raise BadRecords(scan.problems, scan.total)
    if not scan.records:
        raise InvalidInput(f"no valid rollout records in {', '.join(map(str, cfg.rollouts))}")
    ranges: dict[str | None, tuple[int, int]] = {None: (0, len(scan.records))}
    if cfg.teacher_map is not None:  # order the records by route: each route one run of dataset indices
        routed = route_records(
            scan, cfg.teacher_key, {k: r for k, r in routes.items() if k is not None}, cfg.teacher_map
        )
        scan, ranges = routed.scan, routed.ranges
    if scan.problems:
        notices.append(f"skipped {len(scan.problems)} of {scan.total} records (listed in the dataset's coverage)")
    if scan.retokenized:
        notices.append(
            f"{scan.retokenized} records were given as text and tokenized here: re-tokenized text may differ "
            "from the token ids the policy actually sampled; prefer prompt_ids/response_ids"
        )

    if (
        cfg.backend.uses_server
        and cfg.rollout_policy is not None
        and not all(r.has_rollout_logprobs for r in scan.records)
    ):
        raise InvalidInput(
            f"--backend {cfg.backend.name} scores with the teacher's server only, so it cannot compute rollout "
            "log-probs with --rollout-policy: include rollout_logprobs in the records, declare the tokenizer with "
            "--rollout-tokenizer instead, or use an in-process backend"
        )

    # 3. The plan: a function of the inputs and settings only.
    single = routes.get(None)
    if single is not None:
        teacher_fp, sft_fp = fps[None]
        teacher_ref, sft_source = _model_ref(single.teacher, teacher_fp), single.sft_teacher
    else:
        teacher_ref, sft_fp = _routes_summary(cfg, routes, fps)
        sft_source = str(cfg.teacher_map)
    provenance = _provenance(
        cfg, scan, teacher_ref, sft_fp, sft_source, tok_fp, rollout_tok_fp, consistent, sampling, rollout_temperature
    )
    if single is None:
        provenance = provenance.model_copy(
            update={"teacher_key": cfg.teacher_key, "routes": _route_provenance(cfg, routes, fps, ranges, provenance)}
        )
    run_key = _run_key(cfg, provenance)
    with _operator_faults(cfg.store):
        published = find_published_run(cfg.store, cfg.dataset, run_key)
    if published is not None:
        return PrecomputeResult("already_published", cfg.dataset, run_key, manifest=published, notices=notices)
    with _operator_faults(cfg.store), _run_writer(cfg, scan, provenance, run_key) as run:
        plan = run.plan
        mine = plan.parts_of_worker(cfg.worker_index, cfg.num_workers)
        todo = run.todo(mine)

        # 4. Score this worker's missing parts.
        if todo:
            _score_parts(
                cfg, scan, run, [p.index for p in todo], sum(p.num_samples for p in mine), tokenizer, routes, ranges
            )

        # 5. Publish once every part of every worker exists.
        missing = run.missing_parts()
        if missing or not cfg.publish:
            return PrecomputeResult(
                "waiting_for_workers",
                cfg.dataset,
                run_key,
                parts_scored=len(todo),
                parts_missing=missing,
                notices=notices,
            )
        manifest = run.publish()
    return PrecomputeResult(
        "published", cfg.dataset, run_key, manifest=manifest, parts_scored=len(todo), notices=notices
    )


@contextmanager
def _operator_faults(store: StoreDir) -> Iterator[None]:
    """A full disk, a read-only store or a missing permission ends as one `StoreUnwritable` line, not a traceback."""
    try:
        yield
    except OSError as e:
        fault = store_fault(e, store)
        if fault is None:
            raise
        raise fault from e


def _run_writer(cfg: PrecomputeConfig, scan: RolloutScan, provenance: Provenance, run_key: str) -> RunWriter:
    """This worker's writer of the run; `Conflict` when another live job already works as this worker."""
    return RunWriter(
        cfg.store,
        RunPlan.build(
            run_key=run_key,
            dataset=cfg.dataset,
            sample_ids=[r.id for r in scan.records],
            samples_per_part=cfg.samples_per_part,
            input_records=scan.total,
            skipped=scan.problems,
            provenance=provenance,
        ),
        scored_with={"max_batch_tokens": cfg.max_batch_tokens, "max_batch_size": cfg.max_batch_size},
        worker=cfg.worker_index,
    )


def _score_parts(
    cfg: PrecomputeConfig,
    scan: RolloutScan,
    run: RunWriter,
    todo: list[int],
    my_samples: int,
    tokenizer: Any,
    routes: dict[str | None, TeacherRoute],
    ranges: dict[str | None, tuple[int, int]],
) -> None:
    """Score and write parts `todo`, one routed teacher loaded at a time (one teacher: the whole dataset's route).

    A part that spans two routes (a multi-teacher dataset whose route sizes are not multiples of the part size)
    is kept in memory until its last route's teacher has scored its rows, then written whole.
    """
    plan = run.plan
    recorded = {None: plan.provenance.teacher.fingerprint} | {
        r.key: r.teacher.fingerprint for r in plan.provenance.routes
    }
    policy = None
    if cfg.rollout_policy is not None and not all(r.has_rollout_logprobs for r in scan.records):
        policy = cfg.backend.load(cfg.rollout_policy, cfg.job(plan.provenance.rollout_temperature, top_k=0))
    todo_samples = sum(plan.parts[i].num_samples for i in todo)
    bar = tqdm(
        total=my_samples,
        initial=my_samples - todo_samples,
        unit="sample",
        desc=f"score {cfg.dataset} [worker {cfg.worker_index + 1}/{cfg.num_workers}]",
        disable=not cfg.progress,
        dynamic_ncols=True,
    )
    pending: dict[int, list[tuple[list[Any], list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]]] = {}
    tokens, start = 0, time.perf_counter()
    teacher = None
    try:
        for key, route in routes.items():
            mine = [(i, seg) for i in todo for k, seg in route_of_rows(ranges, plan.part_rows(i)) if k == key]
            if not mine:
                continue
            teacher = cfg.backend.load(route.teacher, cfg.job())
            if teacher.info.fingerprint != recorded[key]:
                raise TeacherMismatch(f"{route.teacher} changed on disk while the job was starting; run it again")
            for index, rows in mine:
                rollouts = load_rollouts(scan, scan.records[rows], tokenizer)
                pending.setdefault(index, []).append(_score_rows(cfg, teacher, rollouts, index))
                segments = route_of_rows(ranges, plan.part_rows(index))
                if segments[-1][0] != key:
                    continue  # the rest of this part is another route's: written once that teacher has scored it
                pieces = pending.pop(index)
                run.write_part(index, _part_table(pieces, policy))
                tokens += sum(len(r.response_ids) for piece in pieces for r in piece[0])
                bar.update(plan.parts[index].num_samples)
                bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f}", refresh=False)
            teacher.close()
            teacher = None
    finally:
        bar.close()
        if teacher is not None:
            teacher.close()
        if policy is not None:
            policy.close()


def _score_rows(
    cfg: PrecomputeConfig, teacher: Any, rollouts: list[Any], index: int
) -> tuple[list[Any], list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
    """(rollouts, teacher log-probs, top-k ids, top-k log-probs) of some rows of part `index`."""
    prompts = [r.prompt_ids for r in rollouts]
    responses = [r.response_ids for r in rollouts]
    try:
        if cfg.top_k:
            scored = teacher.score_topk(prompts, responses)
            return rollouts, [s.logprobs for s in scored], [s.ids for s in scored], [s.topk_logprobs for s in scored]
        return rollouts, teacher.score(prompts, responses), None, None
    except TeacherServerError as e:  # raised before write_part: this part stays missing, to redo on resume
        if e.record is None:
            raise
        raise TeacherServerError(f"sample {rollouts[e.record].id!r} (part {index}): {e}", record=None) from e


def _part_table(
    pieces: list[tuple[list[Any], list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]], policy: Any
) -> Any:
    """One part's table from its scored pieces (in row order), with rollout log-probs from `policy` where missing."""
    rollouts = [r for p in pieces for r in p[0]]
    teacher_lp = [a for p in pieces for a in p[1]]
    topk_ids = None if pieces[0][2] is None else [a for p in pieces for a in p[2] or []]
    topk_lps = None if pieces[0][3] is None else [a for p in pieces for a in p[3] or []]
    prompts = [r.prompt_ids for r in rollouts]
    responses = [r.response_ids for r in rollouts]
    rollout_lp: list[np.ndarray | None] = [r.rollout_logprobs for r in rollouts]
    need = [k for k, lp in enumerate(rollout_lp) if lp is None]
    if policy is not None and need:
        for k, lp in zip(need, policy.score([prompts[k] for k in need], [responses[k] for k in need])):
            rollout_lp[k] = lp
    return build_table([r.id for r in rollouts], prompts, responses, teacher_lp, rollout_lp, topk_ids, topk_lps)


def _routes(cfg: PrecomputeConfig) -> dict[str | None, TeacherRoute]:
    """The teachers of this run by routing key: the one of --teacher (key None), or those of --teacher-map."""
    if cfg.teacher_map is None:
        assert cfg.teacher is not None and cfg.sft_teacher is not None  # the config's check
        return {None: TeacherRoute(teacher=cfg.teacher, sft_teacher=cfg.sft_teacher)}
    return {k: r for k, r in load_teacher_map(cfg.teacher_map).items()}


def _check_model_dirs(cfg: PrecomputeConfig, routes: dict[str | None, TeacherRoute]) -> None:
    named = [(f"teacher {k!r} of --teacher-map" if k else "teacher", r.teacher) for k, r in routes.items()]
    for label, path in (*named, ("rollout policy", cfg.rollout_policy)):
        if path is not None and not Path(path).is_dir():
            raise InvalidInput(f"{label} {path} is not a model directory")


def _routes_digest(pairs: list[tuple[str | None, str]]) -> str:
    return "routes:" + hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _routes_summary(
    cfg: PrecomputeConfig, routes: dict[str | None, TeacherRoute], fps: dict[str | None, tuple[str, str]]
) -> tuple[ModelRef, str]:
    """The top-level teacher and SFT-teacher fingerprint of a multi-teacher dataset: digests of the routes' (key,
    fingerprint) pairs, equal exactly when every route's teacher is its SFT-data teacher."""
    teacher = ModelRef(
        name_or_path=f"{len(routes)} routed teachers ({cfg.teacher_map}; see provenance.routes)",
        fingerprint=_routes_digest([(k, fps[k][0]) for k in routes]),
        architecture=None,
    )
    return teacher, _routes_digest([(k, fps[k][1]) for k in routes])


def _route_provenance(
    cfg: PrecomputeConfig,
    routes: dict[str | None, TeacherRoute],
    fps: dict[str | None, tuple[str, str]],
    ranges: dict[str | None, tuple[int, int]],
    prov: Provenance,
) -> list[Route]:
    return [
        Route(
            key=str(k),
            teacher=_model_ref(r.teacher, fps[k][0]),
            sft_teacher_fingerprint=fps[k][1],
            sft_teacher_source=None if is_fingerprint(r.sft_teacher) else str(r.sft_teacher),
            consistency=Consistency(
                teacher_consistent=fps[k][0] == fps[k][1],
                mismatch_allowed=cfg.allow_teacher_mismatch,
                rollout_tokenizer_checked=prov.consistency.rollout_tokenizer_checked,
            ),
            start=ranges[k][0],
            num_samples=ranges[k][1],
        )
        for k, r in routes.items()
    ]


def _load_tokenizer(model_dir: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InvalidInput("scoring needs the teacher extra: pip install 'lightning-opd[teacher]'") from e
    return AutoTokenizer.from_pretrained(str(model_dir))


def _max_context(model_dir: Path) -> int:
    context = config_context_length(json.loads((Path(model_dir) / "config.json").read_text()))
    if context is not None:
        return context
    raise InvalidInput(f"cannot tell the context length of {model_dir} from its config.json")


def _rollout_tokenizer_fingerprint(cfg: PrecomputeConfig, sampling: Sampling | None) -> str | None:
    """The rollouts' tokenizer: as declared, else as `lopd sample` recorded it, else the policy's; None if unknown."""
    declared: str | None = None
    if cfg.rollout_tokenizer is not None:
        if is_fingerprint(cfg.rollout_tokenizer):
            declared = cfg.rollout_tokenizer
        elif not Path(cfg.rollout_tokenizer).is_dir():
            raise InvalidInput(
                f"--rollout-tokenizer {cfg.rollout_tokenizer} is neither a tokenizer directory nor a fingerprint"
            )
        else:
            declared = tokenizer_fingerprint(cfg.rollout_tokenizer)
    if sampling is not None:
        if declared is not None and declared != sampling.tokenizer_fingerprint:
            raise TokenizerMismatch(
                f"--rollout-tokenizer ({short_fingerprint(declared)}) is not the tokenizer `lopd sample` recorded "
                f"for these rollouts ({short_fingerprint(sampling.tokenizer_fingerprint)}); leave the flag out"
            )
        if cfg.rollout_policy is not None and model_fingerprint(cfg.rollout_policy) != sampling.policy.fingerprint:
            raise InvalidInput(
                f"--rollout-policy {cfg.rollout_policy} is not the policy that sampled these rollouts "
                f"({sampling.policy.name_or_path}, {short_fingerprint(sampling.policy.fingerprint)}); leave it out"
            )
        return sampling.tokenizer_fingerprint
    if declared is not None:
        return declared
    if cfg.rollout_policy is not None:
        return tokenizer_fingerprint(str(cfg.rollout_policy))
    return None


def _rollout_temperature(cfg: PrecomputeConfig, sampling: Sampling | None) -> float:
    """The temperature the rollouts' log-probs are (or will be) at: `lopd sample`'s, else the flag's, else 1."""
    if sampling is None:
        return cfg.rollout_temperature if cfg.rollout_temperature is not None else 1.0
    if cfg.rollout_temperature is not None and cfg.rollout_temperature != sampling.temperature:
        raise InvalidInput(
            f"--rollout-temperature {cfg.rollout_temperature} differs from the temperature these rollouts were "
            f"sampled at ({sampling.temperature}, recorded by `lopd sample`); leave the flag out"
        )
    return sampling.temperature


def _model_ref(path: Path, fingerprint: str) -> ModelRef:
    config = json.loads((Path(path) / "config.json").read_text())
    arch = (config.get("architectures") or [config.get("model_type")])[0]
    return ModelRef(name_or_path=str(path), revision=None, fingerprint=fingerprint, architecture=arch)


def _provenance(
    cfg: PrecomputeConfig,
    scan: RolloutScan,
    teacher_ref: ModelRef,
    sft_fp: str,
    sft_source: str,
    tok_fp: str,
    rollout_tok_fp: str | None,
    consistent: bool,
    sampling: Sampling | None,
    rollout_temperature: float,
) -> Provenance:
    with_lp = sum(r.has_rollout_logprobs for r in scan.records)
    if with_lp == len(scan.records):
        source: Literal["input", "rollout_policy", "mixed", "none"] = "input"
    elif cfg.rollout_policy is not None:
        source = "rollout_policy" if with_lp == 0 else "mixed"
    else:
        source = "none" if with_lp == 0 else "mixed"
    policy = _model_ref(cfg.rollout_policy, model_fingerprint(cfg.rollout_policy)) if cfg.rollout_policy else None
    if policy is None and sampling is not None:
        policy = sampling.policy
    computed = source in ("rollout_policy", "mixed") and cfg.rollout_policy is not None
    return Provenance(
        teacher=teacher_ref,
        tokenizer_fingerprint=tok_fp,
        sft_teacher_fingerprint=sft_fp,
        sft_teacher_source=None if is_fingerprint(sft_source) else str(sft_source),
        rollout_policy=policy,
        rollout_tokenizer_fingerprint=rollout_tok_fp,
        rollout_logprobs_source=source,
        rollout_temperature=rollout_temperature if computed or sampling is not None else None,
        rollouts=RolloutSource(
            paths=[str(p) for p in scan.paths],
            fingerprint=scan.input_fingerprint,
            records=scan.total,
            retokenized=scan.retokenized,
        ),
        sampling=sampling,
        backend=cfg.backend.name,
        dtype=cfg.backend.precision(),
        temperature=cfg.temperature,
        consistency=Consistency(
            teacher_consistent=consistent,
            mismatch_allowed=cfg.allow_teacher_mismatch,
            rollout_tokenizer_checked=rollout_tok_fp is not None,
        ),
        tool_version=lopd.__version__,
        top_k=cfg.top_k,
    )


def _run_key(cfg: PrecomputeConfig, prov: Provenance) -> str:
    """Hash of everything that determines the dataset's content (not paths, devices or batch sizes).

    Batch sizes are left out on purpose so that a run that ran out of memory can resume with a
    smaller `--max-batch-tokens`.
    """
    key = {
        "format_version": FORMAT_VERSION,
        "dataset": cfg.dataset,
        "rollouts": prov.rollouts.fingerprint,
        "teacher": prov.teacher.fingerprint,
        "tokenizer": prov.tokenizer_fingerprint,
        "sft_teacher": prov.sft_teacher_fingerprint,
        "rollout_policy": prov.rollout_policy.fingerprint if prov.rollout_policy else None,
        "rollout_tokenizer": prov.rollout_tokenizer_fingerprint,
        "rollout_temperature": prov.rollout_temperature,
        "backend": cfg.backend.name,
        "dtype": cfg.backend.precision(),
        "temperature": cfg.temperature,
        "on_bad_record": cfg.on_bad_record,
        "samples_per_part": cfg.samples_per_part,
        "mismatch_allowed": cfg.allow_teacher_mismatch,
    }
    if prov.sampling is not None:  # only then, so that runs of plain rollouts keep their keys
        key["sampling"] = prov.sampling.model_dump(exclude={"policy": {"name_or_path"}})
    if cfg.top_k:  # likewise: runs without top-k keep their keys
        key["top_k"] = cfg.top_k
    if prov.routes:  # multi-teacher: the routing field and each route's samples (teachers: in the digests above)
        key["routes"] = [cfg.teacher_key, [[r.key, r.start, r.num_samples] for r in prov.routes]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
