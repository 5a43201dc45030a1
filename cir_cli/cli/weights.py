"""`cir weights list|check|get` (library: cir_cli/weights.py).

Only the standard library and typer are imported up front; the recipe schema and weights.py
inside the commands, so these commands answer in well under two seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import SetOpt, _load, cli_command, complete_recipe
from cir_cli.errors import CirError

app = typer.Typer(
    help="Weight files a recipe needs: sources, hashes, local state, the --set lines.",
    no_args_is_help=True,
)

DirOpt = Annotated[
    Path | None,
    typer.Option(
        "--dir", help="Folder of published checkpoints (default: $CIR_WEIGHTS_DIR or models/)."
    ),
]
WCkptOpt = Annotated[
    str | None, typer.Option("--checkpoint", "-c", help="Also check this --checkpoint value.")
]
PublishedOpt = Annotated[
    bool,
    typer.Option(
        "--published", help="Count missing published checkpoints as problems (exit 2) too."
    ),
]


def _inputs(recipe: str, overrides, checkpoint, directory):
    from cir_cli.weights import recipe_inputs

    cfg = _load(recipe, overrides, None, None)
    return cfg, recipe_inputs(cfg, checkpoint, str(directory) if directory else None)


def _print(name: str, items) -> None:
    from cir_cli.weights import describe

    required = sum(i.required for i in items)
    typer.echo(f"{name}: {required} input(s), {len(items) - required} published checkpoint(s)")
    for item in items:
        for line in describe(item):
            typer.echo(line)


@app.command("list")
@cli_command
def weights_list(
    recipes: Annotated[
        list[str] | None,
        typer.Argument(
            help="Recipes (default: every built-in one).", autocompletion=complete_recipe
        ),
    ] = None,
    overrides: SetOpt = None,
    directory: DirOpt = None,
) -> None:
    """Each file the recipe needs: source URL, SHA1 / size, local state, the exact --set line."""
    from cir_cli.recipes import builtin_names

    for n, name in enumerate(recipes or builtin_names()):
        _, items = _inputs(name, overrides, None, directory)
        if n:
            typer.echo("")
        _print(name, items)


@app.command("check")
@cli_command
def weights_check(
    recipe: Annotated[
        str, typer.Argument(help="Recipe name or path.", autocompletion=complete_recipe)
    ],
    overrides: SetOpt = None,
    checkpoint: WCkptOpt = None,
    directory: DirOpt = None,
    published: PublishedOpt = False,
) -> None:
    """Report every missing or mismatching input at once; exit 2 if any."""
    from cir_cli.weights import problems

    _, items = _inputs(recipe, overrides, checkpoint, directory)
    _print(recipe, items)
    bad = problems(items, published)
    if bad:
        names = ", ".join(f"{i.key}={i.value}" for i in bad)
        raise CirError(f"{recipe}: {len(bad)} input(s) missing or wrong: {names}")
    typer.echo(f"{recipe}: every required input is present")


@app.command("get")
@cli_command
def weights_get(
    recipe: Annotated[
        str, typer.Argument(help="Recipe name or path.", autocompletion=complete_recipe)
    ],
    overrides: SetOpt = None,
    checkpoint: WCkptOpt = None,
    directory: DirOpt = None,
    published: Annotated[
        bool, typer.Option("--published/--required-only", help="Also fetch published checkpoints.")
    ] = True,
) -> None:
    """Fetch the recipe's hub-hosted files with huggingface_hub; print how to get the others."""
    from cir_cli.weights import download_input, fetchable, how_to_get, problems, recipe_inputs

    cfg, items = _inputs(recipe, overrides, checkpoint, directory)
    wanted = [i for i in items if i.required or published]
    for item, repo, files in fetchable(wanted):
        typer.echo(f"fetching {repo} {' / '.join(files) or '(whole repository)'} ...")
        paths = download_input(item, repo, files)
        typer.echo(f"  -> {paths[0]}")
    items = recipe_inputs(cfg, checkpoint, str(directory) if directory else None)
    left = [i for i in problems(items, published) if i.status == "missing"]
    for item in left:
        typer.echo(how_to_get(item))
    if left:
        raise CirError(f"{recipe}: {len(left)} input(s) still missing (how to get them: above)")
    typer.echo(f"{recipe}: every {'' if published else 'required '}input is present")
