"""Settings models as typer commands, and the one way a command fails.

A command's flags are its settings model's fields (`lopd.config`): the flag name, type, help and
shown default all come from the field, so adding a setting never touches the CLI. Only values
typed on the command line are passed to the model; pydantic-settings fills the rest from
`LOPD_*` variables, then from the defaults. A field holding `TeacherOptions` becomes `--backend`
plus every registered backend's options (`lopd.server.teachers.BACKENDS`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, Union

import typer
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from lopd.config import ARGUMENT, ENV_PREFIX, build, flag
from lopd.errors import LopdError

__all__ = ["cli_errors", "fail", "settings_command"]

S = TypeVar("S", bound=BaseSettings)


def fail(err: Exception | str, code: int = 2) -> NoReturn:
    """Print `error: ...` on stderr and exit (2: the input or the operator's setup is wrong)."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


# The extra (pyproject.toml's optional-dependencies) that installs each optional module a command may import.
EXTRA_OF_MODULE = {
    "duckdb": "store",
    "botocore": "s3",
    "duckdb_extension_httpfs": "s3",
    "fastapi": "server",
    "starlette": "server",
    "uvicorn": "server",
    "prometheus_client": "server",
    "torch": "teacher",
    "transformers": "teacher",
    "tokenizers": "teacher",
    "safetensors": "teacher",
    "vllm": "vllm",
    "peft": "train",
    "matplotlib": "demo",
}


def missing_module(err: BaseException) -> str | None:
    """The optional module (a key of `EXTRA_OF_MODULE`) whose absence raised `err` or its causes, if any.

    Only a module that is really not installed counts: an installed one that fails to import is a bug
    and keeps its traceback.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError) and e.name:
            top = e.name.partition(".")[0]
            if top in EXTRA_OF_MODULE and importlib.util.find_spec(top) is None:
                return top
        e = e.__cause__ or e.__context__
    return None


@contextmanager
def cli_errors(extra: str | None = None) -> Iterator[None]:
    """Every command's one error path: an expected `LopdError` becomes a message and exit 2, never a traceback;
    so does an `OSError` (a store that cannot be reached or read), with where to look.

    So does a missing optional module: the message names the extra to install (`extra`, the command's
    own, or the one `EXTRA_OF_MODULE` gives for that module).
    """
    try:
        yield
    except LopdError as e:
        fail(e)
    except OSError as e:  # what the operating system or an object store said: the operator's to fix, not a bug
        fail(f"{type(e).__name__}: {' '.join(str(e).split())}{object_store_hint(e)}")
    except ImportError as e:
        module = missing_module(e)
        if module is None:
            raise
        fail(
            f"this command needs {module}, which is not installed: "
            f"pip install 'lightning-opd[{extra or EXTRA_OF_MODULE[module]}]'"
        )


def object_store_hint(e: OSError) -> str:
    """Where to look for an object store's error (the AWS SDK under pyarrow's S3 filesystem says "AWS Error")."""
    if "AWS Error" not in str(e):
        return ""
    return (
        "; check that AWS_ENDPOINT_URL is reachable, the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
        "and that the bucket exists"
    )


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field's flag as (typer understands Literal choices and lists)."""
    t = _strip_optional(annotation)
    if typing.get_origin(t) in (Literal, list) or t in (str, int, float, bool, Path):
        return t
    return str


def _param(name: str, field: FieldInfo, *, help_text: str | None = None, default: Any = None) -> inspect.Parameter:
    """One typer parameter for a settings field; required options are checked by the model, not by click."""
    py_type = _cli_type(field.annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    text = help_text if help_text is not None else (field.description or "")
    if extra.get("cli") == ARGUMENT["cli"]:
        info: Any = typer.Argument(help=text, show_default=False)
        value = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
    else:
        required = field.is_required()
        decls = [flag(name)] if py_type is bool and field.default is False else []  # off by default: a plain flag
        info = typer.Option(*decls, help=text + (" (required)" if required else ""), show_default=not required)
        value = None if required else (default if default is not None else field.get_default(call_default_factory=True))
        if not required and value is None:
            info.show_default = False
        py_type = py_type | None if value is None else py_type
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[py_type, info], default=value)


