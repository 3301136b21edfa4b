"""Settings of one `lopd serve` process: the single source of truth for its knobs.

Every field can come from the environment with the `LOPD_` prefix (`LOPD_MAX_RESPONSE_TOKENS=...`),
so a deployment can tune limits without changing the command line; arguments given to the
constructor (the CLI flags) win over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lopd.config import ARGUMENT
from lopd.http_contract import MAX_BATCH_INDICES, MAX_BODY_BYTES, MAX_RESPONSE_TOKENS
from lopd.storage.layout import StorePath

from .catalog import DEFAULT_CACHE_BYTES, DEFAULT_SCRUB_BYTES_PER_S

# Enough to keep a few cores busy decoding (pyarrow releases the GIL) without one decoded batch per pool thread.
DEFAULT_MAX_CONCURRENT_READS = 8

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
ANY_HOST = "*"


class ServerSettings(BaseSettings):
    """How to serve a store; the defaults are safe for a single machine (loopback only)."""

    model_config = SettingsConfigDict(env_prefix="LOPD_", extra="ignore", frozen=True)

    store: StorePath = Field(
        description="Store to serve (read-only): a directory or s3://BUCKET/PREFIX.", json_schema_extra=ARGUMENT
    )
    host: str = Field(default="127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(default=8000, ge=0, le=65535)
    tokens_file: Path | None = Field(
        default=None, description='JSON {"<token>": "<lab>"}; when set, every data route needs a bearer token.'
    )
    insecure_tokens_file: bool = Field(
        default=False,
        description="Accept a tokens file that group or others may read (refused otherwise: chmod 600 it).",
    )
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        default=None,
        description="Host header values accepted, comma-separated: names or addresses, `*.example.org`, or `*` for "
        "any; others get 400. Default: the loopback names when --host is loopback, any host otherwise.",
    )
    max_batch_indices: int = Field(default=MAX_BATCH_INDICES, ge=1, description="Most indices one batch may ask for.")
    max_response_tokens: int = Field(
        default=MAX_RESPONSE_TOKENS, ge=1, description="Most prompt+response tokens one batch response may hold."
    )
    max_body_bytes: int = Field(
        default=MAX_BODY_BYTES,
        ge=1,
        description=f"Largest request body accepted (a {MAX_BATCH_INDICES}-index batch is ~30 kB).",
    )
    max_url_bytes: int = Field(
        default=8192, ge=64, description="Longest request target (path and query) accepted; longer gets 414."
    )
    max_header_bytes: int = Field(
        default=16384,
        ge=1024,
        description="Largest request line plus headers accepted; larger gets 431 (414 for the URL).",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0.0,
        description="Longest time a client may take to send a request line and headers, from connecting or from the "
        "request's first byte; then 408 and the connection is closed.",
    )
    body_timeout_s: float = Field(
        default=30.0, gt=0.0, description="Longest time to receive a request body once its headers are in; then 408."
    )
    keep_alive_s: float = Field(
        default=5.0, gt=0.0, description="Idle time after which a keep-alive connection between requests is closed."
    )
    max_connections_per_client: int = Field(
        default=128,
        ge=1,
        description="Most open connections from one client address; a connection beyond it gets 429 and is closed.",
    )
    redact_paths: bool = Field(
        default=True,
        description="Serve local paths in provenance (teacher, SFT-data teacher, rollouts) as their last component; "
        "the manifests on disk keep them whole.",
    )
    catalog_ttl_s: float = Field(
        default=2.0, ge=0.0, description="Longest time a newly published version can stay unseen."
    )
    scrub_bytes_per_s: float = Field(
        default=DEFAULT_SCRUB_BYTES_PER_S,
        ge=0.0,
        description="Rate at which served shards are re-hashed against their manifest in the background (0: off); "
        "damage found makes the version 503 `corrupt` (docs/store-format.md: Integrity while reading).",
    )
    cache_bytes: int = Field(
        default=DEFAULT_CACHE_BYTES,
        ge=0,
        description="Memory for decoded row groups of a store on object storage (s3://), least recently used "
        "evicted first; 0: off. Local stores use the OS page cache instead.",
    )
    max_concurrent_reads: int = Field(
        default=DEFAULT_MAX_CONCURRENT_READS,
        ge=1,
        description="Batch and sample requests read and encoded at once; more wait their turn without holding a "
        "thread. Bounds the memory of reads in flight to about this many batches (beyond --cache-bytes); health "
        "checks never wait behind them.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _allowed_hosts(cls, value: object) -> object:
        """`a,b` (a flag or `LOPD_ALLOWED_HOSTS`) or a list of such: one list of lower-case names."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            names = [n.strip().lower() for v in value for n in v.split(",") if n.strip()]
            return [n[1:-1] if n.startswith("[") and n.endswith("]") else n for n in names]
        return value

    @property
    def host_allow_list(self) -> frozenset[str] | None:
        """The Host names accepted, or None for any (docs/http-api.md, Conventions: Host allow-list)."""
        if self.allowed_hosts is not None:
            return None if ANY_HOST in self.allowed_hosts else frozenset(self.allowed_hosts)
        return None if self.exposed else LOOPBACK_HOSTS

    @property
    def exposed(self) -> bool:
        """True when the server listens beyond this machine (then it should have tokens)."""
        return self.host not in LOOPBACK_HOSTS
