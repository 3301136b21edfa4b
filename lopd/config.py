"""Settings models: the one source of every command's defaults.

Each job (precompute, verify, serve, train, ...) and each teacher backend declares its options
once, as the fields of a `LopdSettings` model: name, type, default, constraints and a description.
Everything else derives from that declaration: the `lopd` command's flags and their help
(`lopd.cli.params`), the `LOPD_*` environment variables (pydantic-settings), and validation. A
value given on the command line wins over the environment, which wins over the default.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from lopd.errors import InvalidInput

__all__ = ["ARGUMENT", "ENV_PREFIX", "LopdSettings", "build", "flag", "invalid_input"]

ENV_PREFIX = "LOPD_"
# `Field(json_schema_extra=ARGUMENT)`: the field is a positional command-line argument, not a --flag.
ARGUMENT: dict[str, Any] = {"cli": "argument"}

S = TypeVar("S", bound=BaseSettings)


class LopdSettings(BaseSettings):
    """Base of every settings model: `LOPD_<FIELD>` environment variables, unknown names refused."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)


def flag(field: str) -> str:
    """The command-line flag of a settings field: `max_batch_tokens` -> `--max-batch-tokens`."""
    return "--" + field.replace("_", "-")


def invalid_input(err: ValidationError, context: str = "") -> InvalidInput:
    """A pydantic validation error as `InvalidInput`, naming each bad value by its flag.

    Flags are what a user typed (or the `LOPD_*` variable they set), so messages speak of
    `--max-batch-tokens`, never of `PrecomputeConfig.max_batch_tokens`.
    """
    lines = []
    for e in err.errors(include_url=False):
        loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
        where = flag(loc[-1]) if loc else err.title
        if e["type"] == "missing":
            lines.append(f"{where} is required")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{where} is not an option here")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"{where}: {e['msg']}{shown}")
    prefix = f"{context}: " if context else ""
    return InvalidInput(prefix + "; ".join(lines))


def build(model: type[S], /, **values: Any) -> S:
    """`model(**values)`, raising `InvalidInput` (exit 2 from the CLI) instead of `ValidationError`."""
    try:
        return model(**values)
    except ValidationError as e:
        raise invalid_input(e) from None
