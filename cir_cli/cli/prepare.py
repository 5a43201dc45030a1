"""`cir prepare`: generate the toy dataset or check a real dataset (library: cir_cli/data/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cir_cli.cli.common import _console, cli_command
from cir_cli.errors import CirError

app = typer.Typer()


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
