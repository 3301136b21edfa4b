"""Request and response bodies of the HTTP API (the OpenAPI schema is generated from these).

Manifests and dataset statistics are served as the storage models themselves
(`lopd.storage.manifest.Manifest`, `lopd.storage.stats.CoverageStats`/`ConsistencyStats`), so the
store and the API cannot drift apart; only what is specific to HTTP is defined here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ErrorType = Literal[
    "not_found", "invalid_input", "corrupt", "unauthorized", "too_large", "method_not_allowed", "internal"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Model):
    type: ErrorType
    message: str = Field(description="What was wrong and, where there is one, how to fix it.")


class ErrorResponse(_Model):
    """The one shape of every 4xx/5xx answer (except /readyz, which has its own)."""

    error: ErrorBody


class LivezResponse(_Model):
    status: Literal["ok"] = "ok"


class ReadyResponse(_Model):
    status: Literal["ready"] = "ready"
    datasets: int = Field(description="Datasets with at least one published version.")


class UnavailableResponse(_Model):
    status: Literal["unavailable"] = "unavailable"
    problems: list[str] = Field(description="Why the server is not ready: missing store, failed checksums, ...")


class TeacherSummary(_Model):
    name_or_path: str | None
    fingerprint: str
    architecture: str | None


class DatasetSummary(_Model):
    name: str
    version: int = Field(description="The latest published version (what routes serve without `version`).")
    versions: list[int] = Field(description="Published versions that have not failed verification.")
    num_samples: int
    num_response_tokens: int
    teacher: TeacherSummary
    tokenizer_fingerprint: str
    sft_teacher_fingerprint: str
    verdict: Literal["consistent", "inconsistent"]
    content_hash: str


class DatasetsResponse(_Model):
    datasets: list[DatasetSummary]


class Sample(_Model):
    """One stored sample; float values are the float32 ones, printed in their shortest exact form."""

    index: int = Field(description="Dataset index (0..num_samples-1).")
    sample_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    teacher_logprobs: list[float]
    rollout_logprobs: list[float] | None


class BatchRequest(_Model):
    indices: list[Annotated[int, Field(ge=0)]] = Field(
        description="Dataset indices (0..num_samples-1), in the order wanted; repeats allowed."
    )
    version: int | None = Field(default=None, ge=1, description="Dataset version; the latest by default.")


class BatchResponse(_Model):
    """The JSON form of a batch (`Accept: application/json`); the default form is an Arrow IPC stream."""

    dataset: str
    version: int
    samples: list[Sample]
