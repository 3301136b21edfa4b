"""Turning a finished run's parts into an immutable, versioned dataset.

Publishing checks that every planned part is present, intact and scored by the plan's teacher,
links the parts into a new version directory, writes the manifest last, and renames the whole
directory into place in one step. Readers see the old set of versions or the new one, never a
version without its manifest. Parts are hard-linked (not moved), so a crash while publishing
loses nothing: the staging area is deleted only after the version exists (and `.staging/` with
it once no run is left).

On object storage (no rename, no lock) the version number is claimed first with a conditional
write (`vN/.claim`, `If-None-Match: *`), the parts are copied into `vN/` server-side, and the
manifest, written last and again only if absent, is the commit point: a reader lists a version
only once its manifest exists, and exactly one manifest per version number can ever be written.
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

from lopd._faults import crash_point
from lopd.errors import Conflict, Corrupt, NotFound

from . import layout
from .atomic import atomic_write, fsync_dir
from .fs import ObjectPath, StoreDir, copy_file, file_size, put_if_absent, read_table
from .fs import sha256_file as sha256_file
from .manifest import Coverage, FileEntry, Manifest, manifest_bytes, now_utc, read_manifest, write_manifest
from .schema import ContentHasher, sample_schema, token_lengths
from .staging import RunPlan, Staging, check_part, list_staging_plans, missing_parts, remove_if_empty

_SKIPPED_SCHEMA = pa.schema([pa.field("sample_id", pa.string()), pa.field("reason", pa.string())])


@contextmanager
def dataset_lock(store: StoreDir, dataset: str) -> Iterator[None]:
    """An exclusive advisory lock per dataset: one publisher at a time (readers never take it); local stores only."""
    d = layout.dataset_dir(store, dataset)
    if isinstance(d, ObjectPath):
        raise TypeError("object storage has no locks: publishing there claims the version number instead")
    d.mkdir(parents=True, exist_ok=True)
    with open(d / layout.LOCK, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def published_versions(store: StoreDir, dataset: str) -> list[int]:
    d = layout.dataset_dir(store, dataset)
    if not d.is_dir():
        return []
    versions = []
    for p in d.iterdir():
        v = layout.parse_version_dir(p.name)
        if v is not None and (p / layout.MANIFEST).is_file():
            versions.append(v)
    return sorted(versions)


def find_published_run(store: StoreDir, dataset: str, run_key: str) -> Manifest | None:
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
    if isinstance(store, ObjectPath):
        return _publish_objects(staging, plan)
    with dataset_lock(store, dataset):
        existing = _published_or_complete(staging, plan)
        if existing is not None:
            return existing
        versions = published_versions(store, dataset)
        version = (versions[-1] + 1) if versions else 1
        ddir = layout.dataset_dir(store, dataset)
        assert isinstance(ddir, Path)
        tmp = ddir / f".tmp-{layout.version_dir_name(version)}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            manifest = _version_manifest(staging, plan, version, tmp)
            write_manifest(tmp / layout.MANIFEST, manifest)
            fsync_dir(tmp)
            os.rename(tmp, layout.version_dir(store, dataset, version))  # type: ignore[arg-type]
            fsync_dir(ddir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_staging(staging)
        return manifest


def _version_manifest(staging: Staging, plan: RunPlan, version: int, dest: StoreDir) -> Manifest:
    """Put the run's parts and skipped records into `dest` and return the manifest describing them."""
    files, prompt_tokens, content_hash = _link_parts(staging, plan, dest)
    skipped_entry = _write_skipped(plan, dest)
    return Manifest(
        name=staging.dataset,
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


def _published_or_complete(staging: Staging, plan: RunPlan) -> Manifest | None:
    """The run's manifest if it is already published (its staging removed); else None, once every part is there."""
    existing = find_published_run(staging.store, staging.dataset, plan.run_key)
    if existing is not None:
        _remove_staging(staging)
        return existing
    missing = missing_parts(staging, plan)
    if missing:
        raise Corrupt(f"cannot publish {staging.dataset!r}: parts {missing[:10]} of {len(plan.parts)} are missing")
    return None


def _publish_objects(staging: Staging, plan: RunPlan) -> Manifest:
    """`publish` on object storage: claim a version number, copy the parts, write the manifest if absent.

    Several workers of one run may publish at once (each finds every part present): they claim the
    same number (a claim names its run), copy byte-identical parts, and one manifest wins; the
    others return it. Another run racing for the same dataset takes the next number.
    """
    store, dataset = staging.store, staging.dataset
    existing = _published_or_complete(staging, plan)
    if existing is not None:
        return existing
    version = _claim_version(store, dataset, plan.run_key)
    vdir = layout.version_dir(store, dataset, version)
    try:
        manifest = _version_manifest(staging, plan, version, vdir)
    except (Corrupt, OSError):
        existing = find_published_run(store, dataset, plan.run_key)
        if existing is not None:  # a fellow worker published first and removed the staged parts
            return existing
        raise
    crash_point("before_manifest")
    manifest_path = vdir / layout.MANIFEST
    assert isinstance(manifest_path, ObjectPath)
    if not put_if_absent(manifest_path, manifest_bytes(manifest)):
        manifest = read_manifest(manifest_path)
        if manifest.run_key != plan.run_key:
            raise Conflict(f"{vdir} was published by run {manifest.run_key[:16]} although this run claimed it")
    _remove_staging(staging)
    return manifest


def _claim_version(store: StoreDir, dataset: str, run_key: str) -> int:
    """The version number this run publishes as: its own unfinished claim, or the next free one, claimed now."""
    ddir = layout.dataset_dir(store, dataset)
    taken = sorted(v for p in ddir.iterdir() if (v := layout.parse_version_dir(p.name)) is not None)
    for v in taken:  # a publisher of this run that died before its manifest: finish its version
        vdir = layout.version_dir(store, dataset, v)
        if not (vdir / layout.MANIFEST).exists() and _claim_owner(vdir) == run_key:
            return v
    candidate = (taken[-1] + 1) if taken else 1
    for _ in range(1000):
        claim = layout.version_dir(store, dataset, candidate) / layout.CLAIM
        assert isinstance(claim, ObjectPath)
        if put_if_absent(claim, run_key.encode()) or _claim_owner(claim.parent) == run_key:
            return candidate
        candidate += 1
    raise Conflict(f"could not claim a version number of {dataset!r}: too many publishers at once")


def _claim_owner(vdir: StoreDir) -> str | None:
    try:
        return (vdir / layout.CLAIM).read_text()
    except OSError:
        return None


def _remove_staging(staging: Staging) -> None:
    """Remove a published run's staging directory, and `.staging/` when no other run is left in it."""
    if isinstance(staging.dir, ObjectPath):
        staging.dir.rmtree()
        return
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


def finalize(store: StoreDir, dataset: str) -> list[FinalizeResult]:
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


def _link_parts(staging: Staging, plan: RunPlan, dest: StoreDir) -> tuple[list[FileEntry], int, str]:
    """Link (on object storage: copy) every part into `dest`; their file entries, prompt tokens and content hash."""
    files: list[FileEntry] = []
    first_index = 0
    prompt_tokens = 0
    content = ContentHasher(sample_schema(plan.provenance.top_k))
    for part in plan.parts:
        src = staging.part_path(part.index)
        check_part(src, part, plan)
        dst = dest / layout.part_name(part.index)
        if isinstance(dst, ObjectPath):
            copy_file(src, dst)
            data = dst.read_bytes()  # what was copied, read once for both hashes
            table = pq.read_table(pa.BufferReader(data), columns=list(content.schema.names))
            digest, size = hashlib.sha256(data).hexdigest(), len(data)
        else:
            try:
                os.link(src, dst)  # type: ignore[arg-type]
            except OSError:  # filesystems without hard links
                shutil.copy2(src, dst)  # type: ignore[arg-type]
            table = read_table(dst, columns=list(content.schema.names))
            digest, size = sha256_file(dst), file_size(dst)
        content.update(table)
        prompt_lengths, response_lengths = token_lengths(table)
        response_tokens = int(response_lengths.sum())
        prompt_tokens += int(prompt_lengths.sum())
        files.append(
            FileEntry(
                path=dst.name,
                sha256=digest,
                bytes=size,
                num_samples=part.num_samples,
                num_response_tokens=response_tokens,
                first_index=first_index,
            )
        )
        first_index += part.num_samples
    return files, prompt_tokens, content.hexdigest()


def _write_skipped(plan: RunPlan, dest: StoreDir) -> FileEntry | None:
    if not plan.skipped:
        return None
    path = dest / layout.SKIPPED
    ids, reasons = zip(*plan.skipped)
    table = pa.table([list(ids), list(reasons)], schema=_SKIPPED_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return FileEntry(
        path=path.name,
        sha256=sha256_file(path),
        bytes=file_size(path),
        num_samples=len(ids),
        num_response_tokens=0,
        first_index=0,
    )
