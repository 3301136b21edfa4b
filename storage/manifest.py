"""The manifest: what a published dataset version contains and where its numbers came from.

Pydantic models are the single source of truth for the manifest's JSON (the HTTP API serves the
same models). Provenance is recorded so that a training job can check teacher consistency
before it trains: which teacher scored the tokens, which teacher produced the student's SFT
data, which tokenizer gives the ids their meaning, which policy sampled the rollouts.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lopd.errors import Corrupt

from .atomic import atomic_write_bytes
from .schema import FORMAT_VERSION


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


class Consistency(_Model):
    """Teacher consistency: the scoring teacher must be the model that generated the SFT data."""

    teacher_consistent: bool = Field(description="Scoring teacher fingerprint == SFT-data teacher fingerprint.")
    mismatch_allowed: bool = Field(description="Built with --allow-teacher-mismatch.")
    rollout_tokenizer_checked: bool = Field(
        description="The rollouts' tokenizer was declared and equals the teacher's (else it was assumed)."
    )

    @property
    def verdict(self) -> Literal["consistent", "inconsistent"]:
        return "consistent" if self.teacher_consistent else "inconsistent"


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
    backend: str
    dtype: str
    temperature: float = Field(description="Scoring temperature: log_softmax(logits / temperature).")
    consistency: Consistency
    tool_version: str


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
    content_hash: str = Field(description="sha256 over the shards' checksums in order: equal content, equal hash.")
    run_key: str = Field(description="Hash of the inputs and settings that produced this version.")
    created_at: datetime
    num_samples: int
    num_prompt_tokens: int
    num_response_tokens: int
    files: list[FileEntry]
    coverage: Coverage
    provenance: Provenance


def content_hash(files: list[FileEntry]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return "sha256:" + h.hexdigest()


def now_utc() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def write_manifest(path: Path, manifest: Manifest) -> None:
    atomic_write_bytes(path, manifest.model_dump_json(indent=2).encode() + b"\n")


def read_manifest(path: Path) -> Manifest:
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
