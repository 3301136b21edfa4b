"""`lopd export` and `lopd import`: the reference Lightning-OPD (slime) Parquet layout.

Thin wrappers over `lopd.server.interop`; pyarrow, transformers and the store are imported inside
the commands so that `lopd --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from lopd.errors import InvalidInput, LopdError

FORMATS = ("lightning-opd",)


def _fail(err: Exception) -> NoReturn:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")


def _load_tokenizer(path: Path) -> Any:
    if not path.is_dir():
        raise InvalidInput(f"tokenizer directory {path} does not exist")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise InvalidInput("reading a tokenizer needs transformers: pip install 'lightning-opd[teacher]'") from e
    return AutoTokenizer.from_pretrained(str(path))


def export(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory, to decode prompt and response text.")],
    fmt: Annotated[str, typer.Option("--format", help="Output layout (only 'lightning-opd').")] = "lightning-opd",
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
) -> None:
    """Export a dataset version in the reference Lightning-OPD (slime) Parquet layout."""
    try:
        _check_format(fmt)
        from lopd.server.interop import export_lightning_opd

        n = export_lightning_opd(store, dataset, out, _load_tokenizer(tokenizer), version=version)
    except LopdError as e:
        _fail(e)
    typer.echo(f"exported {n} samples of {dataset!r} to {out}")


def import_(
    paths: Annotated[list[Path], typer.Argument(help="Parquet files in the reference Lightning-OPD layout.")],
    store: Annotated[Path, typer.Option(help="Store directory (created if missing).")],
    dataset: Annotated[str, typer.Option(help="Dataset name inside the store.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory, to tokenize the prompt text.")],
    fmt: Annotated[str, typer.Option("--format", help="Input layout (only 'lightning-opd').")] = "lightning-opd",
    teacher_fingerprint: Annotated[
        str | None, typer.Option(help="Fingerprint of the teacher that scored the rows (default: unknown).")
    ] = None,
    sft_teacher_fingerprint: Annotated[
        str | None, typer.Option(help="Fingerprint of the model that generated the SFT data (default: unknown).")
    ] = None,
) -> None:
    """Import reference Lightning-OPD (slime) Parquet files as a new dataset version."""
    try:
        _check_format(fmt)
        from lopd.server.interop import import_lightning_opd

        m = import_lightning_opd(
            paths,
            store,
            dataset,
            _load_tokenizer(tokenizer),
            teacher_fingerprint=teacher_fingerprint,
            sft_teacher_fingerprint=sft_teacher_fingerprint,
        )
    except LopdError as e:
        _fail(e)
    verdict = m.provenance.consistency.verdict
    typer.echo(f"imported: {m.name} v{m.version}: {m.num_samples} samples (teacher consistency: {verdict})")
