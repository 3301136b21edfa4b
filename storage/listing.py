"""`lopd ls`: what a store holds, from manifests and staging directories only (no shard is read).

Per dataset: every published version with its size (bytes, samples, tokens), its teacher
consistency verdict and who is reading it; and every run in staging with its progress. Per store:
the reader leases. The models are the `--json` form.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lopd.errors import LopdError

from . import layout
from .manifest import verdict_explanation
from .reader import Store, read_version_manifest
from .readers import Lease, read_leases, versions_being_read
from .staging import staged_runs


class VersionListing(BaseModel):
    version: int
    created_at: datetime | None
    bytes: int
    num_samples: int
    num_prompt_tokens: int
    num_response_tokens: int
    verdict: Literal["consistent", "inconsistent"] | None
    verdict_explanation: str
    content_hash: str | None
    read_by: list[str]  # live reader leases that read it recently (gc keeps it)
    problem: str | None = None  # an unreadable manifest


class RunListing(BaseModel):
    run_key: str  # the staging directory's name (the run key's first 16 hex digits)
    parts_done: int
    parts_total: int | None  # None: the run has no readable plan
    samples_done: int
    samples_total: int | None
    last_activity: datetime | None
    worker_alive: bool  # a worker holds the run's lock


class DatasetListing(BaseModel):
    name: str
    versions: list[VersionListing]
    in_progress: list[RunListing]


class ReaderListing(BaseModel):
    lease: str
    host: str | None
    pid: int | None
    live: bool
    expires_at: datetime | None
    reading: list[str]  # "dataset vN"


class StoreListing(BaseModel):
    store: str
    datasets: list[DatasetListing]
    readers: list[ReaderListing]


def list_store(store: str | Path, now: float | None = None) -> StoreListing:
    """Datasets (published or with a run in staging), their versions and runs, and the store's readers."""
    root = layout.local_store(store, "lopd ls")
    t = time.time() if now is None else now
    reading = versions_being_read(root, t)
    s = Store(root)
    names = sorted(set(s.datasets()) | set(s.unpublished()))
    return StoreListing(
        store=str(root),
        datasets=[_dataset(root, name, s.versions(name) if name in s.datasets() else [], reading) for name in names],
        readers=[_reader(path, lease, t) for path, lease in read_leases(root).items()],
    )


def _dataset(root: Path, name: str, versions: list[int], reading: dict[tuple[str, int], list[str]]) -> DatasetListing:
    out = []
    for v in versions:
        read_by = reading.get((name, v), [])
        try:
            m = read_version_manifest(root, name, v)
        except (LopdError, OSError) as e:
            out.append(
                VersionListing(
                    version=v, created_at=None, bytes=0, num_samples=0, num_prompt_tokens=0, num_response_tokens=0,
                    verdict=None, verdict_explanation="", content_hash=None, read_by=read_by, problem=str(e),
                )
            )  # fmt: skip
            continue
        files = list(m.files) + ([m.coverage.skipped_file] if m.coverage.skipped_file else [])
        out.append(
            VersionListing(
                version=v,
                created_at=m.created_at,
                bytes=sum(f.bytes for f in files),
                num_samples=m.num_samples,
                num_prompt_tokens=m.num_prompt_tokens,
                num_response_tokens=m.num_response_tokens,
                verdict=m.provenance.consistency.verdict,
                verdict_explanation=verdict_explanation(m.provenance),
                content_hash=m.content_hash,
                read_by=read_by,
            )
        )
    runs = [
        RunListing(
            run_key=r.path.name,
            parts_done=len(r.parts_done),
            parts_total=len(r.plan.parts) if r.plan else None,
            samples_done=sum(r.plan.parts[i].num_samples for i in r.parts_done) if r.plan else 0,
            samples_total=r.plan.num_samples if r.plan else None,
            last_activity=_utc(r.last_activity) if r.last_activity else None,
            worker_alive=r.locked,
        )
        for r in staged_runs(root, name)
    ]
    return DatasetListing(name=name, versions=out, in_progress=runs)


def _reader(path: Path, lease: Lease | None, now: float) -> ReaderListing:
    if lease is None:
        return ReaderListing(lease=path.stem, host=None, pid=None, live=False, expires_at=None, reading=[])
    return ReaderListing(
        lease=path.stem,
        host=lease.host,
        pid=lease.pid,
        live=lease.live(now),
        expires_at=lease.expires_at,
        reading=[f"{d} v{v}" for d, v in sorted(lease.being_read(now))],
    )


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc).replace(microsecond=0)
