"""`lopd stats`, `export` and `import`: reading a store, and moving datasets in and out of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lopd.errors import InvalidInput

from .params import cli_errors, fail

FORMATS = ("lightning-opd",)


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


def stats_command(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file's sha256 against the manifest first.")] = True,
) -> None:
    """Coverage and consistency of a dataset (DuckDB over its parts)."""
    try:
        from lopd.storage import stats as st
        from lopd.storage.reader import Store
    except ImportError as e:
        fail(f"`lopd stats` needs DuckDB: pip install 'lightning-opd[store]' ({e})")
    with cli_errors():
        cov = st.coverage(store, dataset, version)
        con = None
        if cov.version is not None:
            if verify:
                Store(store).open(dataset, cov.version, verify=True)
            con = st.consistency(store, dataset, cov.version)
    if as_json:
        out = {"coverage": cov.model_dump(mode="json"), "consistency": con.model_dump(mode="json") if con else None}
        typer.echo(json.dumps(out, indent=2))
        return
    from lopd.stats_text import render_text

    typer.echo(render_text(cov, con))


def export_command(
    store: Annotated[Path, typer.Argument(help="Store directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer directory, to decode prompt and response text.")],
    fmt: Annotated[str, typer.Option("--format", help="Output layout (only 'lightning-opd').")] = "lightning-opd",
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
) -> None:
    """Export a dataset version in the reference Lightning-OPD (slime) Parquet layout."""
    with cli_errors():
        _check_format(fmt)
        from lopd.storage.interop import export_lightning_opd

        n = export_lightning_opd(store, dataset, out, _load_tokenizer(tokenizer), version=version)
    typer.echo(f"exported {n} samples of {dataset!r} to {out}")


def import_command(
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
    with cli_errors():
        _check_format(fmt)
        from lopd.storage.interop import import_lightning_opd

        m = import_lightning_opd(
            paths,
            store,
            dataset,
            _load_tokenizer(tokenizer),
            teacher_fingerprint=teacher_fingerprint,
            sft_teacher_fingerprint=sft_teacher_fingerprint,
        )
    verdict = m.provenance.consistency.verdict
    typer.echo(f"imported: {m.name} v{m.version}: {m.num_samples} samples (teacher consistency: {verdict})")
