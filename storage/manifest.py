"""The manifest: what a published dataset version contains and where its numbers came from.

Pydantic models are the single source of truth for the manifest's JSON (the HTTP API serves the
same models). Provenance is recorded so that a training job can check teacher consistency
before it trains: which teacher scored the tokens, which teacher produced the student's SFT
data, which tokenizer gives the ids their meaning, which policy sampled the rollouts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lopd.errors import Corrupt

from .atomic import atomic_write_bytes
from .fs import StoreDir
from .schema import FORMAT_VERSION

# The fingerprint recorded for a model the store cannot name (an import without --teacher-fingerprint or
# --sft-teacher-fingerprint): a dataset with it has unknown provenance, so it is never `consistent`.
UNKNOWN_FINGERPRINT = "unknown"
# `provenance.backend` of a version imported from another layout: "import:<format>".
IMPORT_BACKEND_PREFIX = "import:"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Model):
    """A model as the store remembers it: enough to find it again and to tell it from any other."""

    name_or_path: str | None = Field(description="Path or hub name the model was loaded from.")
    revision: str | None = Field(default=None, description="Hub revision, when known.")
    fingerprint: str = Field(description="sha256 over config and every weight tensor (`lopd fingerprint`).")
    architecture: str | None = None


class RolloutSource(_Model):
    paths: list[str]
    fingerprint: str = Field(description="sha256 over the rollout input files' bytes.")
    records: int = Field(description="Records read from the input, valid or not.")
    retokenized: int = Field(
        description="Valid records given as text and tokenized here (ids may differ from sampled)."
    )


class Sampling(_Model):
    """How the rollouts were sampled, as `lopd sample` recorded it in its output's `_sampling.json`.

    Recorded so that a store says which policy drew its tokens and at which settings, and so that
    its `rollout_logprobs` can be read correctly: they are the processed log-probs at `temperature`
    and `top_p` (the distribution each token was drawn from).
    """

    policy: ModelRef = Field(description="The policy that sampled the rollouts (the SFT student).")
    tokenizer_fingerprint: str = Field(description="Fingerprint of the policy's tokenizer.")
    backend: str = Field(description="Sampling engine (transformers or vllm).")
    dtype: str
    n: int = Field(description="Samples per prompt.")
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    prompts_fingerprints: list[str] = Field(description="sha256 of each sample directory's tokenized prompts.")


class Consistency(_Model):
    """Teacher consistency: the scoring teacher must be the model that generated the SFT data."""

    teacher_consistent: bool = Field(description="Scoring teacher fingerprint == SFT-data teacher fingerprint.")
    mismatch_allowed: bool = Field(
        description="Published although not proven consistent: built with --allow-teacher-mismatch, or imported "
        "with other or unknown fingerprints."
    )
    rollout_tokenizer_checked: bool = Field(
        description="The rollouts' tokenizer was declared and equals the teacher's (else it was assumed)."
    )

    @property
    def verdict(self) -> Literal["consistent", "inconsistent"]:
        return "consistent" if self.teacher_consistent else "inconsistent"


class Route(_Model):
    """One teacher of a multi-teacher dataset (`lopd precompute --teacher-map`): the records whose routing key is
    `key`, scored by `teacher`, and that teacher's own consistency. Its samples are the dataset indices
    `start .. start + num_samples - 1` (a multi-teacher dataset is ordered by route)."""

    key: str = Field(description="The value of the records' routing field (`provenance.teacher_key`).")
    teacher: ModelRef
    sft_teacher_fingerprint: str = Field(description="The model that generated this domain's SFT data.")
    sft_teacher_source: str | None = Field(description="The path given for it, or null when a fingerprint was given.")
    consistency: Consistency
    start: int = Field(ge=0, description="Dataset index of the route's first sample.")
    num_samples: int = Field(ge=0)


class Provenance(_Model):
    teacher: ModelRef
    tokenizer_fingerprint: str = Field(description="Fingerprint of the teacher's vocabulary (id -> token).")
    sft_teacher_fingerprint: str = Field(description="The model that generated the student's SFT data.")
    sft_teacher_source: str | None = Field(description="The path given for it, or null when a fingerprint was given.")
    rollout_policy: ModelRef | None = None
    rollout_tokenizer_fingerprint: str | None = None
    rollout_logprobs_source: Literal["input", "rollout_policy", "mixed", "none"] = Field(
        description="Where `rollout_logprobs` came from: the input records, the --rollout-policy model, "
        "both (some records had them), or nowhere (the column is null)."
    )
    rollout_temperature: float | None = Field(
        default=None, description="Sampling temperature used when computing rollout log-probs with the policy."
    )
    rollouts: RolloutSource
    sampling: Sampling | None = Field(
        default=None, description="How the rollouts were sampled, when they came from `lopd sample`."
    )
    backend: str
    dtype: str
    temperature: float = Field(description="Scoring temperature: log_softmax(logits / temperature).")
    consistency: Consistency
    tool_version: str
    top_k: int = Field(
        default=0,
        ge=0,
        description="K of the stored `teacher_topk_ids` / `teacher_topk_logprobs` (the teacher's K most likely "
        "next tokens at each response position); 0: not stored. Left out of the JSON when 0, so manifests of "
        "stores without top-k keep their exact form.",
        exclude_if=lambda k: k == 0,
    )
    teacher_key: str | None = Field(
        default=None,
        description="Multi-teacher datasets: the rollout record field that chose each sample's teacher; absent "
        "(null) for one teacher.",
        exclude_if=lambda k: k is None,
    )
    routes: list[Route] = Field(
        default_factory=list,
        description="Multi-teacher datasets: each teacher, its consistency and its samples, in dataset order. The "
        "top-level `teacher`, `sft_teacher_fingerprint` and `consistency` then summarise them (consistent only "
        "if every route is). Absent for one teacher, so those manifests keep their form.",
        exclude_if=lambda r: not r,
    )

    @property
    def provenance_known(self) -> bool:
        """False when the scoring teacher or the SFT-data teacher is unknown (an import without fingerprints)."""
        return UNKNOWN_FINGERPRINT not in (self.teacher.fingerprint, self.sft_teacher_fingerprint)


def verdict_explanation(prov: Provenance) -> str:
    """Why a version has its verdict, and for an inconsistent one what would fix it (one line, for people)."""
    if prov.routes:
        bad = [r.key for r in prov.routes if not r.consistency.teacher_consistent]
        if not bad:
            return f"each of the {len(prov.routes)} routed teachers is the model that generated its domain's SFT data"
        return (
            f"routed teacher(s) {', '.join(repr(k) for k in bad)} are not the model that generated their domain's "
            "SFT data (built with --allow-teacher-mismatch); score those domains again with their SFT-data teacher"
        )
    if prov.consistency.teacher_consistent:
        return "the scoring teacher is the model that generated the SFT data"
    if not prov.provenance_known:
        return (
            "provenance unknown: imported without fingerprints, so nothing says which teacher scored the rows or "
            "generated the SFT data. If it was one model, import again with `lopd import --teacher-fingerprint FP "
            "--sft-teacher-fingerprint FP` (`lopd fingerprint MODEL_DIR` prints FP)"
        )
    imported = prov.backend.startswith(IMPORT_BACKEND_PREFIX)
    how = "imported with these fingerprints" if imported else "built with --allow-teacher-mismatch"
    return (
        f"scored by teacher {prov.teacher.fingerprint}, but the SFT data came from {prov.sft_teacher_fingerprint} "
        f"({how}); score it again with the SFT-data teacher (`lopd precompute --teacher <that model>`)"
    )


class FileEntry(_Model):
    path: str = Field(description="File name relative to the version directory.")
    sha256: str
    bytes: int
    num_samples: int
    num_response_tokens: int
    first_index: int = Field(description="Dataset index of the file's first sample.")


class Coverage(_Model):
    input_records: int
    scored: int
    skipped: int
    skipped_by_reason: dict[str, int] = Field(default_factory=dict)
    skipped_file: FileEntry | None = Field(default=None, description="`skipped.parquet`: (sample_id, reason).")


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    name: str
    version: int
    content_hash: str = Field(
        description="sha256 over the samples' values in dataset order (`schema.ContentHasher`): equal content, "
        "equal hash, whatever the run, the part sizes or the shards' footer metadata."
    )
    run_key: str = Field(description="Hash of the inputs and settings that produced this version.")
    created_at: datetime
    num_samples: int
    num_prompt_tokens: int
    num_response_tokens: int
    files: list[FileEntry]
    coverage: Coverage
    provenance: Provenance


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def manifest_bytes(manifest: Manifest) -> bytes:
    """The bytes of `manifest.json` for `manifest`."""
    return manifest.model_dump_json(indent=2).encode() + b"\n"


def write_manifest(path: StoreDir, manifest: Manifest) -> None:
    atomic_write_bytes(path, manifest_bytes(manifest))


def read_manifest(path: StoreDir) -> Manifest:
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError) as e:
        raise Corrupt(f"manifest {path} is not a valid lightning-opd manifest: {e}") from e
    if manifest.format_version > FORMAT_VERSION:
        raise Corrupt(
            f"manifest {path} has format version {manifest.format_version}; this lightning-opd reads "
            f"up to {FORMAT_VERSION}: upgrade lightning-opd"
        )
    return manifest
