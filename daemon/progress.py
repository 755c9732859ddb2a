"""The scan's progress display on a TTY (rich), and nothing at all elsewhere.

rich is imported only when the bar is shown: it costs ~20 ms of a one-shot command's start.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType

    from rich.progress import Progress, TaskID


class ScanProgress:
    """Implements scan.Progress: a spinner while walking, files/bytes/rate/ETA while hashing."""

    def __init__(self, *, enabled: bool) -> None:
        self.bar: Progress | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
        self.task: TaskID | None = None
        self.label = ""
        self.files_total = self.files_done = 0

    def __enter__(self) -> ScanProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def phase(self, root: bytes, phase: str) -> None:
        if self.bar is None:
            return
        label = self.label = f"{phase} {os.fsdecode(root)}"
        if self.task is None:
            self.task = self.bar.add_task(label, total=None)
        else:
            self.bar.update(self.task, description=label)

    def total(self, files: int, nbytes: int) -> None:
        self.files_total, self.files_done = files, 0
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, total=nbytes or None, completed=0, description=self._described())

    def advance(self, files: int, nbytes: int) -> None:
        self.files_done += files
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=nbytes, description=self._described())

    def _described(self) -> str:
        # The bar counts bytes (rate and ETA come from them); the files go in the label.
        return f"{self.label} ({self.files_done}/{self.files_total} files)"
