"""Reader leases: how a long-running reader (`lopd serve`) tells `lopd gc` which versions it is reading.

A reader registers with one lease file, `STORE/.readers/<host>-<pid>-<random>.json`, written
atomically and renewed every `LEASE_RENEW_S` seconds; it lists the (dataset, version) pairs the
reader has served, each with the time of its latest read, and says until when it is valid
(`expires_at`, `LEASE_TTL_S` after the renewal). A clean shutdown removes it.

A version is **being read** when a live lease (`expires_at` in the future) lists it with a read in
the last `READ_IDLE_S` seconds. gc never removes such a version. A reader that crashed leaves its
lease behind; it stops protecting anything at `expires_at`, and gc deletes it. Readers must write
their lease before they first read a version's files, and check the version still exists after
writing it: gc re-reads the leases after moving a version aside and puts it back if a reader
registered meanwhile (`storage.gc`), so a version a reader found after registering is never
removed under it.

Times are wall-clock UTC: readers and gc on different hosts need clocks that agree to well within
`LEASE_TTL_S` (NTP does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, ValidationError

from . import layout
from .atomic import TMP_PREFIX, atomic_write_bytes
from .fs import S, StoreDir, entries

log = logging.getLogger(__name__)

LEASE_RENEW_S = 10.0  # how often a reader rewrites its lease
LEASE_TTL_S = 120.0  # how long a lease stays valid after its last renewal
READ_IDLE_S = 24 * 3600.0  # a version not read for this long is no longer being read

Key = tuple[str, int]


class LeaseRead(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    dataset: str
    version: int
    last_read: datetime


class Lease(BaseModel):
    """The content of a lease file (unknown fields are ignored, so newer readers stay readable)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    host: str
    pid: int
    started_at: datetime
    renewed_at: datetime
    expires_at: datetime
    reading: list[LeaseRead]

    def live(self, now: float) -> bool:
        return self.expires_at.timestamp() > now

    def being_read(self, now: float) -> set[Key]:
        """The versions this lease protects at `now` (none once it has expired)."""
        if not self.live(now):
            return set()
        return {(r.dataset, r.version) for r in self.reading if r.last_read.timestamp() > now - READ_IDLE_S}


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, timezone.utc)


class ReaderLease:
    """One reader's lease; `reads()` returns {(dataset, version): time of the latest read (epoch seconds)}.

    `start` writes it and renews it in a daemon thread; `renew` writes it now (call it before the
    first read of a version); `close` stops renewing and removes the file. Writing never raises: a
    store the reader cannot write to (a read-only mount) is logged once, and gc cannot see this reader.
    """

    def __init__(
        self,
        store: StoreDir,
        reads: Callable[[], Mapping[Key, float]],
        *,
        renew_s: float = LEASE_RENEW_S,
        ttl_s: float = LEASE_TTL_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._reads = reads
        self._renew_s = renew_s
        self._ttl_s = max(ttl_s, 3 * renew_s)
        self._now = now
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
        self.path = layout.readers_dir(store) / f"{host}-{os.getpid()}-{secrets.token_hex(4)}.json"
        self._host = socket.gethostname()
        self._started = now()
        self._expires: float | None = None
        self._write_lock = threading.Lock()
        self._warned = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        """True between `start` and `close`."""
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self.renew()
            self._thread = threading.Thread(target=self._loop, name="lopd-reader-lease", daemon=True)
            self._thread.start()

    def renew(self) -> bool:
        """Write the lease now; True when it was written."""
        with self._write_lock:
            if self._stop.is_set():
                return False
            if not (self.store / layout.STORE_MARKER).is_file():
                return False  # no store (yet): nothing to protect, and the reader must not create one
            now = self._now()
            if self._expires is not None and now > self._expires:
                log.warning(
                    "reader lease %s lapsed %.0f s ago: lopd gc may have removed versions this server was reading",
                    self.path.name,
                    now - self._expires,
                )
            reading = [
                LeaseRead(dataset=d, version=v, last_read=_utc(t))
                for (d, v), t in sorted(self._reads().items())
                if t > now - READ_IDLE_S
            ]
            lease = Lease(
                host=self._host,
                pid=os.getpid(),
                started_at=_utc(self._started),
                renewed_at=_utc(now),
                expires_at=_utc(now + self._ttl_s),
                reading=reading,
            )
            try:
                self.path.parent.mkdir(exist_ok=True)
                atomic_write_bytes(self.path, lease.model_dump_json(indent=1).encode())
            except OSError as e:
                if not self._warned:
                    log.warning(
                        "cannot register as a reader in %s (%s): `lopd gc` will not see which versions this "
                        "server reads",
                        self.path.parent,
                        e,
                    )
                    self._warned = True
                return False
            self._expires = now + self._ttl_s
            return True

    def close(self) -> None:
        """Stop renewing and remove the lease file."""
        with self._write_lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with contextlib.suppress(OSError):  # never written (read-only store), or already gone
            self.path.unlink(missing_ok=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._renew_s):
            try:
                self.renew()
            except Exception:  # the lease must outlive any one bad read of the catalogue
                log.exception("renewing the reader lease failed")


def read_leases(store: S) -> dict[S, Lease | None]:
    """Every lease file of the store and its content (None when it cannot be parsed)."""
    out: dict[S, Lease | None] = {}
    directory = layout.readers_dir(store)
    if not directory.is_dir():
        return out
    for p in entries(directory):
        if p.name.startswith(TMP_PREFIX) or p.suffix != ".json":
            continue
        try:
            out[p] = Lease.model_validate_json(p.read_bytes())
        except FileNotFoundError:  # removed by its reader meanwhile
            continue
        except (OSError, ValidationError, ValueError) as e:
            log.warning("unreadable reader lease %s: %s", p, e)
            out[p] = None
    return out


def versions_being_read(store: StoreDir, now: float | None = None) -> dict[Key, list[str]]:
    """{(dataset, version): names of the live leases reading it} at `now` (default: the current time)."""
    t = time.time() if now is None else now
    out: dict[Key, list[str]] = {}
    for path, lease in read_leases(store).items():
        if lease is not None:
            for key in sorted(lease.being_read(t)):
                out.setdefault(key, []).append(path.stem)
    return out
