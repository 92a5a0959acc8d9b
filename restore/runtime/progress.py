"""One progress bar for every long loop (restoring a folder, training, a benchmark run): rich's bar on stderr,
so stdout stays free for machine-readable output."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(label: str, *, enabled: bool = True, fields: tuple[str, ...] = (), console: Console | None = None,
                 ) -> Progress:
    """A bar ``label [=====] n/N {field ...} elapsed remaining``; ``fields`` are task fields shown after the
    count (set them with ``bar.update(task, field=...)``). Use as a context manager."""
    columns = [TextColumn(f"[bold]{label}" if label else "{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(f"{{task.fields[{f}]}}") for f in fields), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console or Console(stderr=True), disable=not enabled)
