"""The `cir` command line: parses, loads the recipe, calls library functions. Nothing else.

Heavy libraries (torch, open_clip, transformers) are imported inside the commands that need
them, so `cir --help`, `cir recipes list` and shell completion answer at once.
"""

from __future__ import annotations

import errno
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


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion of built-in recipe names (`cir --install-completion` sets it up)."""
    from cir_cli.recipes import builtin_names

    return [name for name in builtin_names() if name.startswith(incomplete)]


def _version(value: bool) -> None:
    if value:
        from cir_cli import __version__

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
        from cir_cli.progress import set_enabled

        set_enabled(False)


RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe",
        "-r",
        help="Built-in recipe name or path to a .toml file.",
        autocompletion=complete_recipe,
    ),
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


def _print_dry_run(report) -> None:
    """Every check's line, then every problem: exit 2 when there is any."""
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
    body = to_toml(recipe.to_dict(), unset_as_comments=True)
    typer.echo(text + ("\n" if text else "") + body, nl=False)


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
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            help="A split that must be present (repeatable); others may be absent.",
        ),
    ] = None,
) -> None:
    """Generate the toy dataset, or check a real dataset's layout, counts and images.

    An absent split (e.g. CIRR train captions for a zero-shot user) is reported, not an error;
    exit 0 when every present split is whole, 2 when one has missing or unreadable images or
    a --require'd split is absent."""
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
        # only) and a text corpus; see cir_cli/backbones/toy_clip.py.
        from cir_cli.backbones.toy_clip import prepare_toy_lincir

        clip, texts = prepare_toy_lincir(root or Path("data/toy"), seed=seed)
        console.print(f"wrote {clip} and {texts}")
        return
    from cir_cli.data import DATASETS, get_dataset
    from cir_cli.data.check import (
        REPORT_COLUMNS,
        check_dataset,
        format_report,
        missing_required,
        report_absent,
        report_problems,
    )

    if dataset not in DATASETS:
        raise CirError(f"unknown dataset {dataset!r}; expected toy or one of {sorted(DATASETS)}")
    if root is None:
        raise CirError(f"`cir prepare {dataset}` needs --root <dataset folder>")
    known = get_dataset(dataset).splits
    for split in require or []:
        if split not in known:
            raise CirError(
                f"--require {split!r}: not a {dataset} split; expected one of {', '.join(known)}"
            )
    report = check_dataset(dataset, root, verify_images=not no_images)
    from rich.table import Table

    table = Table(*REPORT_COLUMNS, header_style="bold", title=f"{dataset} at {root}")
    for row in format_report(report):
        table.add_row(*row)
    console.print(table)
    if report.index_path:
        console.print(f"index written to {report.index_path}")
    for line in report_absent(report):
        console.print(f"note: {line}")
    problems = report_problems(report)
    for line in problems:
        console.print(f"[yellow]{line}[/]")
    absent = missing_required(report, require or [])
    if absent:
        raise CirError(
            f"{root}: required split(s) absent: {', '.join(absent)} (see the notes above)"
        )
    if problems:
        raise CirError(f"{root}: {len(problems)} problem(s) found (listed above)")


# ---------------------------------------------------------------------------------------------
# validate / submit


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    """One metric per row; FashionIQ's per-category recalls as a category x R@10/R@50 grid."""
    from rich.table import Table

    suffix10, suffix50 = "_recall_at10", "_recall_at50"
    cats = [
        k.removesuffix(suffix10)
        for k in metrics
        if k.endswith(suffix10)
        and k != "average" + suffix10
        and k.removesuffix(suffix10) + suffix50 in metrics
    ]
    shown: set[str] = set()
    if cats:
        grid = Table("category", "R@10", "R@50", "mean", title=title, header_style="bold")
        for cat in [*cats, "average"]:
            r10, r50 = metrics.get(cat + suffix10), metrics.get(cat + suffix50)
            if r10 is None or r50 is None:
                continue
            shown.update({cat + suffix10, cat + suffix50})
            style = "bold" if cat == "average" else None
            grid.add_row(cat, f"{r10:.2f}", f"{r50:.2f}", f"{(r10 + r50) / 2:.2f}", style=style)
        _console().print(grid)
        if "average_recall" in metrics:
            shown.add("average_recall")
            _console().print(f"average_recall {metrics['average_recall']:.2f}  (selection metric)")
    rest = {k: v for k, v in metrics.items() if k not in shown}
    if not rest:
        return
    table = Table("metric", "value", title=None if cats else title, header_style="bold")
    for key, value in rest.items():
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
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also write an HTML report (worst/best queries, audit)."),
    ] = None,
    report_queries: Annotated[
        int, typer.Option("--report-queries", min=1, help="Worst and best queries shown per split.")
    ] = 8,
    dry_run: DryRunOpt = False,
    save_candidates: SaveCandidatesOpt = None,
) -> None:
    """Evaluate a recipe's model on its dataset's validation split; prints and saves metrics."""
    cfg = _load(recipe, overrides, output_dir, device)
    if dry_run:
        from cir_cli.preflight import run_preflight

        _print_dry_run(run_preflight(cfg, "validate", checkpoint=checkpoint, split=split))
        return
    from cir_cli.workflows import run_validation

    cfg, checkpoint = _resolve_and_say(cfg, checkpoint)
    result = run_validation(
        cfg,
        checkpoint=checkpoint,
        split=split,
        save_rankings=save_rankings or cfg.eval.save_rankings,
        use_cache=not no_cache,
        report=report,
        report_queries=report_queries,
        save_candidates=save_candidates,
    )
    _print_metrics(result.metrics, f"{cfg.name} on {cfg.data.dataset} {split or cfg.eval.split}")
    _console().print(f"results in {result.run_dir}", soft_wrap=True)
    if report is not None:
        _console().print(f"report: {report}", soft_wrap=True)


