"""`cir recipes list|show|cp|validate` (library: cir_cli/recipes.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import SetOpt, _console, cli_command

app = typer.Typer(help="List, show, copy and check the built-in recipes.", no_args_is_help=True)


@app.command("list")
@cli_command
def recipes_list() -> None:
    """Built-in recipes with a one-line description each."""
    import tomllib

    from rich.table import Table

    from cir_cli.recipes import builtin_dir, builtin_names

    table = Table("recipe", "description", box=None, header_style="bold")
    for name in builtin_names():
        raw = tomllib.loads((builtin_dir() / f"{name}.toml").read_text(encoding="utf-8"))
        table.add_row(name, raw.get("description", ""))
    _console().print(table)


@app.command("show")
@cli_command
def recipes_show(
    name: Annotated[str, typer.Argument(help="Recipe name or path.")],
    overrides: SetOpt = None,
) -> None:
    """Print the resolved recipe (extends and --set applied, defaults filled in) as TOML."""
    from cir_cli.recipes import find_recipe, header_comment, load_recipe, to_toml

    recipe = load_recipe(name, overrides)
    header = header_comment(find_recipe(name))
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    body = to_toml(recipe.to_dict(), unset_as_comments=True)
    typer.echo(text + ("\n" if text else "") + body, nl=False)


@app.command("cp")
@cli_command
def recipes_cp(
    name: Annotated[str, typer.Argument(help="Built-in recipe to copy.")],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a recipe (comments included) to edit it; then pass its path to --recipe."""
    from cir_cli.recipes import copy_recipe

    path = copy_recipe(name, dest, force)
    typer.echo(f"copied {name} to {path}")


@app.command("validate")
@cli_command
def recipes_validate(
    name: Annotated[str, typer.Argument(help="Recipe name or path.")],
    overrides: SetOpt = None,
) -> None:
    """Check a recipe against the schema (exit 2 with the offending key if it is wrong)."""
    from cir_cli.recipes import load_recipe

    recipe = load_recipe(name, overrides)
    typer.echo(f"{name}: OK ({recipe.method.name}, {recipe.backbone.arch}, {recipe.data.dataset})")
