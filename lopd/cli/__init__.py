"""The `lopd` command line: one typer app, every command registered here.

Commands are thin shells: the settings-backed ones (`precompute`, `verify`, `serve`, `train`) take
their flags, help, defaults and `LOPD_*` variables from their settings model (`lopd.cli.params`);
the others call one library function. Every expected failure leaves through `params.cli_errors`:
`error: <what and how to fix it>` on stderr, exit 2. Heavy modules (torch, transformers, DuckDB,
FastAPI) are imported when a command runs, so `lopd --help` and the client side stay light.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from .demo import demo_command, tiny_model_command
from .pipeline import app as pipeline_app
from .sample import sample_command
from .scoring import finalize_command, fingerprint_command, precompute_command, verify_command
from .serve import serve_command
from .store import export_command, gc_command, import_command, ls_command, stats_command
from .train import plot_command, train_command

app = typer.Typer(
    name="lopd",
    help="Lightning OPD: precompute teacher log-probs once, serve them, train students offline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


app.command("sample")(sample_command)
app.command("precompute")(precompute_command)
app.command("finalize")(finalize_command)
app.command("stats")(stats_command)
app.command("ls")(ls_command)
app.command("gc")(gc_command)
app.command("verify")(verify_command)
app.command("fingerprint")(fingerprint_command)
app.command("serve")(serve_command())
app.command("train")(train_command)
app.command("plot")(plot_command)
app.command("export")(export_command)
app.command("import")(import_command)
app.command("tiny-model")(tiny_model_command)
app.command("demo")(demo_command)
app.add_typer(pipeline_app, name="pipeline")


def main() -> None:  # pragma: no cover - console entry point alias
    sys.exit(app())
