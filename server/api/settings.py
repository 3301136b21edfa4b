"""Settings of one `lopd serve` process: the single source of truth for its knobs.

Every field can come from the environment with the `LOPD_` prefix (`LOPD_MAX_RESPONSE_TOKENS=...`),
so a deployment can tune limits without changing the command line; arguments given to the
constructor (the CLI flags) win over the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lopd.config import ARGUMENT
from lopd.http_contract import MAX_BATCH_INDICES, MAX_BODY_BYTES, MAX_RESPONSE_TOKENS
from lopd.storage.layout import check_store_path

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ServerSettings(BaseSettings):
    """How to serve a store; the defaults are safe for a single machine (loopback only)."""

    model_config = SettingsConfigDict(env_prefix="LOPD_", extra="ignore", frozen=True)

    store: Path = Field(description="Store directory to serve (read-only).", json_schema_extra=ARGUMENT)
    host: str = Field(default="127.0.0.1", description="Interface to bind; loopback unless told otherwise.")
    port: int = Field(default=8000, ge=0, le=65535)
    tokens_file: Path | None = Field(
        default=None, description='JSON {"<token>": "<lab>"}; when set, every data route needs a bearer token.'
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
    catalog_ttl_s: float = Field(
        default=2.0, ge=0.0, description="Longest time a newly published version can stay unseen."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: object) -> object:
        return check_store_path(value) if isinstance(value, (str, Path)) else value

    @property
    def exposed(self) -> bool:
        """True when the server listens beyond this machine (then it should have tokens)."""
        return self.host not in LOOPBACK_HOSTS
