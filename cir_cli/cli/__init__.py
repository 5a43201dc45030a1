"""The `cir` command line: parses, loads the recipe, calls library functions. Nothing else.

One module per command group (prepare, workflows: validate/finetune/train-combiner/submit, demo,
search: index/search, runs, recipes, weights), each with its own Typer app; this module joins
them under the root app, which owns the global options (--debug, --quiet, --version). What they
share (options, console, recipe loading, error handling) is in common.py.

Heavy libraries (torch, open_clip, transformers) are imported inside the commands that need
them, so `cir --help`, `cir recipes list` and shell completion answer at once.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from cir_cli import __version__
from cir_cli.cli.common import _state
from cir_cli.cli.demo import app as demo_app
from cir_cli.cli.prepare import app as prepare_app
from cir_cli.cli.recipes import app as recipes_app
from cir_cli.cli.runs import app as runs_app
from cir_cli.cli.search import app as search_app
from cir_cli.cli.weights import app as weights_app
from cir_cli.cli.workflows import app as workflows_app
from cir_cli.progress import set_enabled

__all__ = ["app", "main"]

app = typer.Typer(
    help="Composed image retrieval: train, validate and submit CIR models from TOML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Unnamed groups add their commands at the top level, in this order (the order of `cir --help`).
for group in (prepare_app, workflows_app, demo_app, search_app, runs_app):
    app.add_typer(group)
app.add_typer(recipes_app, name="recipes")
app.add_typer(weights_app, name="weights")


def _quiet_third_party_logs() -> None:
    """Keep other libraries' log records off stderr (one error line is the contract).

    A library calling logging.error() with no handler configured makes Python print
    `ERROR:root:...`; a NullHandler on the root logger stops that, and warnings are routed
    into logging the same way. --debug shows them.
    """
    import logging

    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    # Library warnings (torch, transformers UserWarnings) become log records too: off stderr.
    logging.captureWarnings(True)
    for name in ("transformers", "huggingface_hub", "timm", "open_clip", "PIL", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cir {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    if debug:
        _state["debug"] = True
    else:
        _quiet_third_party_logs()
    if quiet:
        set_enabled(False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
