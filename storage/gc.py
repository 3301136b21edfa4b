"""`lopd gc`: remove a dataset's old versions and abandoned runs, never what someone reads or writes.

What goes:
- **versions** but the `keep` newest (`keep` >= 1: never the newest), unless being read: listed by
  a live reader lease (`storage.readers`: a `lopd serve` that served it recently);
- **runs in staging** that are abandoned: no worker holds the run's lock (`Staging.hold`; a lock
  goes with its process, even after `kill -9`), nothing written in it for `staging_older_than_s`,
  and not complete (a complete run waits for `lopd finalize`, it is never thrown away);
- **leftovers**: tombstones of an interrupted gc, temporaries of a publisher that died (`.tmp-*`
  in the dataset directory: under the dataset lock no publisher is running), expired lease files.

How, crash-safely: under the dataset lock (publishers and other gc runs of the dataset wait), a
version is renamed to a tombstone (`.gc-v3-<random>`) in one step: from then on it is not a
version, so a reader listing the store no longer sees it, while files already open stay readable
(POSIX). The leases are then read again, and a version a reader registered for meanwhile is
renamed back; otherwise the tombstone's manifest is deleted, then the rest. A crash leaves a
tombstone, which no reader lists: the next gc deletes it, or, if it still has its manifest (so is
whole) and a reader now wants that version, renames it back. Runs go the same way, renamed while gc
holds their lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lopd.errors import InvalidInput, NotFound

from . import layout
from .atomic import TMP_PREFIX, fsync_dir
from .fs import entries
from .publish import dataset_lock, published_versions
from .reader import Store
from .readers import read_leases, versions_being_read
from .staging import lock_exclusive, remove_if_empty, staged_runs

DEFAULT_STAGING_AGE_S = 7 * 24 * 3600.0


class GcItem(BaseModel):
    """One thing gc looked at: what it is, where, how big, and why it goes or stays."""

    kind: Literal["version", "run", "tombstone", "temporary", "lease"]
    name: str = ""
    path: str = ""  # relative to the store
    bytes: int = 0
    reason: str = ""


class GcReport(BaseModel):
    dataset: str
    keep: int
    dry_run: bool
    removed: list[GcItem]  # with `dry_run`: what would be removed
    kept: list[GcItem]

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.removed)


def collect_garbage(
    store: str | Path,
    dataset: str,
    *,
    keep: int,
    staging_older_than_s: float = DEFAULT_STAGING_AGE_S,
    dry_run: bool = False,
    now: float | None = None,
) -> GcReport:
    """Remove what `dataset` no longer needs (see the module docstring); with `dry_run`, only say what.

    `now` (epoch seconds) replaces the clock, for tests. Raises `InvalidInput` for `keep` < 1 and
    `NotFound` for a store or dataset that does not exist.
    """
    if keep < 1:
        raise InvalidInput(f"--keep is {keep}; it must be at least 1: gc never removes a dataset's newest version")
    if staging_older_than_s < 0:
        raise InvalidInput("--staging-older-than must not be negative")
    root = layout.local_store(store, "lopd gc")
    Store(root)  # NotFound unless it is a store
    ddir = layout.dataset_dir(root, dataset)
    if not ddir.is_dir():
        raise NotFound(f"no dataset {dataset!r} in store {root}; datasets: {Store(root).datasets()}")

    def clock() -> float:
        return time.time() if now is None else now

    report = GcReport(dataset=dataset, keep=keep, dry_run=dry_run, removed=[], kept=[])
    try:
        with contextlib.nullcontext() if dry_run else dataset_lock(root, dataset):
            _versions(root, dataset, keep, dry_run, clock, report)
            _runs(root, dataset, staging_older_than_s, dry_run, clock(), report)
            _leftovers(root, dataset, dry_run, clock(), report)
        _leases(root, dry_run, clock(), report)
    except OSError as e:  # a read-only store, permissions: stop; a half-removed version is left as a tombstone
        done = ", ".join(i.name for i in report.removed) or "nothing"
        raise InvalidInput(
            f"gc of {dataset!r} stopped ({e}); removed so far: {done}. Run it again as a user who can write "
            "the store (an interrupted removal leaves a tombstone, which is no version and goes next time)"
        ) from e
    return report


def _versions(root: Path, dataset: str, keep: int, dry_run: bool, clock: Callable[[], float], report: GcReport) -> None:
    versions = published_versions(root, dataset)
    newest = set(versions[-keep:])
    reading = versions_being_read(root, clock())
    for v in versions:
        vdir = layout.version_dir(root, dataset, v)
        item = GcItem(kind="version", name=f"v{v}", path=_rel(root, vdir))
        readers = reading.get((dataset, v))
        if v in newest:
            reason = "the newest version" if v == versions[-1] else f"one of the {keep} newest versions"
            report.kept.append(item.model_copy(update={"reason": reason}))
        elif readers:
            report.kept.append(item.model_copy(update={"reason": f"being read ({', '.join(readers)})"}))
        else:
            older = f"older than the {keep} newest" if keep > 1 else "not the newest"
            item = item.model_copy(update={"bytes": _size(vdir), "reason": older})
            if dry_run:
                report.removed.append(item)
                continue
            tomb = layout.tombstone_for(vdir)
            os.rename(vdir, tomb)
            fsync_dir(vdir.parent)
            late = versions_being_read(root, clock()).get((dataset, v))
            if late:  # a reader registered between the first look and the rename: it keeps the version
                os.rename(tomb, vdir)
                fsync_dir(vdir.parent)
                report.kept.append(item.model_copy(update={"bytes": 0, "reason": f"being read ({', '.join(late)})"}))
                continue
            (tomb / layout.MANIFEST).unlink()  # first: a tombstone with its manifest is still whole
            shutil.rmtree(tomb)
            report.removed.append(item)


def _runs(root: Path, dataset: str, older_than_s: float, dry_run: bool, now: float, report: GcReport) -> None:
    for run in staged_runs(root, dataset):
        done = f" ({len(run.parts_done)}/{len(run.plan.parts)} parts)" if run.plan is not None else " (no plan)"
        item = GcItem(kind="run", name=run.path.name + done, path=_rel(root, run.path))
        idle = now - run.last_activity
        if run.locked:
            report.kept.append(item.model_copy(update={"reason": "a worker is writing it"}))
        elif run.complete:
            reason = f"complete but not published: run `lopd finalize STORE --dataset {dataset}`"
            report.kept.append(item.model_copy(update={"reason": reason}))
        elif idle < older_than_s:
            reason = f"last written {_duration(idle)} ago (abandoned after {_duration(older_than_s)})"
            report.kept.append(item.model_copy(update={"reason": reason}))
        else:
            item = item.model_copy(update={"bytes": _size(run.path), "reason": f"abandoned: {_duration(idle)} idle"})
            if dry_run:
                report.removed.append(item)
                continue
            try:
                lock = lock_exclusive(run.path)
            except FileNotFoundError:
                continue  # gone meanwhile
            if lock is None:
                report.kept.append(item.model_copy(update={"bytes": 0, "reason": "a worker started on it"}))
                continue
            with lock:  # held across the rename: a worker arriving now waits, then starts a fresh directory
                tomb = layout.tombstone_for(run.path)
                os.rename(run.path, tomb)
                fsync_dir(run.path.parent)
            shutil.rmtree(tomb, ignore_errors=True)
            report.removed.append(item)
    staging = layout.staging_root(root, dataset)
    if not dry_run:
        remove_if_empty(staging)


def _leftovers(root: Path, dataset: str, dry_run: bool, now: float, report: GcReport) -> None:
    ddir = layout.dataset_dir(root, dataset)
    staging = layout.staging_root(root, dataset)
    reading = versions_being_read(root, now)
    found: list[tuple[Path, Literal["tombstone", "temporary"], str]] = []
    for directory in (ddir, staging):
        if not directory.is_dir():
            continue
        for p in entries(directory):
            origin = layout.tombstone_origin(p.name) if directory == ddir else None
            version = layout.parse_version_dir(origin) if origin else None
            vdir = layout.version_dir(root, dataset, version) if version is not None else p
            if (
                version is not None
                and (dataset, version) in reading
                and (p / layout.MANIFEST).is_file()
                and not vdir.exists()
            ):
                # A gc killed between moving a version aside and its second look at the leases: the
                # version is whole (its manifest goes first when it is deleted) and a reader wants it.
                if not dry_run:
                    os.rename(p, vdir)
                    fsync_dir(ddir)
                reason = f"restored from a tombstone: being read ({', '.join(reading[(dataset, version)])})"
                report.kept.append(GcItem(kind="version", name=f"v{version}", path=_rel(root, vdir), reason=reason))
            elif layout.is_tombstone(p.name):
                found.append((p, "tombstone", "left by an interrupted gc"))
            elif directory == ddir and p.name.startswith(TMP_PREFIX):
                found.append((p, "temporary", "left by a publisher that did not finish"))
    for p, kind, reason in found:
        report.removed.append(GcItem(kind=kind, name=p.name, path=_rel(root, p), bytes=_size(p), reason=reason))
        if not dry_run:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
    if not dry_run:
        remove_if_empty(staging)


def _leases(root: Path, dry_run: bool, now: float, report: GcReport) -> None:
    for path, lease in read_leases(root).items():
        if lease is None or lease.live(now):
            continue
        reason = f"expired at {lease.expires_at:%Y-%m-%d %H:%M:%S}Z (a reader that stopped without removing it)"
        report.removed.append(GcItem(kind="lease", name=path.name, path=_rel(root, path), reason=reason))
        if not dry_run:
            path.unlink(missing_ok=True)


def _rel(root: Path, path: Path) -> str:
    return str(path.relative_to(root))


def _size(path: Path) -> int:
    """Bytes of the files under `path` (a file: its size); what vanishes meanwhile counts 0."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
    except FileNotFoundError:
        return 0
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}".replace(".0" + unit, unit)
    return f"{s}s"
