"""`cir weights list|check|get` and `cir runs` (library: weights.py, run_table.py).

Registered on the main app by cli.py; only the standard library, typer and the recipe schema
are imported up front, so these commands answer in well under two seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli import SetOpt, _load, app, cli_command, complete_recipe
from cir_cli.errors import CirError

weights_app = typer.Typer(
    help="Weight files a recipe needs: sources, hashes, local state, the --set lines.",
    no_args_is_help=True,
)
app.add_typer(weights_app, name="weights")

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


@weights_app.command("list")
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


@weights_app.command("check")
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


@weights_app.command("get")
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
    from cir_cli.weights import download, fetchable, problems, recipe_inputs, verify_file

    cfg, items = _inputs(recipe, overrides, checkpoint, directory)
    wanted = [i for i in items if i.required or published]
    for item, repo, files in fetchable(wanted):
        any_of = item.entry is not None and item.entry.open_clip is not None
        typer.echo(f"fetching {repo} {' / '.join(files) or '(whole repository)'} ...")
        paths = download(repo, files, any_of=any_of)
        if item.entry is not None and files and not any_of:
            for path in paths:
                wrong = verify_file(path, item.entry)
                if wrong:
                    raise CirError(f"{path}: downloaded file does not match: {wrong}")
        typer.echo(f"  -> {paths[0]}")
    items = recipe_inputs(cfg, checkpoint, str(directory) if directory else None)
    left = [i for i in problems(items, published) if i.status == "missing"]
    for item in left:
        entry = item.entry
        if entry is not None and entry.make:
            typer.echo(f"make {item.value}: {entry.make}")
        elif entry is not None and entry.in_archive:
            zipped = Path(item.value).parents[len(Path(entry.local or "").parts) - 1]
            typer.echo(f"by hand: {item.value} comes in {zipped / entry.in_archive} (above)")
        elif entry is not None and entry.url:
            direct = entry.url.startswith(
                ("https://storage.googleapis.com", "https://openaipublic")
            )
            if direct:
                typer.echo(f"by hand: curl -L --create-dirs -o {item.value} {entry.url}")
            else:
                typer.echo(f"by hand: open {entry.url} and save the file as {item.value}")
            if entry.use == "archive":
                typer.echo(f"  then: {item.set_line}")
        else:
            typer.echo(f"by hand: {item.key} = {item.value} ({item.detail})")
    if left:
        raise CirError(f"{recipe}: {len(left)} input(s) still missing (how to get them: above)")
    typer.echo(f"{recipe}: every {'' if published else 'required '}input is present")


# ---------------------------------------------------------------------------------------------
# runs


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
