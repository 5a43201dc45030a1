"""`cir validate`, `cir finetune`, `cir train-combiner` and `cir submit` (library: workflows.py).

A recipe's model is evaluated, trained or run on a test split; each command loads the recipe,
calls cir_cli.workflows and prints what came back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import (
    CkptOpt,
    DeviceOpt,
    DryRunOpt,
    SetOpt,
    _console,
    _dry_run,
    _load,
    _resolve_and_say,
    cli_command,
    complete_recipe,
)
from cir_cli.errors import CirError

app = typer.Typer()

RecipeOpt = Annotated[
    str,
    typer.Option(
        "--recipe",
        "-r",
        help="Built-in recipe name or path to a .toml file.",
        autocompletion=complete_recipe,
    ),
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
OutOpt = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Where run folders go (output.dir).")
]
ResumeOpt = Annotated[
    str | None, typer.Option("--resume", help="Continue a run folder from its last checkpoint.")
]
SaveCandidatesOpt = Annotated[
    int | None,
    typer.Option(
        "--save-candidates",
        help="Also write each query's top-K names + scores per split (a re-ranker's input).",
    ),
]


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
        _dry_run(cfg, "validate", checkpoint=checkpoint, split=split)
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
        _dry_run(_recipe_for_resume(cfg, resume), stage, resume=resume)
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
        _dry_run(cfg, "submit", checkpoint=checkpoint, benchmark=benchmark)
        return
    from cir_cli.data import get_dataset
    from cir_cli.workflows import run_submission

    cfg, checkpoint = _resolve_and_say(cfg, checkpoint)
    paths = run_submission(
        cfg, benchmark, checkpoint=checkpoint, name=name, save_candidates=save_candidates
    )
    for path in paths:
        _console().print(f"wrote {path}", soft_wrap=True)
    # Where the files go: the dataset's test server (data/<dataset>.py).
    server = get_dataset(benchmark).submission
    if server:
        _console().print(f"upload {server.upload} at {server.server}", soft_wrap=True, markup=False)
