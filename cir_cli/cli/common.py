"""What every `cir` command module shares: options, the console, recipe loading, error handling.

Imports only the standard library, typer and cir_cli.errors up front; each command imports the
library code it calls inside its function, so `cir --help`, `cir recipes list` and shell
completion answer at once.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path
from typing import Annotated

import typer

from cir_cli.errors import CirError

_state = {"debug": os.environ.get("CIR_DEBUG", "") not in ("", "0")}


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape

    # Escaped: a message may quote user text or name an extra like 'cir-cli[demo]'.
    _console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def cli_command(func):
    """Turn a CirError into one line on stderr and exit code 2 (tracebacks only with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CirError as exc:
            if _state["debug"]:
                raise
            fail(_one_line(str(exc)), exc.exit_code)
        except OSError as exc:
            # Any write the system refused outside io.atomic_path (a folder creation, a
            # library writing directly): the same one line naming the path.
            from cir_cli.io import WRITE_ERRNOS, describe_write_error

            if _state["debug"] or exc.errno not in WRITE_ERRNOS or not exc.filename:
                raise
            # Only a full disk or a read-only one is surely a write; EACCES may be a read.
            writing = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)
            fail(describe_write_error(exc.filename, exc, verb="write" if writing else "access"))

    return wrapper


def _one_line(message: str) -> str:
    return " ".join(message.split()) if "\n" in message else message


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of built-in recipe names (`cir --install-completion` sets it up)."""
    from cir_cli.recipes import builtin_names

    return [name for name in builtin_names() if name.startswith(incomplete)]


SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: --set finetune.lr=1e-5 (repeatable)."),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto (default: recipe).")
]
CkptOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        "-c",
        help="Trained weights: a run/checkpoint dir, a seed .pt, `latest` or hf://org/repo/file.",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Check recipe, data, weights, output folder, disk and device; load no model.",
    ),
]


def _load(recipe: str, overrides: list[str] | None, output_dir: Path | None, device: str | None):
    from cir_cli.recipes import load_recipe

    values: dict[str, str] = {}
    if device is not None:
        values["device"] = device
    cfg = load_recipe(recipe, overrides, values)
    if output_dir is not None:
        # The feature cache stays where it was (<recipe's output.dir>/.cache unless set):
        # runs written elsewhere must not re-encode every image (stage II after --output-dir).
        if cfg.output.cache_dir is None:
            cfg.output.cache_dir = str(Path(cfg.output.dir) / ".cache")
        cfg.output.dir = str(output_dir)
    return cfg


def _dry_run(cfg, command: str, **inputs) -> None:
    """`--dry-run`: run the preflight of `command`, print every check's line, then every
    problem; exit 2 when there is any."""
    from cir_cli.preflight import run_preflight

    report = run_preflight(cfg, command, **inputs)
    typer.echo(f"dry run of `cir {report.command}` (no model is loaded):")
    for line in report.lines:
        typer.echo(line)
    if report.problems:
        raise CirError(f"dry run: {len(report.problems)} problem(s), listed above")
    typer.echo("dry run: everything needed is in place")


def _resolve_and_say(cfg, checkpoint: str | None, stages=("combiner", "finetune")):
    """Resolve `latest` / hf:// and say what they became, so a log records which run was used."""
    from cir_cli.workflows import resolve_refs

    cfg, checkpoint, notes = resolve_refs(cfg, checkpoint, stages)
    for note in notes:
        _console(stderr=True).print(f"resolved {note}", soft_wrap=True, markup=False)
    return cfg, checkpoint
