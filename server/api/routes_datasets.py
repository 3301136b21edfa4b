"""Dataset routes: catalogue, manifests, samples, batches and statistics (all read-only).

Each route asks the catalogue for a verified version and encodes the answer; nothing here reads
files. Responses about a version carry `ETag: "<content hash>.<name>.v<version>"` where the answer
depends only on that immutable version, and answer 304 to a matching `If-None-Match`. Indices and
versions in the URL are plain decimal digits (`+1`, `1.0`, `1_0` and `true` are refused, not read
as numbers), as strict as the JSON body (`BatchRequest`). Local paths in provenance are served
redacted unless `redact_paths` is off (`redaction.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BeforeValidator

from lopd.errors import InvalidInput
from lopd.http_contract import (
    ARROW_STREAM_MEDIA_TYPE,
    CONTENT_HASH_HEADER,
    DATASET_HEADER,
    DATASETS_PATH,
    JSON_MEDIA_TYPE,
    TOPK_COLUMNS,
    VERSION_HEADER,
    BatchRequest,
    BatchResponse,
    DatasetsResponse,
    DatasetSummary,
    Sample,
    TeacherSummary,
    served_columns,
)
from lopd.storage.manifest import Manifest
from lopd.storage.stats import ConsistencyStats, CoverageStats

from . import encoding
from .auth import lab_of
from .catalog import Catalog, ServedVersion
from .deps import CatalogDep, LimitsDep, MetricsDep, SettingsDep
from .errors import TooLarge, error_responses
from .metrics import Metrics
from .redaction import public_manifest
from .settings import ServerSettings

router = APIRouter(prefix=DATASETS_PATH, tags=["datasets"])

# The rule of `lopd.storage.layout.validate_name`, stated in the schema for clients and fuzzers (a test
# checks the two agree). Enforced by `validate_name` itself, whose message says how to fix a name.
NAME_PATTERN = r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[
    str,
    Path(description=f"Dataset name, as listed by GET {DATASETS_PATH}.", json_schema_extra={"pattern": NAME_PATTERN}),
]


def _digits(value: object) -> object:
    """A URL integer is decimal digits only (pydantic alone would read `+1`, ` 1`, `1.0` as 1 and `1_0` as 10)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("must be a whole number written in decimal digits only")
    return value


Digits = BeforeValidator(_digits)
Version = Annotated[int | None, Query(ge=1, description="Dataset version; the latest published by default."), Digits]
Index = Annotated[int, Path(ge=0, description="Dataset index, 0..num_samples-1."), Digits]
IfNoneMatch = Annotated[str | None, Header(description="An ETag from an earlier answer: 304 if unchanged.")]
_VERSION_ERRORS = error_responses(401, 404, 422, 503)
_NOT_MODIFIED: dict[int | str, dict[str, Any]] = {304: {"description": "Not modified (the ETag matched)."}}


def _etag(served: ServedVersion) -> str:
    """The version's identity: its content hash alone is shared by two versions of equal samples, whose
    manifests (version number, provenance) still differ, so a cached answer for one must not match the other."""
    m = served.manifest
    return f'"{m.content_hash.removeprefix("sha256:")}.{m.name}.v{m.version}"'


def _not_modified(served: ServedVersion, if_none_match: str | None) -> Response | None:
    if not if_none_match:
        return None
    etag = _etag(served)
    candidates = {c.strip().removeprefix("W/") for c in if_none_match.split(",")}
    if "*" in candidates or etag in candidates:
        return Response(status_code=304, headers={"ETag": etag})
    return None


def _open_conditional(
    catalog: Catalog, name: str, version: int | None, if_none_match: str | None, response: Response
) -> tuple[ServedVersion, Response | None]:
    """Open a version for a conditional GET: a 304 when the client's copy is current, else tag `response`."""
    served = catalog.open(name, version)
    cached = _not_modified(served, if_none_match)
    if cached is None:
        response.headers["ETag"] = _etag(served)
    return served, cached


def _check_indices(indices: Sequence[int], n: int, name: str, version: int) -> np.ndarray:
    for i in indices:  # before numpy: a huge int must be a 422, not an overflow
        if i < 0 or i >= n:
            raise InvalidInput(f"index {i} is out of range for {name!r} v{version} (0..{n - 1})")
    return np.asarray(indices, dtype=np.int64)


@router.get("", response_model=DatasetsResponse, responses=error_responses(401))
def list_datasets(catalog: CatalogDep, settings: SettingsDep) -> DatasetsResponse:
    """Every dataset with a published version, described by its latest version."""
    out = []
    for m, versions in catalog.listing():
        p = (public_manifest(m) if settings.redact_paths else m).provenance
        out.append(
            DatasetSummary(
                name=m.name,
                version=m.version,
                versions=versions,
                num_samples=m.num_samples,
                num_response_tokens=m.num_response_tokens,
                teacher=TeacherSummary(
                    name_or_path=p.teacher.name_or_path,
                    fingerprint=p.teacher.fingerprint,
                    architecture=p.teacher.architecture,
                ),
                tokenizer_fingerprint=p.tokenizer_fingerprint,
                sft_teacher_fingerprint=p.sft_teacher_fingerprint,
                verdict=p.consistency.verdict,
                content_hash=m.content_hash,
            )
        )
    return DatasetsResponse(datasets=out)


