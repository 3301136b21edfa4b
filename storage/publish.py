"""Turning a finished run's parts into an immutable, versioned dataset.

Publishing checks that every planned part is present, intact and scored by the plan's teacher,
links the parts into a new version directory, writes the manifest last, and renames the whole
directory into place in one step. Readers see the old set of versions or the new one, never a
version without its manifest. Parts are hard-linked (not moved), so a crash while publishing
loses nothing: the staging area is deleted only after the version exists (and `.staging/` with
it once no run is left).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lopd.errors import Corrupt, NotFound

from . import layout
from .atomic import atomic_write, fsync_dir
from .manifest import Coverage, FileEntry, Manifest, now_utc, read_manifest, write_manifest
from .schema import COLUMNS, ContentHasher, token_lengths
from .staging import RunPlan, Staging, check_part, list_staging_plans, missing_parts, remove_if_empty

_SKIPPED_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("reason", pa.string())])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def dataset_lock(store: Path, dataset: str) -> Iterator[None]:
    """An exclusive advisory lock per dataset: one publisher at a time (readers never take it)."""
    d = layout.dataset_dir(store, dataset)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / layout.LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def published_versions(store: Path, dataset: str) -> list[int]:
    d = layout.dataset_dir(store, dataset)
    if not d.is_dir():
        return []
    versions = []
    for p in d.iterdir():
        v = layout.parse_version_dir(p.name)
        if v is not None and (p / layout.MANIFEST).is_file():
            versions.append(v)
    return sorted(versions)


def find_published_run(store: Path, dataset: str, run_key: str) -> Manifest | None:
    for v in reversed(published_versions(store, dataset)):
        m = read_manifest(layout.version_dir(store, dataset, v) / layout.MANIFEST)
        if m.run_key == run_key:
            return m
    return None


def reason_category(reason: str) -> str:
    """Group free-text reasons: numbers and quoted values are what differs between records."""
    reason = re.sub(r"'[^']*'|\"[^\"]*\"", "…", reason)
    return re.sub(r"-?\d+(\.\d+)?", "N", reason)


def publish(staging: Staging, plan: RunPlan) -> Manifest:
    """Publish the run as the dataset's next version (idempotent: a published run is returned as is)."""
    store, dataset = staging.store, staging.dataset
    with dataset_lock(store, dataset):
        existing = find_published_run(store, dataset, plan.run_key)
        if existing is not None:
            _remove_staging(staging)
            return existing
        missing = missing_parts(staging, plan)
        if missing:
            raise Corrupt(f"cannot publish {dataset!r}: parts {missing[:10]} of {len(plan.parts)} are missing")
        versions = published_versions(store, dataset)
        version = (versions[-1] + 1) if versions else 1
        ddir = layout.dataset_dir(store, dataset)
        tmp = ddir / f".tmp-{layout.version_dir_name(version)}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files, prompt_tokens, content_hash = _link_parts(staging, plan, tmp)
            skipped_entry = _write_skipped(plan, tmp)
            manifest = Manifest(
                name=dataset,
                version=version,
                content_hash=content_hash,
                run_key=plan.run_key,
                created_at=now_utc(),
                num_samples=sum(f.num_samples for f in files),
                num_prompt_tokens=prompt_tokens,
                num_response_tokens=sum(f.num_response_tokens for f in files),
                files=files,
                coverage=Coverage(
                    input_records=plan.input_records,
                    scored=plan.num_samples,
                    skipped=len(plan.skipped),
                    skipped_by_reason=dict(Counter(reason_category(r) for _, r in plan.skipped)),
                    skipped_file=skipped_entry,
                ),
                provenance=plan.provenance,
            )
            write_manifest(tmp / layout.MANIFEST, manifest)
            fsync_dir(tmp)
            os.rename(tmp, layout.version_dir(store, dataset, version))
            fsync_dir(ddir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_staging(staging)
        return manifest


def _remove_staging(staging: Staging) -> None:
    """Remove a published run's staging directory, and `.staging/` when no other run is left in it."""
    shutil.rmtree(staging.dir, ignore_errors=True)
    remove_if_empty(staging.dir.parent)


@dataclass(frozen=True)
class FinalizeResult:
    """What `finalize` did with one unfinished run."""

    run_key: str
    parts_total: int
    parts_missing: list[int]
    manifest: Manifest | None  # the published version; None while parts are missing

    def __str__(self) -> str:
        """One line for people: the version published, or how many parts are still missing."""
        if self.manifest is None:
            return f"run {self.run_key[:16]}: {len(self.parts_missing)} of {self.parts_total} parts still missing"
        m = self.manifest
        return f"published: {m.name} v{m.version}: {m.num_samples} samples"


def finalize(store: Path, dataset: str) -> list[FinalizeResult]:
    """Publish every unfinished run of `dataset` whose parts all exist (for runs whose workers did not publish).

    One result per run, in staging order; `str(result)` is the line `lopd finalize` prints. Runs
    with parts still missing are left as they are. Raises `NotFound` when the dataset has no
    unfinished run, and `Corrupt` when a complete run's part is damaged (see `publish`).
    """
    plans = list_staging_plans(store, dataset)
    if not plans:
        raise NotFound(f"no unfinished run of {dataset!r} in {store}")
    results = []
    for _, plan in plans:
        staging = Staging(store, dataset, plan.run_key)
        with staging.hold():  # a worker's lock: gc leaves the run alone meanwhile
            missing = missing_parts(staging, plan)
            manifest = None if missing else publish(staging, plan)
        results.append(FinalizeResult(plan.run_key, len(plan.parts), missing, manifest))
    return results


def _link_parts(staging: Staging, plan: RunPlan, dest: Path) -> tuple[list[FileEntry], int, str]:
    """Link every part into `dest`; their file entries, the prompt tokens and the content hash."""
    files: list[FileEntry] = []
    first_index = 0
    prompt_tokens = 0
    content = ContentHasher()
    for part in plan.parts:
        src = staging.part_path(part.index)
        check_part(src, part, plan)
        dst = dest / layout.part_name(part.index)
        try:
            os.link(src, dst)
        except OSError:  # filesystems without hard links
            shutil.copy2(src, dst)
        table = pq.read_table(dst, columns=list(COLUMNS))
        content.update(table)
        prompt_lengths, response_lengths = token_lengths(table)
        response_tokens = int(response_lengths.sum())
        prompt_tokens += int(prompt_lengths.sum())
        files.append(
            FileEntry(
                path=dst.name,
                sha256=sha256_file(dst),
                bytes=dst.stat().st_size,
                num_samples=part.num_samples,
                num_response_tokens=response_tokens,
                first_index=first_index,
            )
        )
        first_index += part.num_samples
    return files, prompt_tokens, content.hexdigest()


def _write_skipped(plan: RunPlan, dest: Path) -> FileEntry | None:
    if not plan.skipped:
        return None
    path = dest / layout.SKIPPED
    ids, reasons = zip(*plan.skipped)
    table = pa.table([list(ids), list(reasons)], schema=_SKIPPED_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return FileEntry(
        path=path.name,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        num_samples=len(ids),
        num_response_tokens=0,
        first_index=0,
    )
