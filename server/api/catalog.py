"""The engine behind the HTTP API: which dataset versions exist, which may be served, and their stats.

Routes never touch the filesystem themselves; they ask the catalogue. It

- re-reads the store's list of datasets and published versions at most every `ttl_s` seconds,
  and at once when asked for a name or version it has not seen, so newly published versions
  appear without a restart;
- verifies every file of a version against its manifest before serving it (on first use, or
  ahead of time in a background thread), and remembers a version that fails as a problem that
  is never served (`Corrupt` -> 503) and is listed by /readyz;
- keeps checking while it serves (`storage/integrity.py`): every read stats its shard (a change
  re-hashes it) and verifies page checksums, and a scrub thread re-hashes every served shard at
  `scrub_bytes_per_s`; the first failure turns the version into a problem like the above. A
  problem is looked at again when a file of its version changes (an operator restored it);
- caches what is immutable per version: opened `Dataset`s, per-sample token counts (for the
  batch token limit) and the DuckDB statistics; for a store on object storage also the decoded
  row groups, in memory bounded by `cache_bytes` (`storage.cache.RowGroupCache`): each GET is
  slow and billed, and a cached row group was verified when it was read;
- registers the server as a reader of the versions it serves (`storage.readers.ReaderLease`, from
  `start` to `close`), so `lopd gc` never removes a version under a client: before the first
  request for a version (or the first after a long idle spell) the lease is written, then the
  store is scanned again, and only a version still there is served.

Every rule about the store (what a dataset is, which versions exist, how a version is read,
verified and its tokens counted) is asked of `lopd.storage`; this module only decides what to
cache, when to look again and what may be served. Names given by clients are validated and then
only looked up in the scanned catalogue, so versions are opened only by names found on disk.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from lopd.errors import Corrupt, LopdError, NotFound, Unavailable
from lopd.storage import layout, stats
from lopd.storage.cache import RowGroupCache
from lopd.storage.fs import StoreDir, is_object, unreachable
from lopd.storage.integrity import FileStamp, directory_stamps
from lopd.storage.manifest import Manifest
from lopd.storage.reader import Dataset, Store, open_version, read_version_manifest
from lopd.storage.readers import LEASE_TTL_S, READ_IDLE_S, ReaderLease

from .redaction import redact_store

log = logging.getLogger(__name__)

Key = tuple[str, int]
T = TypeVar("T")
_STATS_CACHE_SIZE = 256
DEFAULT_SCRUB_BYTES_PER_S = 16 * 2**20  # a full pass over 1 TB in ~17 h, at ~2% of one core's sha256
DEFAULT_CACHE_BYTES = 256 * 2**20  # ~40k samples of 1k tokens, decoded


@dataclass(frozen=True)
class ServedVersion:
    """A verified version: safe to serve."""

    dataset: Dataset
    token_counts: np.ndarray  # prompt + response tokens of every sample, in dataset order

    @property
    def manifest(self) -> Manifest:
        return self.dataset.manifest

    def __len__(self) -> int:
        return len(self.dataset)


@dataclass(frozen=True)
class _Scan:
    """One look at the store: its published versions, or why it could not be read (`transient`: an outage)."""

    versions: dict[str, list[int]] = field(default_factory=dict)
    staging_only: frozenset[str] = frozenset()
    problem: str | None = None
    transient: bool = False


@dataclass(frozen=True)
class Readiness:
    ready: bool
    datasets: int
    problems: list[str]


@dataclass(frozen=True)
class Integrity:
    """What /metrics reports about checksums: damaged versions, failures found since start, bytes scrubbed."""

    damaged: list[Key]
    failures: dict[str, int]  # by when they were found: "open" (first verification) or "read" (while serving)
    scrubbed_bytes: int


class Catalog:
    """Thread-safe view of a store for a long-running server (read-only)."""

    def __init__(
        self,
        root: str | Path | StoreDir,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        scrub_bytes_per_s: float = DEFAULT_SCRUB_BYTES_PER_S,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.root = layout.check_store_path(root)
        # Local stores are read through the OS page cache, with a stat before every read; object stores are not.
        self.cache = RowGroupCache(cache_bytes) if is_object(self.root) and cache_bytes > 0 else None
        self.ttl_s = ttl_s
        self.scrub_bytes_per_s = scrub_bytes_per_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the dicts below; never held during I/O
        self._scan_lock = threading.Lock()  # one rescan at a time
        self._versions: dict[str, list[int]] = {}
        self._staging_only: frozenset[str] = frozenset()
        self._store_problem: str | None = None
        self._scanned_at = -math.inf
        self._scan_started = -math.inf
        self._served: dict[Key, ServedVersion] = {}
        self._problems: dict[Key, str] = {}
        self._manifests: dict[Key, Manifest] = {}
        self._key_locks: dict[Key, threading.Lock] = {}
        self._stats: dict[tuple[str, Key], object] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reads: dict[Key, float] = {}  # wall-clock time of the latest request served from each version
        self._registered: dict[Key, float] = {}  # when a lease listing the version was written before a read
        self._register_lock = threading.Lock()  # one lease write + rescan at a time
        self._lease = ReaderLease(self.root, self._read_times)
        self._problem_stamps: dict[Key, tuple[tuple[str, FileStamp], ...]] = {}  # the files when it failed
        self._failures = {"open": 0, "read": 0}
        self._scrubbed = 0
        self._scrubber: threading.Thread | None = None

    # -- scanning ---------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> None:
        """Rescan the store if the last scan is older than `ttl_s` (or, with `force`, older than this call)."""
        asked = self._clock()
        if not force and asked - self._scanned_at < self.ttl_s:
            return
        with self._scan_lock:
            if self._scan_started >= asked or (not force and self._clock() - self._scanned_at < self.ttl_s):
                return  # another thread scanned while this one waited
            self._scan_started = self._clock()
            scan = self._scan()
            with self._lock:
                self._store_problem = scan.problem
                if not scan.transient:  # an outage is no news about the store: keep what was verified
                    self._versions, self._staging_only = scan.versions, scan.staging_only
                    self._forget_removed(scan.versions)
                self._scanned_at = self._clock()
            if not scan.transient:
                self._retry_changed_problems()
        if self.pending():
            self._wake.set()

    def _forget_removed(self, versions: dict[str, list[int]]) -> None:
        """Drop what is cached about versions an operator deleted (caller holds `_lock`)."""

        def gone(key: Key) -> bool:
            return key[1] not in versions.get(key[0], ())

        for cache in (self._served, self._problems, self._manifests, self._registered, self._problem_stamps):
            for key in [k for k in cache if gone(k)]:
                del cache[key]
        # `_reads` stays: gc may have moved a version aside for a moment and will put it back only if
        # this server's lease still lists it (leases drop versions not read for READ_IDLE_S anyway).
        for stat_key in [k for k in self._stats if gone(k[1])]:
            del self._stats[stat_key]

    def _retry_changed_problems(self) -> None:
        """Forget a problem once a file of its version changed (restored from a backup): it is verified again."""
        with self._lock:
            watched = dict(self._problem_stamps)
        for key, stamps in watched.items():
            if directory_stamps(layout.version_dir(self.root, *key)) != stamps:
                with self._lock:
                    if self._problem_stamps.get(key) == stamps:
                        del self._problem_stamps[key]
                        self._problems.pop(key, None)
                log.info("a file of %s v%d changed: verifying it again", *key)

    def _scan(self) -> _Scan:
        try:
            store = Store(self.root)
            return _Scan(store.catalogue(), frozenset(store.unpublished()))
        except NotFound:
            missing = f"no {layout.STORE_MARKER} at the store's root (not created yet: `lopd precompute ... --store`)"
            return _Scan(problem=f"store unavailable: {missing}")
        except OSError as e:
            transient = unreachable(self.root, e)
            reason = transient or f"cannot read it ({type(e).__name__}: {e}): is the disk mounted?"
            return _Scan(problem=self._public(f"store unavailable: {reason}"), transient=transient is not None)
        except (LopdError, ValueError) as e:
            return _Scan(problem=self._public(f"store unavailable: {e}"))

    def _public(self, message: str) -> str:
        """`message` as served over HTTP: the store's location replaced by `<store>`."""
        return redact_store(message, self.root)

    # -- lookup -----------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None) -> Key:
        """The (name, version) a request means; the latest published version when `version` is None."""
        layout.validate_name(name)
        self.refresh()
        key = self._find(name, version)
        if key is None:
            self.refresh(force=True)
            key = self._find(name, version)
        if key is None:
            with self._lock:
                known, store_problem = self._versions.get(name), self._store_problem
            if store_problem:
                raise Unavailable(store_problem)
            if known:
                raise NotFound(f"dataset {name!r} has no version {version}; published versions: {known}")
            raise NotFound(f"no dataset {name!r}; GET /v1/datasets lists them")
        return key

    def _find(self, name: str, version: int | None) -> Key | None:
        with self._lock:
            versions = self._versions.get(name)
        if not versions:
            return None
        if version is None:
            return name, versions[-1]
        return (name, version) if version in versions else None

    def open(self, name: str, version: int | None = None) -> ServedVersion:
        """A verified version, registered as read; raises `Corrupt` for one that failed verification."""
        key = self.resolve(name, version)
        self._register_read(key)
        self._verify(key)
        with self._lock:
            served, problem = self._served.get(key), self._problems.get(key)
        if served is None and problem is None:  # removed while it was being opened
            raise NotFound(f"dataset {key[0]!r} v{key[1]} is no longer published")
        if served is None:
            raise Corrupt(f"dataset {key[0]!r} v{key[1]} failed verification and is not served: {problem}")
        return served

    def _read_times(self) -> dict[Key, float]:
        with self._lock:
            return dict(self._reads)

    def _register_read(self, key: Key) -> None:
        """Note a read of `key`; before its first (or first in a long while), write the lease and look again.

        Order matters: gc re-reads the leases after it moves a version aside (and puts it back when a
        reader registered meanwhile), so a version found on disk after the lease was written stays.
        """
        now = time.time()
        with self._lock:
            self._reads[key] = now
            registered = self._registered.get(key)
        if not self._lease.active or (registered is not None and now - registered < READ_IDLE_S - LEASE_TTL_S):
            return
        with self._register_lock:  # a concurrent first request waits here until the lease lists the version
            with self._lock:
                registered = self._registered.get(key)
            if registered is not None and now - registered < READ_IDLE_S - LEASE_TTL_S:
                return
            try:
                self._lease.renew()
            except OSError as e:  # on object storage: the service did not answer (a disk error stays an error)
                raise (unreachable(self.root, e) or e) from e
            self.refresh(force=True)
            if self._find(*key) is None:
                with self._lock:
                    self._reads.pop(key, None)
                raise NotFound(f"dataset {key[0]!r} v{key[1]} is no longer published")
            with self._lock:
                self._registered[key] = now

    def listing(self) -> list[tuple[Manifest, list[int]]]:
        """Per dataset: the latest version's manifest and the versions not known to be damaged.

        A dataset whose latest version failed verification is left out (its routes answer 503 and
        /readyz lists it); manifests are read without verifying the shards, which is what `open` is for.
        """
        self.refresh()
        with self._lock:
            catalogue = dict(self._versions)
        out = []
        for name, versions in sorted(catalogue.items()):
            manifest = self._manifest((name, versions[-1]))
            if manifest is None:
                continue
            with self._lock:
                good = [v for v in versions if (name, v) not in self._problems]
            out.append((manifest, good))
        return out

    def _manifest(self, key: Key) -> Manifest | None:
        with self._lock:
            if key in self._problems:
                return None
            manifest = self._manifests.get(key)
        if manifest is None:
            try:
                manifest = read_version_manifest(self.root, *key)
            except (LopdError, OSError) as e:
                self._record_problem(key, e)
                return None
            with self._lock:
                self._manifests[key] = manifest
        return manifest

    # -- verification -----------------------------------------------------------------------

    def pending(self) -> list[Key]:
        """Published versions not verified yet."""
        with self._lock:
            return [
                (n, v)
                for n, vs in self._versions.items()
                for v in vs
                if (n, v) not in self._served and (n, v) not in self._problems
            ]

    def _verify(self, key: Key) -> None:
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:  # two requests for a new version verify it once
            with self._lock:
                if key in self._served or key in self._problems:
                    return
            stamps = directory_stamps(layout.version_dir(self.root, *key))
            try:
                dataset = open_version(
                    self.root,
                    *key,
                    verify=True,
                    on_corrupt=lambda message: self._damaged_while_serving(key, message),
                    cache=self.cache,
                )
                counts = dataset.token_counts()
            except Unavailable as e:  # not a verdict: it stays pending and the loop tries again
                log.warning("cannot verify %s v%d now: %s", key[0], key[1], e)
                return
            except (LopdError, OSError, ValueError) as e:
                if self._still_published(key):
                    self._record_problem(key, e, stamps)
                    with self._lock:
                        self._failures["open"] += 1
                return
            with self._lock:
                self._served[key] = ServedVersion(dataset, counts)
                self._manifests[key] = dataset.manifest
            log.info("verified %s v%d (%d samples)", key[0], key[1], len(dataset))

    def _still_published(self, key: Key) -> bool:
        """False when `key` vanished (removed by `lopd gc` or an operator): that is no damage to report."""
        try:
            return key[1] in Store(self.root).versions(key[0])
        except (LopdError, OSError):
            return False

    def _damaged_while_serving(self, key: Key, message: str) -> None:
        """A read or the scrub found damage in a served version: stop serving it (`Dataset` raised `Corrupt`)."""
        # The stamps of now, after the damage: a later change (a restore) makes the version be verified again.
        stamps = directory_stamps(layout.version_dir(self.root, *key))
        self._record_problem(key, Corrupt(message), stamps)
        with self._lock:
            self._served.pop(key, None)
            self._failures["read"] += 1

    def _record_problem(
        self, key: Key, err: Exception, stamps: tuple[tuple[str, FileStamp], ...] | None = None
    ) -> None:
        message = self._public(str(err))
        if not isinstance(err, LopdError):
            message = f"{type(err).__name__}: {message}"
        log.error("dataset %s v%d is not served: %s", key[0], key[1], message)
        with self._lock:
            self._problems[key] = message
            self._manifests.pop(key, None)
            if stamps is not None:
                self._problem_stamps[key] = stamps

    def integrity(self) -> Integrity:
        """Damaged versions, checksum failures so far and bytes scrubbed (for /metrics)."""
        with self._lock:
            return Integrity(sorted(self._problems), dict(self._failures), self._scrubbed)

    def readiness(self) -> Readiness:
        """Ready when the store is there and every published version has been verified intact."""
        self.refresh()
        pending = self.pending()
        with self._lock:
            problems = [f"dataset {n!r} v{v}: {msg}" for (n, v), msg in sorted(self._problems.items())]
            if self._store_problem:
                problems.insert(0, self._store_problem)
            datasets = len(self._versions)
        if pending:
            problems.append(f"checksums of {len(pending)} dataset version(s) are still being verified")
            self._wake.set()
        return Readiness(ready=not problems, datasets=datasets, problems=problems)

    def start(self) -> None:
        """Register as a reader and verify every version in a background thread, so the first requests do not wait."""
        if self._thread is None:
            self._stop.clear()
            self._lease.start()
            self._thread = threading.Thread(target=self._verify_loop, name="lopd-catalog", daemon=True)
            self._thread.start()
            if self.scrub_bytes_per_s > 0:
                self._scrubber = threading.Thread(target=self._scrub_loop, name="lopd-scrub", daemon=True)
                self._scrubber.start()

    def close(self) -> None:
        """Stop verifying and remove this server's reader lease."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._scrubber is not None:
            self._scrubber.join(timeout=10)
            self._scrubber = None
        self._lease.close()

    def _verify_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                for key in self.pending():
                    if self._stop.is_set():
                        return
                    self._verify(key)
            except Exception:  # the loop must outlive any one bad directory
                log.exception("catalogue refresh failed")
            self._wake.wait(timeout=max(self.ttl_s, 0.05))
            self._wake.clear()

    def scrub_once(self, bytes_per_s: float | None = None) -> int:
        """Re-hash every shard of every served version once, at most `bytes_per_s`; bytes read.

        A mismatch marks the version damaged (through `Dataset.scrub`); the pass goes on with the others.
        """
        with self._lock:
            served = list(self._served.values())
        total = 0
        for version in served:
            for i in range(len(version.manifest.files)):
                if self._stop.is_set():
                    return total
                try:
                    n = version.dataset.scrub(i, bytes_per_s=bytes_per_s, stop=self._stop)
                except Corrupt:
                    break  # the version is a problem now: no need to read the rest of it
                except (OSError, Unavailable) as e:  # removed by gc meanwhile, or the object store unreachable
                    log.debug("scrub skipped %s: %s", version.dataset.path, e)
                    break
                total += n
                with self._lock:
                    self._scrubbed += n
        return total

    def _scrub_loop(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.scrub_once(self.scrub_bytes_per_s)
            except Exception:  # the scrub must outlive any one bad directory
                log.exception("scrub failed")
                done = 0
            # Between passes (or with nothing served yet) wait a little rather than spin.
            self._stop.wait(timeout=1.0 if done else max(self.ttl_s, 1.0))

    # -- statistics -------------------------------------------------------------------------

    def coverage(self, name: str, version: int | None = None) -> stats.CoverageStats:
        """Coverage of a version, with the progress of runs writing right now (never cached)."""
        layout.validate_name(name)
        self.refresh()
        if self._find(name, None) is None:
            self.refresh(force=True)
        with self._lock:
            unpublished = name in self._staging_only and name not in self._versions
        if unpublished and version is None:  # nothing published yet, but a run is writing
            return stats.coverage(self.root, name)
        served = self.open(name, version)
        key = (served.manifest.name, served.manifest.version)
        base = self._cached("coverage", key, lambda: stats.coverage(self.root, *key))
        # Runs in progress change while the version does not: recompute just that part.
        return base.model_copy(update={"in_progress": stats.progress(self.root, key[0])})

    def consistency(self, name: str, version: int | None = None) -> stats.ConsistencyStats:
        served = self.open(name, version)
        key = (served.manifest.name, served.manifest.version)
        return self._cached("consistency", key, lambda: stats.consistency(self.root, *key))

    def _cached(self, kind: str, key: Key, compute: Callable[[], T]) -> T:
        with self._lock:
            hit = self._stats.get((kind, key))
            lock = self._key_locks.setdefault(key, threading.Lock())
        if hit is not None:
            return hit  # type: ignore[return-value]
        with lock:  # concurrent first requests compute once
            with self._lock:
                hit = self._stats.get((kind, key))
            if hit is not None:
                return hit  # type: ignore[return-value]
            value = compute()
            with self._lock:
                if len(self._stats) >= _STATS_CACHE_SIZE:
                    self._stats.pop(next(iter(self._stats)))
                self._stats[(kind, key)] = value
            return value
