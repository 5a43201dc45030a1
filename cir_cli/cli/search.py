"""`cir index` and `cir search`: retrieval over a user's own image folder (library: search/).

torch and the model code are imported inside the commands, so `cir --help` stays fast.
"""

from __future__ import annotations

import json
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

# How many unreadable files the summary names before it gives a count.
_SKIPPED_SHOWN = 20
# Batch searches print a summary table of this many queries (--output has them all).
_QUERIES_SHOWN = 20


def _print_summary(summary, action: str) -> None:
    from rich.markup import escape

    console = _console()
    parts = [f"{len(summary.encoded)} encoded"]
    if action == "updated":
        parts += [f"{summary.kept} unchanged", f"{len(summary.removed)} removed"]
    parts.append(f"{len(summary.skipped)} skipped")
    rate = f", {summary.images_per_second:.1f} images/s" if summary.encoded else ""
    console.print(
        f"{action} {summary.location}: {summary.total} images ({', '.join(parts)}) "
        f"in {summary.seconds:.1f}s{rate}",
        soft_wrap=True,
    )
    if summary.skipped:
        console.print(f"[yellow]{len(summary.skipped)} unreadable file(s) skipped:[/]")
        for path, reason in summary.skipped[:_SKIPPED_SHOWN]:
            console.print(f"  [yellow]{escape(path)}[/]: {escape(reason)}", soft_wrap=True)
        if len(summary.skipped) > _SKIPPED_SHOWN:
            console.print(f"  ... and {len(summary.skipped) - _SKIPPED_SHOWN} more")


@app.command()
@cli_command
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    recipe: Annotated[
        str | None,
        typer.Option(
            "--recipe",
            "-r",
            help="Recipe of the model (not needed with --update).",
            autocompletion=complete_recipe,
        ),
    ] = None,
    overrides: SetOpt = None,
    checkpoint: CkptOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Index folder to write, e.g. photos.cirindex.")
    ] = None,
    update: Annotated[
        Path | None,
        typer.Option("--update", help="Existing index: encode only new/changed files."),
    ] = None,
    device: DeviceOpt = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Default: eval.batch_size.")
    ] = None,
    num_workers: Annotated[
        int | None, typer.Option("--num-workers", min=0, help="Default: data.num_workers.")
    ] = None,
    dry_run: DryRunOpt = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Feature storage: float32 or float16 (half the disk).")
    ] = "float32",
    ann: Annotated[
        str | None,
        typer.Option("--ann", help="Also build an approximate faiss index: ivf or hnsw."),
    ] = None,
    ann_params: Annotated[
        str | None,
        typer.Option(
            "--ann-params",
            help="e.g. nlist=1024,nprobe=16 (ivf) or m=32,ef_search=128 (hnsw); "
            "defaults from the gallery size.",
        ),
    ] = None,
) -> None:
    """Encode a folder of images into a searchable index (or --update one).

    Under `torchrun --nproc-per-node N -m cir_cli index ...` each process encodes a shard of
    the files and rank 0 writes the index (the same index as one process).
    """
    if dry_run:
        if recipe is None:
            raise CirError("--dry-run needs --recipe")
        cfg = _load(recipe, overrides, None, device)
        _dry_run(cfg, "index", checkpoint=checkpoint, folder=folder, out=None if update else out)
        return
    from cir_cli import search as lib

    if update is not None:
        if out is not None and out.resolve() != update.resolve():
            raise CirError("--out and --update name different indexes; --update rewrites in place")
        cfg = _load(recipe, overrides, None, None) if recipe else None
        if overrides and cfg is None:
            raise CirError("--set needs --recipe (with --update the index's recipe is used)")
        if ann or ann_params or dtype != "float32":
            raise CirError(
                "--dtype/--ann apply when building; --update keeps the index's own settings"
            )
        if cfg is not None:
            cfg, checkpoint = _resolve_and_say(cfg, checkpoint)
        summary = lib.update_index(folder, update, cfg, checkpoint, device, batch_size, num_workers)
        _print_summary(summary, "updated")
        return
    if recipe is None:
        raise CirError("--recipe is required to build an index (or --update <index>)")
    if out is None:
        raise CirError("--out <name>.cirindex is required (or --update <index>)")
    cfg = _load(recipe, overrides, None, None)
    # `latest` (the recipe's newest run) and hf:// work here as in validate and submit.
    cfg, checkpoint = _resolve_and_say(cfg, checkpoint)
    summary = lib.build_index(
        folder, cfg, out, checkpoint, device, batch_size, num_workers,
        dtype=dtype, ann_kind=ann, ann_params=ann_params,
    )
    if summary.rank == 0:
        _print_summary(summary, "indexed")


def _results_table(result, title: str):
    from rich.markup import escape
    from rich.table import Table

    table = Table("rank", "score", "path", title=title, header_style="bold", title_justify="left")
    for hit in result.hits:
        style = "bold green" if result.target_rank == hit.rank else None
        table.add_row(str(hit.rank), f"{hit.score:.4f}", escape(str(hit.path)), style=style)
    return table


