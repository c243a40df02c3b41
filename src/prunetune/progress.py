"""Progress bars for long loops (rich), silent when asked or when not attached to a terminal in CI logs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def enabled() -> bool:
    return os.environ.get("PRUNETUNE_PROGRESS", "1") != "0" and sys.stderr.isatty()


def track(items: Iterable[T], description: str, total: int | None = None, show: bool | None = None) -> Iterator[T]:
    """Like `rich.progress.track`, on stderr, off when `PRUNETUNE_PROGRESS=0` or stderr is not a terminal."""
    if not (enabled() if show is None else show):
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = (TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        yield from bar.track(items, total=total, description=description)
