"""The `cir` command line: parses, loads the recipe, calls library functions. Nothing else.

Heavy libraries (torch, open_clip, transformers) are imported inside the commands that need
them, so `cir --help`, `cir recipes list` and shell completion answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from cir_cli.errors import CirError

app = typer.Typer(
    help="Composed image retrieval: train, validate and submit CIR models from TOML recipes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipes_app = typer.Typer(
    help="List, show, copy and check the built-in recipes.", no_args_is_help=True
)
app.add_typer(recipes_app, name="recipes")

_state = {"debug": os.environ.get("CIR_DEBUG", "") not in ("", "0")}


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 2) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True)
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
            fail(str(exc), exc.exit_code)

    return wrapper


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    if debug:
        _state["debug"] = True
    if quiet:
        from cir_cli.progress import set_enabled

        set_enabled(False)


RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a .toml file.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: --set finetune.lr=1e-5 (repeatable)."),
]
OutOpt = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Where run folders go (output.dir).")
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto (default: recipe).")
]
CkptOpt = Annotated[
    str | None,
    typer.Option("--checkpoint", "-c", help="Trained weights: a run/checkpoint dir or a seed .pt."),
]


def _load(recipe: str, overrides: list[str] | None, output_dir: Path | None, device: str | None):
    from cir_cli.recipes import load_recipe

    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"output.dir={str(output_dir)!r}".replace("'", '"'))
    if device is not None:
        extra.append(f'device="{device}"')
    return load_recipe(recipe, extra)


# ---------------------------------------------------------------------------------------------
# recipes


@recipes_app.command("list")
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


@recipes_app.command("show")
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
    typer.echo(text + ("\n" if text else "") + to_toml(recipe.to_dict()), nl=False)


@recipes_app.command("cp")
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


@recipes_app.command("validate")
@cli_command
def recipes_validate(
    name: Annotated[str, typer.Argument(help="Recipe name or path.")],
    overrides: SetOpt = None,
) -> None:
    """Check a recipe against the schema (exit 2 with the offending key if it is wrong)."""
    from cir_cli.recipes import load_recipe

    recipe = load_recipe(name, overrides)
    typer.echo(f"{name}: OK ({recipe.method.name}, {recipe.backbone.arch}, {recipe.data.dataset})")


# ---------------------------------------------------------------------------------------------
# prepare


@app.command()
@cli_command
def prepare(
    dataset: Annotated[
        str, typer.Argument(help="toy, toy-lincir, cirr, fashioniq, circo or genecis.")
    ],
    root: Annotated[
        Path | None, typer.Option("--root", help="Dataset root to check (cirr, fashioniq).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Where `prepare toy` writes.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="Toy layout: cirr or fashioniq.")] = "cirr",
    seed: Annotated[int, typer.Option("--seed", help="Toy generator seed.")] = 0,
    no_images: Annotated[
        bool, typer.Option("--no-verify-images", help="Skip opening every image.")
    ] = False,
) -> None:
    """Generate the toy dataset, or check a real dataset's layout, counts and images."""
    console = _console()
    if dataset == "toy":
        from cir_cli.data.toy import generate_toy

        if fmt not in ("cirr", "fashioniq"):
            raise CirError(f"--format {fmt!r}: expected cirr or fashioniq")
        target = out or Path("data/toy")
        summary = generate_toy(target, fmt=fmt, seed=seed)
        console.print(f"toy dataset ({fmt} layout, seed {seed}) written to {target}")
        console.print(summary)
        return
    if dataset == "toy-lincir":
        # LinCIR is zero-shot: it needs an aligned CLIP (trained here on the toy *train* split
        # only) and a text corpus; see cir_cli/data/toy_lincir.py.
        from cir_cli.data.toy_lincir import prepare_toy_lincir

        clip, texts = prepare_toy_lincir(root or Path("data/toy"), seed=seed)
        console.print(f"wrote {clip} and {texts}")
        return
    from cir_cli.data import DATASETS
    from cir_cli.data.check import REPORT_COLUMNS, check_dataset, format_report, report_problems

    if dataset not in DATASETS:
        raise CirError(f"unknown dataset {dataset!r}; expected toy or one of {sorted(DATASETS)}")
    if root is None:
        raise CirError(f"`cir prepare {dataset}` needs --root <dataset folder>")
    report = check_dataset(dataset, root, verify_images=not no_images)
    from rich.table import Table

    table = Table(*REPORT_COLUMNS, header_style="bold", title=f"{dataset} at {root}")
    for row in format_report(report):
        table.add_row(*row)
    console.print(table)
    if report.index_path:
        console.print(f"index written to {report.index_path}")
    problems = report_problems(report)
    if problems:
        for line in problems:
            console.print(f"[yellow]{line}[/]")
        raise CirError(f"{root}: {len(problems)} problem(s) found (listed above)")


