"""rich progress bars for every long loop: on rank 0, on a terminal, unless disabled (-q).

Off a terminal a rich bar prints nothing useful (blank lines in a log file); training then
prints plain lines instead (engine/progress_log.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

_enabled = os.environ.get("CIR_PROGRESS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def on_terminal() -> bool:
    """Whether stdout (where rich draws its bars) is an interactive terminal, not a file, a
    pipe (`| tee`), an sbatch or a nohup log."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


def bars_visible() -> bool:
    """Rich bars only where someone can watch them; elsewhere the trainer prints plain lines."""
    return _enabled and is_main_process() and on_terminal()


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, fields: bool = False
) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)`; shows a transient rich bar when enabled on rank 0.

    With `fields=True` the bar shows a free-form status text (loss, lr, samples/s) that
    `advance(status="...")` updates.
    """
    if not bars_visible():
        yield lambda n=1, **kw: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn("{task.fields[status]}"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            if status is not None:
                progress.update(task, advance=n, status=status)
            else:
                progress.advance(task, n)

        yield advance
