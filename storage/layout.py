"""Where things live inside a store directory: the only module that builds store paths.

    STORE/
      lopd-store.json                 marks the directory as a store (format version)
      <dataset>/
        v1/, v2/, ...                 published, immutable versions
          manifest.json               written last; a version without it does not exist
          part-000000.parquet ...     shards, in dataset order
          skipped.parquet             records left out by --on-bad-record skip (id, reason)
        .staging/<run-key>/           an unfinished precompute run
          plan.json
          part-000000.parquet ...     finished parts (each published atomically)
        .lock                         serialises version allocation, publishing and gc
        .gc-v3-<random>/              a version (or, under .staging/, a run) being removed by gc
      .readers/<host>-<pid>-<rand>.json   a live reader's lease (storage/readers.py)

Dataset names come from users and URLs, so they are validated here and never used to build a
path before passing `validate_name`. A store is a local (or mounted) directory or an
`s3://bucket/prefix` (`storage/fs.py` decides; every path below is a `StoreDir`, either kind).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from lopd.errors import Corrupt, InvalidInput

from .fs import ObjectPath, S, StoreDir, store_location

STORE_MARKER = "lopd-store.json"
MANIFEST = "manifest.json"
SKIPPED = "skipped.parquet"
PLAN = "plan.json"
STAGING = ".staging"
LOCK = ".lock"  # in a dataset directory: publishers and gc; in a run's staging directory: its workers


def worker_lock_name(worker: int) -> str:
    """In a run's staging directory: held exclusively by the one process working as worker `worker`."""
    return f".worker-{worker:06d}.lock"


# In a version directory on object storage: which run is publishing that version number (written with
# `If-None-Match: *` before anything else of the version; see `publish`). Not a file of the version.
CLAIM = ".claim"
READERS = ".readers"
TOMBSTONE_PREFIX = ".gc-"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_VERSION_RE = re.compile(r"^v([1-9][0-9]{0,8})$")


def check_store_path(path: str | os.PathLike[str] | ObjectPath) -> StoreDir:
    """`path` as a store: `s3://bucket/prefix` (an `ObjectPath`) or a local directory; `InvalidInput` for other URLs.

    Without this check `Path("gs://bucket/x")` is the local relative directory `gs:/bucket/x`, and a
    job would silently write its store there.
    """
    return store_location(path)


def local_store(path: str | os.PathLike[str] | ObjectPath, command: str) -> Path:
    """`check_store_path` for what works on local stores only (locks, renames): `InvalidInput` for s3://."""
    store = check_store_path(path)
    if isinstance(store, ObjectPath):
        raise InvalidInput(
            f"{command} works on local stores only: it relies on file locks and renames, which object storage lacks "
            "(remove old versions there with the bucket's lifecycle rules, or `aws s3 rm --recursive` of a version "
            "prefix no replica serves)"
        )
    return store


def validate_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid dataset name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def version_dir_name(version: int) -> str:
    return f"v{version}"


def parse_version_dir(name: str) -> int | None:
    m = _VERSION_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def dataset_dir(store: S, name: str) -> S:
    return store / validate_name(name)


def version_dir(store: S, name: str, version: int) -> S:
    return dataset_dir(store, name) / version_dir_name(version)


def version_file(version_path: S, file_name: str) -> S:
    """A file a version's manifest lists (a shard or `skipped.parquet`), inside `version_path`.

    The name comes from the manifest, so a name that would leave the version directory is refused
    (`Corrupt`): publishing only ever writes plain file names.
    """
    if not file_name or file_name != Path(file_name).name or file_name.startswith("."):
        raise Corrupt(f"the manifest in {version_path} lists {file_name!r}, which is not a file of that version")
    return version_path / file_name


def staging_root(store: S, name: str) -> S:
    return dataset_dir(store, name) / STAGING


def staging_dir(store: S, name: str, run_key: str) -> S:
    if not re.fullmatch(r"[0-9a-f]{16,64}", run_key):
        raise InvalidInput(f"invalid run key {run_key!r}")
    return staging_root(store, name) / run_key[:16]


def readers_dir(store: S) -> S:
    """Where live readers keep their leases (`storage.readers`)."""
    return store / READERS


def tombstone_for(path: S) -> S:
    """A fresh name next to `path` that no reader lists (not a version, not a run): where gc moves it first."""
    return path.with_name(f"{TOMBSTONE_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")


def is_tombstone(name: str) -> bool:
    return name.startswith(TOMBSTONE_PREFIX)


def tombstone_origin(name: str) -> str | None:
    """The name a tombstone had before gc moved it (`.gc-v3-1a2b3c4d` -> `v3`), or None."""
    m = re.fullmatch(rf"{re.escape(TOMBSTONE_PREFIX)}(.+)-[0-9a-f]{{8}}", name)
    return m.group(1) if m else None


def _store_path_field(value: Any) -> Any:
    return check_store_path(value) if isinstance(value, (str, os.PathLike, ObjectPath)) else value


# A settings field holding a store: a local directory or `s3://bucket/prefix`, decided by `check_store_path`
# in one place; shown and dumped as the string given.
StorePath = Annotated[
    StoreDir,
    BeforeValidator(_store_path_field),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "path"}),
]
