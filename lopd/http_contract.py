"""The HTTP API contract (v1) between `lopd serve` (`lopd.server.api`) and the training client (`lopd.client`).

Everything the two sides must agree on is stated here once, and both import it: the paths, the
media types, the `X-Lopd-*` headers, the served columns, the default request limits, the error
body and the request/response models (the server's OpenAPI schema is generated from them).
Manifests and dataset statistics are served as the storage models themselves
(`lopd.storage.manifest.Manifest`, `lopd.storage.stats`), so they are not repeated here.
docs/http-api.md is the human summary.

Light on purpose (stdlib and pydantic only): the client imports it and must load neither the
server, the store, FastAPI nor torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# -- paths -----------------------------------------------------------------------------------

API_PREFIX = "/v1"
DATASETS_PATH = f"{API_PREFIX}/datasets"  # the catalogue; a dataset's routes sit under DATASETS_PATH/{name}
LIVEZ_PATH = "/livez"
READYZ_PATH = "/readyz"

# -- media types and headers -----------------------------------------------------------------

# A batch as an Arrow IPC stream: the default answer of the batch route, float32 bit-exact.
ARROW_STREAM_MEDIA_TYPE = "application/vnd.apache.arrow.stream"
JSON_MEDIA_TYPE = "application/json"

# Response headers of the batch route: which dataset version the rows come from.
DATASET_HEADER = "X-Lopd-Dataset"
VERSION_HEADER = "X-Lopd-Version"
CONTENT_HASH_HEADER = "X-Lopd-Content-Hash"

# -- served columns --------------------------------------------------------------------------

# A served sample: its dataset index (JSON only) and these columns, in this order (the Arrow
# batch's columns and the fields of `Sample`; a test checks the two agree).
INDEX = "index"
SAMPLE_ID = "sample_id"
PROMPT_IDS = "prompt_ids"  # list<int32>
RESPONSE_IDS = "response_ids"  # list<int32>
TEACHER_LOGPROBS = "teacher_logprobs"  # list<float32>, one per response token
ROLLOUT_LOGPROBS = "rollout_logprobs"  # list<float32> or null
SERVED_COLUMNS: tuple[str, ...] = (SAMPLE_ID, PROMPT_IDS, RESPONSE_IDS, TEACHER_LOGPROBS, ROLLOUT_LOGPROBS)
# Served only when a batch request selects them (`BatchRequest.columns`), from datasets built with
# `--top-k K` (the manifest's `provenance.top_k`): len(response) * K values per row, row-major
# [position, rank], by descending log-prob (ties: the lower id). A Lightning OPD run never pays for them.
TEACHER_TOPK_IDS = "teacher_topk_ids"  # list<int32>
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"  # list<float32>
TOPK_COLUMNS: tuple[str, ...] = (TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS)
# Every column a batch may hold, in the order a batch holds them.
ALL_COLUMNS: tuple[str, ...] = (*SERVED_COLUMNS, *TOPK_COLUMNS)
Column = Literal[
    "sample_id", "prompt_ids", "response_ids", "teacher_logprobs", "rollout_logprobs", "teacher_topk_ids",
    "teacher_topk_logprobs",
]  # fmt: skip


def served_columns(columns: Sequence[str] | None) -> tuple[str, ...]:
    """The columns a batch answer holds for a request's `columns`: those, in `ALL_COLUMNS` order, `sample_id` always.

    None (not given) is `SERVED_COLUMNS`.
    """
    if columns is None:
        return SERVED_COLUMNS
    unknown = sorted(set(columns) - set(ALL_COLUMNS))
    if unknown:
        raise ValueError(f"unknown columns {unknown}; a batch may hold {list(ALL_COLUMNS)}")
    return tuple(c for c in ALL_COLUMNS if c == SAMPLE_ID or c in columns)


# -- request limits --------------------------------------------------------------------------

# The server's default limits (each can be changed per deployment, `lopd serve` settings); a
# client that keeps its requests within them is never refused for size.
MAX_BATCH_INDICES = 4096  # indices in one batch request
MAX_RESPONSE_TOKENS = 8_388_608  # prompt + response tokens in one batch response
MAX_BODY_BYTES = 1_048_576  # request body bytes (a MAX_BATCH_INDICES-index batch body is ~30 kB)

# -- the error body --------------------------------------------------------------------------


class ErrorType(str, Enum):
    """`error.type` of an error answer; docs/http-api.md lists the status each one comes with."""

    NOT_FOUND = "not_found"
    INVALID_INPUT = "invalid_input"
    CORRUPT = "corrupt"
    UNAVAILABLE = "unavailable"
    UNAUTHORIZED = "unauthorized"
    TOO_LARGE = "too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    TIMEOUT = "timeout"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL = "internal"


def error_body(type_: ErrorType, message: str) -> dict[str, dict[str, str]]:
    """The JSON body of every 4xx/5xx answer (except /readyz's 503): `{"error": {"type", "message"}}`."""
    return {"error": {"type": ErrorType(type_).value, "message": message}}


def read_error(body: Any) -> tuple[str | None, str] | None:
    """`(error.type, error.message)` of a decoded error body, or None when `body` is not one.

    Lenient on purpose (a proxy in between, or a newer server, may answer other types).
    """
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None
    type_, message = err.get("type"), err.get("message")
    return (None if type_ is None else str(type_)), ("no message" if message is None else str(message))


# -- request and response models -------------------------------------------------------------


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
    """One stored sample; float values are the float32 ones, printed in their shortest exact form.

    A batch answer holds the columns its request selected (`BatchRequest.columns`); the others are absent.
    """

    index: int = Field(description="Dataset index (0..num_samples-1).")
    sample_id: str
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None
    teacher_logprobs: list[float] | None = None
    rollout_logprobs: list[float] | None = Field(None, description="Null when the dataset has none for this sample.")
    teacher_topk_ids: list[int] | None = Field(
        None, description="Only when selected: len(response_ids) x K ids, row-major [position, rank]."
    )
    teacher_topk_logprobs: list[float] | None = Field(
        None, description="Only when selected: their log-probs, descending per position."
    )


class BatchRequest(_Model):
    """Strict on purpose: an index or a version is a JSON integer; `"1"`, `true` and `1.0` are refused (422)."""

    indices: list[Annotated[int, Field(ge=0, strict=True)]] = Field(
        description="Dataset indices (0..num_samples-1), in the order wanted; repeats allowed."
    )
    version: int | None = Field(default=None, ge=1, strict=True, description="Dataset version; the latest by default.")
    columns: list[Column] | None = Field(
        default=None,
        description="The columns to serve (in the answer they keep the contract's order; sample_id always). "
        "Default: sample_id, prompt_ids, response_ids, teacher_logprobs, rollout_logprobs. The top-k columns "
        "exist only in datasets built with --top-k (else 422 invalid_input).",
    )


class BatchResponse(_Model):
    """The JSON form of a batch (`Accept: application/json`); the default form is an Arrow IPC stream."""

    dataset: str
    version: int
    samples: list[Sample]
