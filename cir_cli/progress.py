"""rich progress bars for every long loop, switched off on non-zero ranks and when disabled."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

_enabled = os.environ.get("CIR_PROGRESS", "1") != "0"


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, fields: bool = False
) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)`; shows a transient rich bar when enabled on rank 0.

    With `fields=True` the bar shows a free-form status text (loss, lr, samples/s) that
    `advance(status="...")` updates.
    """
    if not (_enabled and is_main_process()):
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
