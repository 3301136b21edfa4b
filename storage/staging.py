"""An unfinished precompute run: its plan and the parts finished so far.

The plan fixes, before any scoring, which samples go into which part. Parts are the unit of work
and of resumption: each is written atomically, so after a crash (even `kill -9` mid-write) a part
either exists complete or not at all, and a re-run scores exactly the missing ones. Because the
plan depends only on the inputs and settings (the run key), never on how many workers run or
where a crash happened, every way of running the job produces the same parts.

Every worker of a run holds a shared lock on the run's `.lock` file while it works (`Staging.hold`),
so `lopd gc` can tell a run someone is writing from an abandoned one: the lock goes with the process,
even after `kill -9`. Object storage has no such locks: there the cluster scheduler runs each worker
index once (a Slurm array task, a Kubernetes Indexed Job pod), and two copies of one worker would
only write the same bytes twice (docs/store-format.md, "On object storage").
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from lopd._faults import crash_point
from lopd.errors import Conflict, Corrupt, InvalidInput

from . import layout
from .atomic import atomic_write, atomic_write_bytes, remove_stale_tmp
from .fs import StoreDir, entries, is_object, parquet_file
from .manifest import Provenance
from .schema import (
    FORMAT_VERSION,
    META_FORMAT,
    META_PART,
    META_RUN_KEY,
    META_SCORED_WITH,
    META_TEACHER,
    write_options,
)

log = logging.getLogger(__name__)


class PartPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    index: int
    num_samples: int
    ids_sha256: str


class RunPlan(BaseModel):
    """Everything a worker needs to agree with every other worker of the same run."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    format_version: int = FORMAT_VERSION
    run_key: str
    dataset: str
    samples_per_part: int
    num_samples: int
    input_records: int
    parts: list[PartPlan]
    skipped: list[tuple[str, str]]
    provenance: Provenance

    @classmethod
    def build(
        cls,
        *,
        run_key: str,
        dataset: str,
        sample_ids: Sequence[str],
        samples_per_part: int,
        input_records: int,
        skipped: Sequence[tuple[str, str]],
        provenance: Provenance,
    ) -> RunPlan:
        """The plan of a run scoring `sample_ids` (in dataset order), split into parts of `samples_per_part`."""
        return cls(
            run_key=run_key,
            dataset=dataset,
            samples_per_part=samples_per_part,
            num_samples=len(sample_ids),
            input_records=input_records,
            parts=plan_parts(sample_ids, samples_per_part),
            skipped=list(skipped),
            provenance=provenance,
        )

    def part_rows(self, index: int) -> slice:
        """Where part `index`'s samples are in the run's sample order (the order of `build`'s `sample_ids`)."""
        start = index * self.samples_per_part
        return slice(start, start + self.parts[index].num_samples)

    def parts_of_worker(self, worker: int, num_workers: int) -> list[PartPlan]:
        """The parts worker `worker` of `num_workers` scores: index % num_workers == worker (round-robin)."""
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} of {num_workers}: the index must be in 0..num_workers-1")
        return [p for p in self.parts if p.index % num_workers == worker]


def ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()


def plan_parts(sample_ids: Sequence[str], samples_per_part: int) -> list[PartPlan]:
    if samples_per_part < 1:
        raise ValueError(f"samples_per_part is {samples_per_part}; it must be at least 1")
    return [
        PartPlan(
            index=k,
            num_samples=len(sample_ids[s : s + samples_per_part]),
            ids_sha256=ids_digest(sample_ids[s : s + samples_per_part]),
        )
        for k, s in enumerate(range(0, len(sample_ids), samples_per_part))
    ]


def ensure_store(store: StoreDir) -> None:
    """Create the store directory and its marker if needed (idempotent, safe under races); URLs are refused."""
    layout.check_store_path(store)
    store.mkdir(parents=True, exist_ok=True)
    marker = store / layout.STORE_MARKER
    if not marker.exists():
        atomic_write_bytes(marker, f'{{"format_version": {FORMAT_VERSION}}}\n'.encode())