def _target_line(res, k: int, gallery: int) -> str:
    name = res.query.target.name
    if res.gallery_rank is None:
        return f"target {name}: not in the index"
    where = "in the top" if res.gallery_rank <= k else "outside the top"
    return f"target {name}: rank {res.gallery_rank} of {gallery} ({where} {k})"


@app.command()
@cli_command
def search(
    index_path: Annotated[Path, typer.Argument(metavar="INDEX", help="Index from `cir index`.")],
    image: Annotated[
        Path | None, typer.Option("--image", "-i", help="Reference (query) image.")
    ] = None,
    text: Annotated[str | None, typer.Option("--text", "-t", help="Modification text.")] = None,
    target: Annotated[
        Path | None,
        typer.Option("--target", help="The image you expect: its rank is printed, also beyond k."),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Results per query.")] = 12,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (JSONL with --queries).")] = (
        False
    ),
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML contact sheet.")
    ] = None,
    exclude_query: Annotated[
        bool, typer.Option("--exclude-query", help="Drop the query image itself from results.")
    ] = False,
    queries: Annotated[
        Path | None,
        typer.Option("--queries", help="Batch: CSV/JSONL with image,text[,target] per line."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Batch: write one row per query (.csv or .jsonl)."),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", "-r", help="Check against this recipe (default: the index's)."),
    ] = None,
    overrides: SetOpt = None,
    checkpoint: CkptOpt = None,
    device: DeviceOpt = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="auto (ann when the index has one, else torch), torch, faiss (exact) or "
            "ann (approximate).",
        ),
    ] = "auto",
) -> None:
    """Find images matching a reference image modified by a text, in an index."""
    from cir_cli import search as lib

    if queries is None:
        if image is None or text is None:
            raise CirError("give --image and --text (or --queries <file.csv|jsonl>)")
        batch = [lib.Query(image, text, target.expanduser().resolve() if target else None)]
    else:
        if image is not None or text is not None or target is not None:
            raise CirError("--queries cannot be combined with --image/--text")
        batch = lib.read_queries(queries)
    lib.check_query_images(batch)
    idx = lib.load_index(index_path)
    cfg = _load(recipe, overrides, None, None) if recipe else None
    if overrides and cfg is None:
        raise CirError("--set needs --recipe (the index's recipe is used otherwise)")
    model = lib.load_index_model(idx, cfg, checkpoint, device)
    results = lib.search(idx, model, batch, k, exclude_query, backend)
    if html_out is not None:
        title = f"cir search: {idx.location.name}"
        subtitle = f"{len(idx.files)} images in {idx.root} | {idx.manifest.get('recipe_name')}"
        lib.render_html(results, html_out, title=title, subtitle=subtitle)
    if output is not None:
        lib.write_results(results, output)
    from rich.markup import escape

    console = _console()
    if as_json:
        if queries is None:
            payload = {"index": str(idx.location), "k": k, **results[0].to_dict()}
            typer.echo(json.dumps(payload, indent=2))
        else:
            for result in results:
                typer.echo(json.dumps(result.to_dict()))
    elif queries is None:
        res = results[0]
        title = escape(f"{res.query.image.name} + “{res.query.text}”")
        console.print(_results_table(res, title))
        if res.query.target is not None:
            console.print(_target_line(res, k, len(idx.files)), soft_wrap=True, markup=False)
    else:
        from rich.table import Table

        labelled = any(r.query.target is not None for r in results)
        columns = ["#", "image", "text", "top hit", "score"] + (["target rank"] if labelled else [])
        table = Table(*columns, header_style="bold")
        for n, res in enumerate(results[:_QUERIES_SHOWN], 1):
            top = res.hits[0] if res.hits else None
            row = [
                str(n),
                escape(res.query.image.name),
                escape(res.query.text),
                escape(top.path.name) if top else "-",
                f"{top.score:.4f}" if top else "-",
            ]
            if labelled:
                row.append(str(res.gallery_rank) if res.gallery_rank else "-")
            table.add_row(*row)
        console.print(table)
        if len(results) > _QUERIES_SHOWN:
            more = len(results) - _QUERIES_SHOWN
            where = f" (all rows in {output})" if output else " (--output writes all rows)"
            console.print(f"... and {more} more queries{where}")
    recall = lib.recall_at(results, [n for n in (1, 5, 10, 50) if n <= k] or [k])
    if recall and not as_json:
        console.print(
            "recall: " + "  ".join(f"R@{n} {v:.2f}" for n, v in recall.items()),
            soft_wrap=True,
        )
    elif recall:
        typer.echo(json.dumps({"recall": {f"R@{n}": v for n, v in recall.items()}}), err=True)
    notes = []
    if html_out is not None:
        notes.append(f"wrote {html_out}")
    if output is not None:
        notes.append(f"wrote {output}")
    for note in notes:
        _console(stderr=as_json).print(note)
