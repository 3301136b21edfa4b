"""Where a store lives: a local directory (the default) or a prefix in an S3-compatible bucket.

`store_location` is the one place that decides: `s3://bucket/prefix` is an `ObjectPath`, anything
else a local `Path` (other URL schemes are refused). `ObjectPath` has the part of the `pathlib.Path`
API the storage code uses (`/`, `name`, `parent`, `exists`, `iterdir`, `read_bytes`, ...), carried
out through pyarrow's S3 filesystem, so the writing and reading protocols are written once; the few
places where object storage differs from POSIX (no rename, no `flock`, no hard link, no `stat`)
ask `is_object` and say why (docs/store-format.md, "On object storage").

`ObjectPath` has no `__fspath__`: passing one to `open()` or `os.*` by mistake raises `TypeError`
instead of writing a local directory named `s3:`.

The endpoint and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`), so any
S3-compatible service works; without `AWS_ENDPOINT_URL` it is AWS S3.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from typing_extensions import TypeIs

from lopd.errors import InvalidInput, Unavailable

OBJECT_SCHEMES = ("s3",)
# `scheme://...` as typed, or `scheme:/...` once `pathlib.Path` has collapsed the double slash. Two letters
# at least, so a Windows drive (`C:/`) is not a scheme.
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


@dataclass(frozen=True)
class S3Config:
    """How to reach the object store, from the standard AWS variables (read once per process)."""

    endpoint: str | None  # host:port, or None for AWS itself
    scheme: str  # "http" or "https"
    region: str | None

    @classmethod
    def from_env(cls) -> S3Config:
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not url:
            return cls(None, "https", region)
        parts = urlsplit(url if "://" in url else f"https://{url}")
        return cls(parts.netloc, parts.scheme or "https", region)

    @property
    def endpoint_url(self) -> str | None:
        return None if self.endpoint is None else f"{self.scheme}://{self.endpoint}"


@functools.lru_cache(maxsize=8)
def _s3_filesystem(config: S3Config) -> pafs.FileSystem:
    kwargs: dict[str, Any] = {"scheme": config.scheme, "region": config.region or "us-east-1"}
    if config.endpoint is not None:
        kwargs["endpoint_override"] = config.endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # else the SDK's own chain: profile, web identity (IRSA), instance metadata
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    # pyarrow retries transient S3 errors itself (AWS standard retry strategy).
    return pafs.S3FileSystem(**kwargs)


class ObjectPath:
    """A key (or key prefix) in a bucket, `bucket/a/b`, with the `pathlib.Path` methods the store uses.

    Directories are key prefixes: one exists while an object under it does. Writes are single PUTs
    (`write_bytes`), which S3 makes visible whole or not at all.
    """

    __slots__ = ("key", "config")

    def __init__(self, key: str, config: S3Config) -> None:
        self.key = key.strip("/")
        self.config = config

    # -- pure path operations ----------------------------------------------------------------

    @property
    def fs(self) -> pafs.FileSystem:
        return _s3_filesystem(self.config)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(f"{self.key}/{name}", self.config)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(self.key.rsplit("/", 1)[0] if "/" in self.key else self.key, self.config)

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    @property
    def suffix(self) -> str:
        name = self.name
        return name[name.rindex(".") :] if "." in name.lstrip(".") else ""

    @property
    def stem(self) -> str:
        return self.name[: len(self.name) - len(self.suffix)] if self.suffix else self.name

    def resolve(self) -> ObjectPath:
        return self

    @property
    def url(self) -> str:
        return f"s3://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and (self.key, self.config) == (other.key, other.config)

    def __hash__(self) -> int:
        return hash((self.key, self.config))

    def __lt__(self, other: ObjectPath) -> bool:
        return self.key < other.key

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.is_instance_schema(cls)

    # -- reading -----------------------------------------------------------------------------

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def iterdir(self) -> Iterator[ObjectPath]:
        """The objects and prefixes directly under this one (nothing when there are none)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.key, allow_not_found=True))
        for info in infos:
            yield ObjectPath(info.path, self.config)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.key) as f:
            return bytes(f.read())

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def size_and_mtime(self) -> tuple[int, int]:
        """(bytes, last-modified in ns): what S3 says about an object; `FileNotFoundError` when absent."""
        info = self._info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(self.url)
        return int(info.size or 0), int(info.mtime_ns or 0)

    # -- writing -----------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> int:
        """One PUT: the object appears with all of `data` or not at all (kill -9 mid-upload leaves nothing)."""
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)
        return len(data)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists as soon as an object is written under it."""

    def rmdir(self) -> None:
        """Prefixes vanish with their last object; reported as not removed (the caller's 'not empty')."""
        raise OSError(f"{self.url}: object storage has no directories to remove")

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rmtree(self) -> None:
        """Delete every object under this prefix."""
        try:
            self.fs.delete_dir(self.key)
        except FileNotFoundError:
            pass


StoreDir = Path | ObjectPath
"""A store, or anything inside one: a local path or an object-storage key."""
# For functions that keep the kind of path they are given (a local store's paths stay `Path`s).
S = TypeVar("S", Path, ObjectPath, StoreDir)


def is_object(path: StoreDir) -> TypeIs[ObjectPath]:
    """True for an object-storage key (no rename, no locks, no hard links), False for a local path."""
    return isinstance(path, ObjectPath)


def unreachable(path: StoreDir, err: OSError) -> Unavailable | None:
    """An `Unavailable` when `err` means the object store could not be asked, not that an object is bad.

    On object storage an error other than "no such object" comes from the service or the network
    (connection refused, timeouts, throttling, 5xx): transient, and no evidence about the bytes. On a
    local disk the same class of error (EIO, say) is the disk's answer about the file, so None.
    """
    if not isinstance(path, ObjectPath) or isinstance(err, FileNotFoundError):
        return None
    return Unavailable(
        f"the object store cannot be read right now ({' '.join(str(err).split())}); nothing is known to be damaged: "
        "check that AWS_ENDPOINT_URL is reachable and the credentials valid; requests succeed again once it is"
    )


def entries(directory: S) -> list[S]:
    """What `directory` holds (files and directories, or objects and prefixes), in name order."""
    return sorted(directory.iterdir(), key=lambda p: p.name)


def store_location(path: str | os.PathLike[str] | ObjectPath) -> StoreDir:
    """A store path as given by a user: `s3://bucket/prefix` -> `ObjectPath`, a directory -> `Path`.

    Other URL schemes are refused (`InvalidInput`): without this check `Path("gs://b/x")` would be the
    local relative directory `gs:/b/x`, and a job would silently write its store there.
    """
    if isinstance(path, ObjectPath):
        return path
    text = os.fspath(path)
    m = _URL_RE.match(text)
    if not m:
        return Path(path)
    scheme, rest = m.group(1).lower(), text[m.end() :].lstrip("/")
    if scheme not in OBJECT_SCHEMES or not rest:
        raise InvalidInput(
            f"store {m.group(1)}://{rest!s} is not supported: give a local directory or s3://BUCKET/PREFIX "
            "(any S3-compatible service: set AWS_ENDPOINT_URL); for a local directory really named so, give its "
            "absolute path"
        )
    return ObjectPath(rest, S3Config.from_env())


# -- pyarrow and bytes, for either kind of path -------------------------------------------------


def parquet_file(path: StoreDir, **kwargs: Any) -> pq.ParquetFile:
    """`pq.ParquetFile` over a local file or an object (ranged GETs, footer read once per handle)."""
    if isinstance(path, ObjectPath):
        return pq.ParquetFile(path.fs.open_input_file(path.key), **kwargs)
    return pq.ParquetFile(path, **kwargs)


def read_table(path: StoreDir, **kwargs: Any) -> pa.Table:
    if isinstance(path, ObjectPath):
        return pq.read_table(path.key, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def read_schema(path: StoreDir) -> pa.Schema:
    if isinstance(path, ObjectPath):
        return pq.read_schema(path.key, filesystem=path.fs)
    return pq.read_schema(path)


def open_binary(path: StoreDir) -> Any:
    """A binary stream to read `path` from the start (a context manager with `read(n)`)."""
    if isinstance(path, ObjectPath):
        return path.fs.open_input_stream(path.key)
    return open(path, "rb")


def file_size(path: StoreDir) -> int:
    if isinstance(path, ObjectPath):
        return path.size_and_mtime()[0]
    return path.stat().st_size


def sha256_file(path: StoreDir, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open_binary(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def copy_file(src: StoreDir, dst: StoreDir) -> None:
    """Copy between two objects of one store (a server-side copy); local stores hard-link (`publish`)."""
    if not (isinstance(src, ObjectPath) and isinstance(dst, ObjectPath)):
        raise TypeError("copy_file copies objects; local files are hard-linked")
    src.fs.copy_file(src.key, dst.key)


def upload_local(local: Path, dst: ObjectPath) -> None:
    """Upload a finished local file as one object (one PUT, or a multipart upload completed at the end)."""
    with open(local, "rb") as f, dst.fs.open_output_stream(dst.key) as out:
        while block := f.read(1 << 22):
            out.write(block)


def local_scratch(name: str) -> Path:
    """A fresh local file name to build an object in before uploading it."""
    return Path(tempfile.gettempdir()) / f"lopd-{secrets.token_hex(6)}-{name}"


# -- conditional writes: the commit points of publishing ----------------------------------------


@functools.lru_cache(maxsize=8)
def _s3_client(config: S3Config) -> Any:
    try:
        import botocore.session
    except ImportError as e:
        raise ImportError("publishing to object storage needs botocore: pip install 'lightning-opd[s3]'") from e
    session = botocore.session.get_session()
    return session.create_client("s3", endpoint_url=config.endpoint_url, region_name=config.region or "us-east-1")


def put_if_absent(path: ObjectPath, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (`If-None-Match: *`, one request); True if this call created it.

    The service decides atomically, so of several writers racing for the same key exactly one wins.
    AWS S3 (since 2024), SeaweedFS, MinIO and Cloudflare R2 honour the condition.
    """
    bucket, _, key = path.key.partition("/")
    client = _s3_client(path.config)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except client.exceptions.ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status in (409, 412):  # 412 Precondition Failed; 409 a concurrent conditional write in progress
            return False
        raise
    return True


def duckdb_s3_settings(path: ObjectPath) -> dict[str, str]:
    """What DuckDB's httpfs needs to read objects of `path`'s store (endpoint, style, credentials)."""
    c = path.config
    out = {"REGION": c.region or "us-east-1", "URL_STYLE": "path" if c.endpoint else "vhost"}
    if c.endpoint is not None:
        out.update(ENDPOINT=c.endpoint, USE_SSL="true" if c.scheme == "https" else "false")
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        out.update(KEY_ID=key, SECRET=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            out["SESSION_TOKEN"] = os.environ["AWS_SESSION_TOKEN"]
    return out
