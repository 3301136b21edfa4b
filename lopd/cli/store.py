"""`lopd stats`, `ls`, `gc`, `export` and `import`: reading a store, tidying it, moving datasets in and out."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from lopd.errors import InvalidInput
from lopd.storage.layout import check_store_path

from .params import cli_errors, fail

if TYPE_CHECKING:
    from lopd.storage.gc import GcReport
    from lopd.storage.listing import StoreListing

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
    store: Annotated[str, typer.Argument(help="Store: a directory or s3://BUCKET/PREFIX.")],
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
        check_store_path(store)
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
    store: Annotated[str, typer.Argument(help="Store: a directory or s3://BUCKET/PREFIX.")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Tokenizer directory, to decode prompt and response text (--format lightning-opd)."),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="Output layout: lightning-opd (the reference slime layout), or for a dataset built with --top-k: "
            "verl (teacher_ids/teacher_logprobs [R, K], verl's forward_kl_topk) or trl (teacher_topk_ids/"
            "teacher_topk_logprobs/teacher_id, TRL's distillation).",
        ),
    ] = "lightning-opd",
    version: Annotated[int | None, typer.Option(help="Version (default: latest).")] = None,
) -> None:
    """Export a dataset version: the reference Lightning-OPD (slime) layout, or its top-k for verl or TRL."""
    with cli_errors():
        check_store_path(store)
        from lopd.storage.export_topk import TOPK_FORMATS, export_topk

        if fmt in TOPK_FORMATS:
            n = export_topk(store, dataset, out, fmt, version=version)  # type: ignore[arg-type]
        else:
            if fmt not in FORMATS:
                raise InvalidInput(f"unknown format {fmt!r}; supported: {', '.join(FORMATS + TOPK_FORMATS)}")
            if tokenizer is None:
                raise InvalidInput("--format lightning-opd needs --tokenizer (to decode the prompt and response text)")
            from lopd.storage.interop import export_lightning_opd

            n = export_lightning_opd(store, dataset, out, _load_tokenizer(tokenizer), version=version)
    typer.echo(f"exported {n} samples of {dataset!r} to {out}")


def import_command(
    paths: Annotated[list[Path], typer.Argument(help="Parquet files in the reference Lightning-OPD layout.")],
    store: Annotated[str, typer.Option(help="Store: a directory (created if missing) or s3://BUCKET/PREFIX.")],
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
        check_store_path(store)
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
    from lopd.storage.manifest import verdict_explanation

    verdict = m.provenance.consistency.verdict
    typer.echo(f"imported: {m.name} v{m.version}: {m.num_samples} samples (teacher consistency: {verdict})")
    if verdict != "consistent":
        typer.secho(f"note: {verdict_explanation(m.provenance)}", fg=typer.colors.YELLOW, err=True)


def ls_command(
    store: Annotated[str, typer.Argument(help="Store directory (local stores only).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Datasets, versions (bytes, samples, tokens, teacher consistency), runs in progress and readers of a store."""
    from lopd.storage.listing import list_store

    with cli_errors():
        listing = list_store(store)
    typer.echo(listing.model_dump_json(indent=2) if as_json else render_listing(listing))


def gc_command(
    store: Annotated[str, typer.Argument(help="Store directory (local stores only).")],
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    keep: Annotated[int, typer.Option(help="Versions to keep, newest first (at least 1).")],
    staging_older_than: Annotated[
        str,
        typer.Option(help="A run in staging with nothing written for this long (and no live worker) is abandoned."),
    ] = "7d",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be removed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove old versions (all but the --keep newest) and abandoned runs; never a version a server is reading."""
    from lopd.storage.gc import collect_garbage

    with cli_errors():
        report = collect_garbage(
            store,
            dataset,
            keep=keep,
            staging_older_than_s=parse_duration(staging_older_than, "--staging-older-than"),
            dry_run=dry_run,
        )
    typer.echo(report.model_dump_json(indent=2) if as_json else render_gc(report))


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, flag: str) -> float:
    """Seconds in "90", "90s", "30m", "24h" or "7d"."""
    m = _DURATION_RE.match(text)
    if not m:
        raise InvalidInput(f"{flag} {text!r} is not a duration: write e.g. 90s, 30m, 24h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _size(n: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def _ago(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def render_listing(listing: StoreListing) -> str:
    """`lopd ls` for people: one block per dataset, then the readers."""
    lines = [f"store {listing.store}"]
    if not listing.datasets:
        lines.append("  (no datasets)")
    now = time.time()
    for d in listing.datasets:
        lines.append(d.name)
        for v in d.versions:
            if v.problem is not None:
                lines.append(f"  v{v.version:<4} UNREADABLE: {v.problem}")
                continue
            created = f"{v.created_at:%Y-%m-%d %H:%M}" if v.created_at else "-"
            verdict = "consistent" if v.verdict == "consistent" else f"INCONSISTENT: {v.verdict_explanation}"
            lines.append(
                f"  v{v.version:<4} {created}  {_size(v.bytes):>9}  {v.num_samples:,} samples  "
                f"{v.num_prompt_tokens + v.num_response_tokens:,} tokens ({v.num_response_tokens:,} response)  "
                f"{verdict}" + (f"  [read by {', '.join(v.read_by)}]" if v.read_by else "")
            )
        for r in d.in_progress:
            total = "?" if r.parts_total is None else str(r.parts_total)
            samples = "" if r.samples_total is None else f" ({r.samples_done:,}/{r.samples_total:,} samples)"
            idle = f", last written {_ago(now - r.last_activity.timestamp())} ago" if r.last_activity else ""
            worker = ", a worker is running" if r.worker_alive else ""
            lines.append(f"  run {r.run_key}: {r.parts_done}/{total} parts{samples}{idle}{worker}")
    live = [reader for reader in listing.readers if reader.live]
    stale = len(listing.readers) - len(live)
    lines.append(f"readers: {len(live)} live" + (f", {stale} expired (lopd gc removes them)" if stale else ""))
    for reader in live:
        reading = ", ".join(reader.reading) or "nothing yet"
        lines.append(f"  {reader.lease} (host {reader.host}, pid {reader.pid}): reading {reading}")
    return "\n".join(lines)


def render_gc(report: GcReport) -> str:
    """`lopd gc` for people: what went (or would go) and what stayed, with the reasons."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"gc {report.dataset} (keep the {'' if report.keep == 1 else f'{report.keep} '}newest)"
        + (": dry run, nothing removed" if report.dry_run else "")
    ]
    for item in report.removed:
        lines.append(f"  {verb:<12} {item.kind} {item.name}  {_size(item.bytes)}  {item.reason}")
    for item in report.kept:
        lines.append(f"  {'kept':<12} {item.kind} {item.name}  {item.reason}")
    lines.append(f"{'would free' if report.dry_run else 'freed'} {_size(report.bytes_freed)}")
    return "\n".join(lines)