@router.get("/{name}", response_model=Manifest, responses={**_NOT_MODIFIED, **_VERSION_ERRORS})
def get_manifest(
    name: Name,
    catalog: CatalogDep,
    settings: SettingsDep,
    response: Response,
    version: Version = None,
    if_none_match: IfNoneMatch = None,
) -> Any:
    """The version's manifest: files, checksums, coverage counts and provenance (local paths redacted by default)."""
    served, cached = _open_conditional(catalog, name, version, if_none_match, response)
    if cached is not None:
        return cached
    return public_manifest(served.manifest) if settings.redact_paths else served.manifest


@router.get(
    "/{name}/samples/{index}",
    response_model=None,
    responses={200: {"model": Sample, "description": "The sample."}, **_NOT_MODIFIED, **_VERSION_ERRORS},
)
async def get_sample(
    name: Name,
    index: Index,
    request: Request,
    catalog: CatalogDep,
    metrics: MetricsDep,
    limits: LimitsDep,
    version: Version = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """One sample as JSON."""
    return await limits.read(_sample, name, index, request, catalog, metrics, version, if_none_match)


def _sample(
    name: str,
    index: int,
    request: Request,
    catalog: Catalog,
    metrics: Metrics,
    version: int | None,
    if_none_match: str | None,
) -> Response:
    served = catalog.open(name, version)
    m = served.manifest
    idx = _check_indices([index], len(served), m.name, m.version)
    if (cached := _not_modified(served, if_none_match)) is not None:
        return cached
    body = encoding.dumps(encoding.sample_dicts(served.dataset.take(idx), idx)[0])
    metrics.served(m.name, m.version, lab_of(request), samples=1, nbytes=len(body))
    return Response(body, media_type=JSON_MEDIA_TYPE, headers={"ETag": _etag(served)})


@router.post(
    "/{name}/batch",
    response_model=None,
    responses={
        200: {
            "model": BatchResponse,
            "description": "The samples in the requested order: an Arrow IPC stream (default) or JSON.",
            "content": {ARROW_STREAM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(400, 401, 404, 413, 422, 503),
    },
)
async def get_batch(
    name: Name,
    body: BatchRequest,
    request: Request,
    catalog: CatalogDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    limits: LimitsDep,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Samples by dataset index, in the order given (repeats allowed), within the server's limits."""
    return await limits.read(_batch, name, body, request, catalog, settings, metrics, accept)


def _batch(
    name: str,
    body: BatchRequest,
    request: Request,
    catalog: Catalog,
    settings: ServerSettings,
    metrics: Metrics,
    accept: str | None,
) -> Response:
    if len(body.indices) > settings.max_batch_indices:
        raise TooLarge(
            f"{len(body.indices)} indices in one batch; the limit max_batch_indices is "
            f"{settings.max_batch_indices}: split the request"
        )
    served = catalog.open(name, body.version)
    m = served.manifest
    idx = _check_indices(body.indices, len(served), m.name, m.version)
    tokens = int(served.token_counts[idx].sum())
    if tokens > settings.max_response_tokens:
        raise TooLarge(
            f"the batch holds {tokens} prompt+response tokens; the limit max_response_tokens is "
            f"{settings.max_response_tokens}: ask for fewer samples per request"
        )
    columns = served_columns(body.columns)
    missing = [c for c in columns if c in TOPK_COLUMNS and not m.provenance.top_k]
    if missing:
        raise InvalidInput(
            f"{m.name!r} v{m.version} has no {', '.join(missing)}: it was built without top-k "
            "(`lopd precompute --top-k K` stores them)"
        )
    table = served.dataset.take(idx, columns=columns)
    if encoding.wants_json(accept):
        payload = {"dataset": m.name, "version": m.version, "samples": encoding.sample_dicts(table, idx, columns)}
        content, media_type = encoding.dumps(payload), JSON_MEDIA_TYPE
    else:
        content, media_type = encoding.arrow_stream(table, columns), ARROW_STREAM_MEDIA_TYPE
    metrics.served(m.name, m.version, lab_of(request), samples=len(idx), nbytes=len(content))
    headers = {DATASET_HEADER: m.name, VERSION_HEADER: str(m.version), CONTENT_HASH_HEADER: m.content_hash}
    return Response(content, media_type=media_type, headers=headers)


@router.get("/{name}/coverage", response_model=CoverageStats, responses=error_responses(401, 404, 422, 503))
def get_coverage(name: Name, catalog: CatalogDep, version: Version = None) -> CoverageStats:
    """Samples scored and skipped, token counts, lengths, shards, and runs still writing (`in_progress`).

    No ETag: runs in progress change while the version does not.
    """
    return catalog.coverage(name, version)


@router.get("/{name}/consistency", response_model=ConsistencyStats, responses={**_NOT_MODIFIED, **_VERSION_ERRORS})
def get_consistency(
    name: Name, catalog: CatalogDep, response: Response, version: Version = None, if_none_match: IfNoneMatch = None
) -> Any:
    """Fingerprints, the teacher-consistency verdict and the teacher log-prob distribution."""
    served, cached = _open_conditional(catalog, name, version, if_none_match, response)
    return cached if cached is not None else catalog.consistency(served.manifest.name, served.manifest.version)