def _backend_params() -> list[inspect.Parameter]:
    """`--backend` and every registered backend's options, each help naming the backends it applies to."""
    from lopd.server.teachers import BACKENDS, DEFAULT_BACKEND, option_owners

    choices = Literal.__getitem__(tuple(BACKENDS))  # type: ignore[attr-defined]
    listing = "; ".join(f"{name}: {options.summary}" for name, options in BACKENDS.items())
    params = [
        inspect.Parameter(
            "backend",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[choices, typer.Option(help=f"Scoring engine ({listing}).")],
            default=DEFAULT_BACKEND,
        )
    ]
    for name, owners in option_owners().items():
        field = owners[0].model_fields[name]
        defaults = {o.name: o.model_fields[name].get_default(call_default_factory=True) for o in owners}
        users = " and ".join(o.name for o in owners)
        shown = {repr(v) for v in defaults.values()}
        if field.is_required():
            note = " (required for them)"
        elif len(shown) == 1:
            note = f" (default: {next(iter(defaults.values()))})"
        else:
            note = " (default: " + ", ".join(f"{v} for {k}" for k, v in defaults.items()) + ")"
        text = f"{users}: {field.description}{note}"
        params.append(
            _param(name, FieldInfo(annotation=field.annotation, default=None, description=text), help_text=text)
        )
    return params


def _typed(ctx: typer.Context, name: str) -> bool:
    """True when the user typed this parameter (typer vendors click, so compare the source by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _is_backend_field(field: FieldInfo) -> bool:
    from lopd.server.teachers import TeacherOptions

    return isinstance(field.annotation, type) and issubclass(field.annotation, TeacherOptions)


def settings_command(
    model: type[S],
    run: Callable[..., None],
    *,
    exclude: tuple[str, ...] = (),
    doc: str | None = None,
    json_flag: bool = False,
    extra: str | None = None,
) -> Callable[..., None]:
    """A typer command whose flags are `model`'s fields, that builds the model and calls `run` with it.

    `json_flag` adds `--json` (an output format, not a setting): `run` is then called as `run(cfg, as_json=...)`.
    `extra`: the pyproject extra the command needs, named when one of its modules is missing (`cli_errors`).
    """
    params: list[inspect.Parameter] = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    ]
    if json_flag:
        params.append(
            inspect.Parameter(
                "as_json",
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[bool, typer.Option("--json", help="Print JSON.")],
                default=False,
            )
        )
    backend_field = None
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        if _is_backend_field(field):
            backend_field = name
            params.extend(_backend_params())
        else:
            params.append(_param(name, field))
    # Positional arguments first (typer keeps the signature's order for them).
    params = [params[0], *sorted(params[1:], key=lambda p: p.default is not inspect.Parameter.empty)]
    backend_keys = {p.name for p in params} - set(model.model_fields) - {"ctx", "as_json"} if backend_field else set()

    def command(ctx: typer.Context, **values: Any) -> None:
        output = {"as_json": values.pop("as_json")} if json_flag else {}
        given = {k: v for k, v in values.items() if _typed(ctx, k)}
        with cli_errors(extra):
            if backend_field is not None:
                options = {k: given.pop(k) for k in list(given) if k in backend_keys}
                name = given.pop(backend_field, None)
                if name is not None or options:
                    from lopd.server.teachers import DEFAULT_BACKEND, backend_options

                    name = name or os.environ.get(ENV_PREFIX + backend_field.upper(), DEFAULT_BACKEND)
                    given[backend_field] = backend_options(name, options)
            run(build(model, **given), **output)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {}
    command.__doc__ = doc if doc is not None else run.__doc__
    command.__name__ = run.__name__
    return command
