"""`cir runs`: run folders as a table, or two compared (library: cir_cli/run_table.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import cli_command, complete_recipe

app = typer.Typer()


@app.command("runs")
@cli_command
def runs(
    recipe: Annotated[
        str | None,
        typer.Argument(help="Only this recipe's runs.", autocompletion=complete_recipe),
    ] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Folder of run folders.")
    ] = Path("runs"),
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
    compare: Annotated[
        tuple[str, str] | None,
        typer.Option("--compare", help="Two run folders (or names under --output-dir)."),
    ] = None,
) -> None:
    """Run folders as a table: recipe, stage, started, steps, status, best metric, base."""
    from cir_cli import run_table

    if compare:
        a, b = (run_table.find_run(output_dir, ref) for ref in compare)
        result = run_table.compare_runs(a, b)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
        else:
            for line in run_table.format_compare(result):
                typer.echo(line)
        return
    infos = run_table.list_runs(output_dir, recipe)
    if as_json:
        typer.echo(json.dumps([i.to_dict() for i in infos], indent=2, default=str))
        return
    if not infos:
        typer.echo(f"no run folders under {output_dir}" + (f" for {recipe}" if recipe else ""))
        return
    for line in run_table.format_table(infos):
        typer.echo(line)