# ---------------------------------------------------------------------------------------------
# validate / submit


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from rich.table import Table

    table = Table("metric", "value", title=title, header_style="bold")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.2f}")
    _console().print(table)


SaveCandidatesOpt = Annotated[
    int | None,
    typer.Option(
        "--save-candidates",
        help="Also write each query's top-K names + scores per split (a re-ranker's input).",
    ),
]


@app.command()
@cli_command
def validate(
    recipe: RecipeOpt,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    checkpoint: CkptOpt = None,
    split: Annotated[str | None, typer.Option("--split", help="Default: eval.split.")] = None,
    save_rankings: Annotated[
        bool, typer.Option("--save-rankings", help="Also write each query's top-50 ids.")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Do not use the feature cache.")
    ] = False,
    save_candidates: SaveCandidatesOpt = None,
) -> None:
    """Evaluate a recipe's model on its dataset's validation split; prints and saves metrics."""
    from cir_cli.workflows import run_validation

    cfg = _load(recipe, overrides, output_dir, device)
    result = run_validation(
        cfg,
        checkpoint=checkpoint,
        split=split,
        save_rankings=save_rankings or cfg.eval.save_rankings,
        use_cache=not no_cache,
        save_candidates=save_candidates,
    )
    _print_metrics(result.metrics, f"{cfg.name} on {cfg.data.dataset} {split or cfg.eval.split}")
    _console().print(f"results in {result.run_dir}")


def _train(stage, recipe, overrides, output_dir, device, resume) -> None:
    from cir_cli.workflows import run_training

    cfg = _load(recipe, overrides, output_dir, device) if recipe else None
    if cfg is None and resume is None:
        raise CirError("--recipe is required (or --resume <run dir>)")
    result = run_training(cfg, stage, resume=resume)
    if result.best:
        _print_metrics(
            {k: v for k, v in result.best.items() if k not in ("step",)},
            f"best validation ({stage})",
        )
    _console().print(f"run folder: {result.run_dir}  (best: {result.run_dir}/checkpoints/best)")


ResumeOpt = Annotated[
    str | None, typer.Option("--resume", help="Continue a run folder from its last checkpoint.")
]
OptionalRecipeOpt = Annotated[
    str | None, typer.Option("--recipe", "-r", help="Built-in recipe name or path to a .toml file.")
]


@app.command()
@cli_command
def finetune(
    recipe: OptionalRecipeOpt = None,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = None,
) -> None:
    """Stage I: fine-tune the encoders with the method's query composition (torchrun-ready)."""
    _train("finetune", recipe, overrides, output_dir, device, resume)


@app.command("train-combiner")
@cli_command
def train_combiner(
    recipe: OptionalRecipeOpt = None,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = None,
) -> None:
    """Stage II: train the Combiner on cached features of the frozen stage-I encoders."""
    _train("combiner", recipe, overrides, output_dir, device, resume)


@app.command()
@cli_command
def submit(
    benchmark: Annotated[
        str, typer.Argument(help="cirr (test1 server files) or circo (test top-50 ids).")
    ],
    recipe: RecipeOpt,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    checkpoint: CkptOpt = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Submission name (default: recipe).")
    ] = None,
    save_candidates: SaveCandidatesOpt = None,
) -> None:
    """Write the benchmark's test-server submission files, validated, atomically."""
    from cir_cli.workflows import run_submission

    cfg = _load(recipe, overrides, output_dir, device)
    paths = run_submission(
        cfg, benchmark, checkpoint=checkpoint, name=name, save_candidates=save_candidates
    )
    for path in paths:
        _console().print(f"wrote {path}")


from cir_cli import cli_search  # noqa: E402,F401  (registers `cir index` and `cir search`)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