def _train(stage, recipe, overrides, output_dir, device, resume, dry_run=False) -> None:
    from cir_cli.workflows import _recipe_for_resume, run_training

    cfg = _load(recipe, overrides, output_dir, device) if recipe else None
    if cfg is None and resume is None:
        raise CirError("--recipe is required (or --resume <run dir>)")
    if dry_run:
        from cir_cli.preflight import run_preflight

        _print_dry_run(run_preflight(_recipe_for_resume(cfg, resume), stage, resume=resume))
        return
    if cfg is not None:
        cfg, _ = _resolve_and_say(cfg, None)
    result = run_training(cfg, stage, resume=resume)
    if result.best:
        _print_metrics(
            {k: v for k, v in result.best.items() if k not in ("step",)},
            f"best validation ({stage})",
        )
    _console().print(
        f"run folder: {result.run_dir}  (best: {result.run_dir}/checkpoints/best)", soft_wrap=True
    )


ResumeOpt = Annotated[
    str | None, typer.Option("--resume", help="Continue a run folder from its last checkpoint.")
]
OptionalRecipeOpt = Annotated[
    str | None,
    typer.Option(
        "--recipe",
        "-r",
        help="Built-in recipe name or path to a .toml file.",
        autocompletion=complete_recipe,
    ),
]


@app.command()
@cli_command
def finetune(
    recipe: OptionalRecipeOpt = None,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Stage I: fine-tune the encoders with the method's query composition (torchrun-ready)."""
    _train("finetune", recipe, overrides, output_dir, device, resume, dry_run)


@app.command("train-combiner")
@cli_command
def train_combiner(
    recipe: OptionalRecipeOpt = None,
    overrides: SetOpt = None,
    output_dir: OutOpt = None,
    device: DeviceOpt = None,
    resume: ResumeOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Stage II: train the Combiner on cached features of the frozen stage-I encoders."""
    _train("combiner", recipe, overrides, output_dir, device, resume, dry_run)


# Where the test-split files go (the benchmarks' own servers, as their READMEs give them;
# CIRR's backup: https://cirr.junjie.au/) and what to upload there.
SUBMISSION_SERVERS = {
    "cirr": (
        "https://cirr.cecs.anu.edu.au/test_process/",
        "both files (recall_submission_*.json for Recall@K, recall_subset_submission_*.json "
        "for Recall_subset@K)",
    ),
    "circo": ("https://circo.micc.unifi.it/evaluation", "the circo_submission_*.json file"),
}


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
    dry_run: DryRunOpt = False,
    save_candidates: SaveCandidatesOpt = None,
) -> None:
    """Write the benchmark's test-server submission files, validated, atomically."""
    cfg = _load(recipe, overrides, output_dir, device)
    if dry_run:
        from cir_cli.preflight import run_preflight

        _print_dry_run(run_preflight(cfg, "submit", checkpoint=checkpoint, benchmark=benchmark))
        return
    from cir_cli.workflows import run_submission

    cfg, checkpoint = _resolve_and_say(cfg, checkpoint)
    paths = run_submission(
        cfg, benchmark, checkpoint=checkpoint, name=name, save_candidates=save_candidates
    )
    for path in paths:
        _console().print(f"wrote {path}", soft_wrap=True)
    server = SUBMISSION_SERVERS.get(benchmark)
    if server:
        _console().print(f"upload {server[1]} at {server[0]}", soft_wrap=True, markup=False)


# Registers `cir demo`, `cir index` / `cir search` and `cir weights` / `cir runs` on the app
# (their modules import this one).
from cir_cli import cli_demo, cli_search, cli_weights  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
