"""Progress reporting of a run on stderr; it only displays, it never decides anything.

On a terminal: rich bars for the current cell and the whole run (images, images/s, ETA). Otherwise
(log files of batch jobs): one line per finished cell. Disabled: silent.
"""

from __future__ import annotations

import time

from restore.runtime.progress import progress_bar


class ProgressBar:
    """Counts restored images per cell and for the whole run."""

    def __init__(self, enabled: bool, total: int):
        from rich.console import Console

        self.console = Console(stderr=True) if enabled else None
        self.progress = self.cell = None
        self.total, self.finished, self.skipped, self.started = total, 0, 0, time.perf_counter()
        self.line = None  # (description, images, start) of the current cell, for the plain log
        if self.console is not None and self.console.is_terminal:
            self.progress = progress_bar("", fields=("rate",), console=self.console)
            self.progress.start()
            self.all = self.progress.add_task("all cells", total=total, rate="")

    def _log_cell(self) -> None:
        if self.progress is None and self.console is not None and self.line and self.line[1]:
            desc, n, start = self.line
            dt = time.perf_counter() - start
            rate = (self.finished - self.skipped) / (time.perf_counter() - self.started)
            eta = (self.total - self.finished) / rate if rate else float("nan")
            self.console.print(f"{desc}: {n} images in {dt:.1f} s ({n / dt:.2f} img/s); "
                               f"run {self.finished}/{self.total}, ETA {eta:.0f} s", highlight=False, soft_wrap=True)

    def start_cell(self, description: str, n: int) -> None:
        """A new cell with ``n`` images to do begins."""
        self._log_cell()
        self.line = (description, n, time.perf_counter())
        if self.progress is not None:
            if self.cell is not None:
                self.progress.remove_task(self.cell)
            self.cell = self.progress.add_task(description, total=n, rate="")

    def advance(self, n: int) -> None:
        self.finished += n
        if self.progress is None:
            return
        for task in (self.cell, self.all):
            self.progress.advance(task, n)
            speed = self.progress.tasks[self.progress.task_ids.index(task)].speed
            self.progress.update(task, rate=f"{speed:.2f} img/s" if speed else "")

    def skip(self, n: int) -> None:
        """Count ``n`` images finished by earlier runs (not in the rate)."""
        self.finished = self.skipped = n
        if self.progress is not None:
            self.progress.update(self.all, completed=n)

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, soft_wrap=True)

    def stop(self) -> None:
        self._log_cell()
        self.line = None
        if self.progress is not None:
            self.progress.stop()