class Staging:
    """The staging directory of one run (`<dataset>/.staging/<run-key>/`)."""

    def __init__(self, store: StoreDir, dataset: str, run_key: str) -> None:
        self.store = store
        self.dataset = dataset
        self.run_key = run_key
        self.dir = layout.staging_dir(store, dataset, run_key)

    def part_path(self, index: int) -> StoreDir:
        return self.dir / layout.part_name(index)

    def hold(self) -> IO[str]:
        """Create the run's directory and hold a shared lock on it until the returned file is closed.

        Every worker holds one while it works, so `lopd gc` (which needs the lock exclusively) never
        removes a run a live worker is writing. If gc moved the directory away while this waited, the
        lock is taken again on a fresh directory.
        """
        ensure_store(self.store)
        if is_object(self.dir):
            return io.StringIO()  # no locks on object storage (and no gc of staging there): a handle to close
        for _ in range(100):
            make_dirs(self.dir)
            path = self.dir / layout.LOCK
            try:
                f = open(path, "a+")
            except FileNotFoundError:  # removed between mkdir and open
                continue
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            try:
                here = os.stat(path)
                mine = os.fstat(f.fileno())
                same = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return f
            f.close()
        raise Conflict(f"could not hold staging directory {self.dir}: it keeps being removed (by `lopd gc`?)")

    def claim_worker(self, worker: int) -> IO[str]:
        """Hold worker `worker`'s exclusive lock of this run until the returned file is closed (call after `hold`).

        Raises `Conflict` when another live process holds it: a second identical job (same run, same
        worker index) would score the same parts again and race the first one's publish. On object
        storage nothing is held: the scheduler starts each index once (see the module docstring).
        """
        if is_object(self.dir):
            return io.StringIO()
        f = open(self.dir / layout.worker_lock_name(worker), "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise Conflict(
                f"another precompute job is already working as worker {worker} of this run "
                f"({self.dataset}, run {self.run_key[:16]}); wait for it to finish (it publishes the dataset), "
                "or give this job another --worker-index if the work is meant to be split"
            ) from None
        return f

    def open(self, plan: RunPlan) -> RunPlan:
        """Create the staging area with `plan`, or check that the one already there is the same plan."""
        ensure_store(self.store)
        make_dirs(self.dir)
        remove_stale_tmp(self.dir)
        plan_path = self.dir / layout.PLAN
        if plan_path.exists():
            existing = read_plan(plan_path)
            # Provenance paths may differ between workers (other mounts, other cwd); what must agree is
            # the run key (inputs and settings) and the partition of samples into parts.
            same = (existing.run_key, existing.parts, existing.skipped) == (plan.run_key, plan.parts, plan.skipped)
            if not same:
                raise Conflict(
                    f"{plan_path} holds a different plan for run {self.run_key[:16]}; "
                    "the inputs changed under the same settings. Remove that directory to start over."
                )
            return existing
        atomic_write_bytes(plan_path, plan.model_dump_json(indent=1).encode())
        return plan

    def completed_parts(self, plan: RunPlan) -> set[int]:
        """Indices of parts already written and intact; a damaged part is deleted so it is redone."""
        done: set[int] = set()
        for part in plan.parts:
            path = self.part_path(part.index)
            if not path.exists():
                continue
            try:
                check_part(path, part, plan)
            except Corrupt as e:
                log.warning("discarding damaged part, it will be scored again: %s", e)
                path.unlink(missing_ok=True)
                continue
            done.add(part.index)
        return done

    def write_part(
        self, index: int, table: pa.Table, teacher_fingerprint: str, scored_with: Mapping[str, object] | None = None
    ) -> StoreDir:
        """Write part `index` atomically; `scored_with` (batch budgets, ...) goes into its footer when given."""
        meta = {
            META_FORMAT: str(FORMAT_VERSION).encode(),
            META_RUN_KEY: self.run_key.encode(),
            META_TEACHER: teacher_fingerprint.encode(),
            META_PART: str(index).encode(),
        }
        if scored_with:
            meta[META_SCORED_WITH] = json.dumps(dict(scored_with), sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        path = self.part_path(index)

        def write(tmp: Path) -> None:
            pq.write_table(table, tmp, **write_options(table.schema))
            crash_point("during_part_write")

        atomic_write(path, write)
        crash_point("after_part")
        return path


def missing_parts(staging: Staging, plan: RunPlan) -> list[int]:
    """Indices of the planned parts not (yet) in the staging directory; existence only, nothing is read."""
    return [p.index for p in plan.parts if not staging.part_path(p.index).exists()]


def check_part(path: StoreDir, part: PartPlan, plan: RunPlan) -> None:
    """Raise `Corrupt` unless `path` is the complete part `part` of `plan`, scored by its teacher."""
    try:
        pf = parquet_file(path)
        meta = pf.schema_arrow.metadata or {}
        ids = pf.read(columns=["sample_id"]).column("sample_id").to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise Corrupt(f"{path}: unreadable Parquet ({e})") from e
    if meta.get(META_RUN_KEY, b"").decode() != plan.run_key:
        raise Corrupt(f"{path}: written by another run")
    teacher = plan.provenance.teacher.fingerprint
    if meta.get(META_TEACHER, b"").decode() != teacher:
        raise Corrupt(f"{path}: scored by teacher {meta.get(META_TEACHER, b'?').decode()}, not {teacher}")
    if len(ids) != part.num_samples or ids_digest(ids) != part.ids_sha256:
        raise Corrupt(f"{path}: holds other samples than part {part.index} of the plan")


def read_plan(path: StoreDir) -> RunPlan:
    try:
        return RunPlan.model_validate_json(path.read_bytes())
    except ValueError as e:
        raise Corrupt(f"{path} is not a valid run plan: {e}") from e


def list_staging_plans(store: StoreDir, dataset: str) -> list[tuple[StoreDir, RunPlan]]:
    """Unfinished runs of a dataset: each staging directory and its plan.

    Damaged plans, plans that do not belong to the directory they are in (so that `Staging` for
    their run key would look elsewhere) and directories gc is removing are skipped.
    """
    root = layout.staging_root(store, dataset)
    out: list[tuple[StoreDir, RunPlan]] = []
    if root.is_dir():
        for d in entries(root):
            if d.name.startswith("."):  # tombstones and temporaries
                continue
            plan_path = d / layout.PLAN
            if plan_path.is_file():
                try:
                    plan = read_plan(plan_path)
                except Corrupt:
                    continue
                if _belongs(store, dataset, plan, d):
                    out.append((d, plan))
    return out


def _belongs(store: StoreDir, dataset: str, plan: RunPlan, directory: StoreDir) -> bool:
    try:
        return layout.staging_dir(store, dataset, plan.run_key) == directory
    except InvalidInput:
        return False


def make_dirs(path: StoreDir) -> None:
    """`mkdir -p path`, retried when an empty parent (`.staging/`) is removed under it by a publisher or gc."""
    for _ in range(100):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            continue
    path.mkdir(parents=True, exist_ok=True)


def remove_if_empty(directory: StoreDir) -> bool:
    """Remove `directory` if it is empty (`.staging/` after the last run left); True if it was removed.

    Safe with concurrent workers: `rmdir` refuses a directory that has gained an entry, and workers
    creating a run directory retry when its parent vanishes (`make_dirs`).
    """
    try:
        directory.rmdir()
    except OSError:  # not empty, already gone, or not ours to remove
        return False
    return True


@dataclass(frozen=True)
class StagedRun:
    """A directory under `.staging/` as gc and `lopd ls` see it."""

    path: Path
    plan: RunPlan | None  # None: no readable plan (a run that crashed before writing it)
    parts_done: list[int]
    last_activity: float  # newest mtime of the directory and its entries (seconds since the epoch)
    locked: bool  # a live worker holds the run's lock

    @property
    def complete(self) -> bool:
        """Every planned part exists: publishing (or `lopd finalize`) would make it a version."""
        return self.plan is not None and len(self.parts_done) == len(self.plan.parts)


def staged_runs(store: Path, dataset: str) -> list[StagedRun]:
    """Every run directory under the dataset's `.staging/` (tombstones and temporaries excepted), in name order."""
    root = layout.staging_root(store, dataset)
    out: list[StagedRun] = []
    if not root.is_dir():
        return out
    for d in entries(root):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            plan = read_plan(d / layout.PLAN) if (d / layout.PLAN).is_file() else None
        except Corrupt:
            plan = None
        if plan is not None and not _belongs(store, dataset, plan, d):
            plan = None
        done = [p.index for p in plan.parts if (d / layout.part_name(p.index)).exists()] if plan is not None else []
        out.append(StagedRun(d, plan, done, last_activity(d), is_locked(d)))
    return out


def last_activity(directory: Path) -> float:
    """When anything in `directory` last changed: the newest mtime of it and its entries (a part being written too)."""
    newest = 0.0
    try:
        newest = directory.stat().st_mtime
        for p in directory.iterdir():
            try:
                newest = max(newest, p.stat().st_mtime)
            except FileNotFoundError:
                continue
    except FileNotFoundError:
        pass
    return newest


def is_locked(directory: Path) -> bool:
    """True while a worker holds the run's lock (`Staging.hold`); creates nothing.

    A run without a lock file is not locked (its workers, if any, predate run locks: only its age protects it).
    """
    try:
        f = open(directory / layout.LOCK)
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def lock_exclusive(directory: Path) -> IO[str] | None:
    """The run's lock, taken exclusively without waiting; None while a worker holds it.

    Held while gc moves the directory away, so no worker can start on it meanwhile (`Staging.hold`
    then finds the directory gone and starts on a fresh one). Raises `FileNotFoundError` when the
    directory is gone.
    """
    f = open(directory / layout.LOCK, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
