"""Small client-side views of the server's JSON answers.

The client depends on the HTTP contract (`lopd.http_contract`, docs/http-api.md) only, not on
the server's or the store's Python models, so it parses the few fields it needs into these plain
dataclasses and keeps the full JSON in `raw` for anything else. Unknown fields are ignored, so a
server that adds fields does not break an older client (which is why the contract's strict
pydantic models, made for the server's OpenAPI schema, are not used to parse here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lopd.http_contract import (
    INDEX,
    PROMPT_IDS,
    RESPONSE_IDS,
    ROLLOUT_LOGPROBS,
    SAMPLE_ID,
    TEACHER_LOGPROBS,
    TOPK_COLUMNS,
)

from .errors import ProtocolError


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _require(d: dict[str, Any], key: str, what: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ProtocolError(f"{what} has no {key!r} field; is the server speaking HTTP API v1?")
    return d[key]


@dataclass(frozen=True)
class DatasetInfo:
    """What a training job must know about one dataset version before it fetches a sample.

    Built from either a `Manifest` (GET /v1/datasets/{name}) or a `DatasetSummary` (an entry of
    GET /v1/datasets); both carry the identity (`content_hash`) and the provenance fingerprints
    that the consistency check compares.
    """

    name: str
    version: int
    content_hash: str
    num_samples: int
    num_response_tokens: int
    teacher_fingerprint: str | None
    tokenizer_fingerprint: str | None
    sft_teacher_fingerprint: str | None
    verdict: str  # "consistent" | "inconsistent"
    mismatch_allowed: bool = False
    temperature: float | None = None
    top_k: int = 0  # K of the stored teacher top-k (0: none; only a manifest says)
    versions: tuple[int, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetInfo:
        """Parse a manifest or a dataset summary (the two shapes differ only in where fields sit)."""
        what = "the dataset description"
        if "provenance" in data:  # a full manifest
            prov = data["provenance"]
            consistent = _get(prov, "consistency", "teacher_consistent")
            verdict = "inconsistent" if consistent is False else ("consistent" if consistent else "unknown")
            return cls(
                name=str(_require(data, "name", what)),
                version=int(_require(data, "version", what)),
                content_hash=str(_require(data, "content_hash", what)),
                num_samples=int(_require(data, "num_samples", what)),
                num_response_tokens=int(data.get("num_response_tokens", 0)),
                teacher_fingerprint=_get(prov, "teacher", "fingerprint"),
                tokenizer_fingerprint=_get(prov, "tokenizer_fingerprint"),
                sft_teacher_fingerprint=_get(prov, "sft_teacher_fingerprint"),
                verdict=verdict,
                mismatch_allowed=bool(_get(prov, "consistency", "mismatch_allowed", default=False)),
                temperature=_get(prov, "temperature"),
                top_k=int(_get(prov, "top_k", default=0) or 0),
                raw=data,
            )
        return cls(  # a DatasetSummary (no routes: only a manifest says)
            name=str(_require(data, "name", what)),
            version=int(_require(data, "version", what)),
            content_hash=str(_require(data, "content_hash", what)),
            num_samples=int(_require(data, "num_samples", what)),
            num_response_tokens=int(data.get("num_response_tokens", 0)),
            teacher_fingerprint=_get(data, "teacher", "fingerprint"),
            tokenizer_fingerprint=data.get("tokenizer_fingerprint"),
            sft_teacher_fingerprint=data.get("sft_teacher_fingerprint"),
            verdict=str(data.get("verdict", "unknown")),
            versions=tuple(int(v) for v in data.get("versions", ())),
            raw=data,
        )

    @property
    def routes(self) -> list[dict[str, Any]]:
        """A multi-teacher dataset's routes (`provenance.routes` of its manifest: key, teacher, consistency,
        start, num_samples); [] for one teacher or when built from a summary."""
        routes = (self.raw.get("provenance") or {}).get("routes") if isinstance(self.raw, dict) else None
        return [r for r in routes if isinstance(r, dict)] if isinstance(routes, list) else []

    def teacher_indices(self, teachers: Sequence[str]) -> np.ndarray:
        """The dataset indices of the samples scored by the routed teachers `teachers` (keys of `routes`), sorted.

        Raises `ValueError` naming the dataset's teachers when one is unknown or the dataset has one teacher.
        """
        by_key = {str(r.get("key")): r for r in self.routes}
        unknown = [t for t in teachers if t not in by_key]
        if unknown:
            known = ", ".join(repr(k) for k in by_key) or "none: it was built with one teacher"
            raise ValueError(
                f"dataset {self.name!r} v{self.version} has no routed teacher {unknown[0]!r} (its teachers: {known})"
            )
        spans = [np.arange(int(by_key[t]["start"]), int(by_key[t]["start"]) + int(by_key[t]["num_samples"]))
                 for t in teachers]  # fmt: skip
        return np.unique(np.concatenate(spans)) if spans else np.empty(0, np.int64)


@dataclass(frozen=True)
class SampleArrays:
    """A served sample (the contract's JSON `Sample`) decoded into numpy arrays in their stored dtypes.

    Its fields are the `Sample` fields, same names and order.
    """

    index: int | None
    sample_id: str
    prompt_ids: np.ndarray  # int32
    response_ids: np.ndarray  # int32
    teacher_logprobs: np.ndarray  # float32, one per response token
    rollout_logprobs: np.ndarray | None  # float32 or absent
    teacher_topk_ids: np.ndarray | None = None  # int32 [len(response), K], when asked for
    teacher_topk_logprobs: np.ndarray | None = None  # float32 [len(response), K], when asked for

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleArrays:
        # JSON carries each float32 as the shortest decimal that round-trips to it, so parsing
        # straight to float32 recovers the stored bits exactly.
        rollout = data.get(ROLLOUT_LOGPROBS)
        try:
            n = len(data[RESPONSE_IDS])
            topk = {
                name: np.asarray(data[name], dtype=dtype).reshape(n, -1)
                for name, dtype in zip(TOPK_COLUMNS, (np.int32, np.float32))
                if data.get(name) is not None
            }
            return cls(
                index=data.get(INDEX),
                sample_id=str(data[SAMPLE_ID]),
                prompt_ids=np.asarray(data[PROMPT_IDS], dtype=np.int32),
                response_ids=np.asarray(data[RESPONSE_IDS], dtype=np.int32),
                teacher_logprobs=np.asarray(data[TEACHER_LOGPROBS], dtype=np.float32),
                rollout_logprobs=None if rollout is None else np.asarray(rollout, dtype=np.float32),
                **topk,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed sample in a JSON answer: {e}") from e
