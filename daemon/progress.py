"""Progress of a long job (a scan, `verify`, `rebuild`): what they report, and who shows it.

The jobs call a `Progress`; `NoProgress` ignores it, `LiveProgress` keeps plain numbers for the
daemon's `status` and systemd's STATUS= line, `ScanProgress` draws a bar on a TTY. rich is
imported only when the bar is shown: it costs ~20 ms of a one-shot command's start.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class Progress(Protocol):
    def phase(self, root: bytes, phase: str) -> None: ...
    def total(self, files: int, nbytes: int) -> None: ...
    def advance(self, files: int, nbytes: int) -> None: ...


class NoProgress:
    def phase(self, root: bytes, phase: str) -> None:
        pass

    def total(self, files: int, nbytes: int) -> None:
        pass

    def advance(self, files: int, nbytes: int) -> None:
        pass


class LiveProgress:
    """For the daemon: plain numbers written by the scan's thread, read by the loop."""

    def __init__(self) -> None:
        self.step = "idle"
        self.files_total = self.bytes_total = self.files_done = self.bytes_done = 0
        self.started = time.monotonic()

    def phase(self, root: bytes, phase: str) -> None:
        self.step = phase
        if phase == "walking":
            self.files_total = self.bytes_total = self.files_done = self.bytes_done = 0
            self.started = time.monotonic()

    def total(self, files: int, nbytes: int) -> None:
        self.files_total, self.bytes_total = files, nbytes
        self.started = time.monotonic()

    def advance(self, files: int, nbytes: int) -> None:
        self.files_done += files
        self.bytes_done += nbytes

    def describe(self) -> str:
        if self.step != "hashing" or not self.bytes_total:
            return self.step
        elapsed = max(time.monotonic() - self.started, 1e-3)
        rate = self.bytes_done / elapsed
        pct = 100 * self.bytes_done / self.bytes_total
        eta = (self.bytes_total - self.bytes_done) / rate if rate else 0
        return f"hashing {pct:.0f}%, {rate / 1e6:.0f} MB/s, ETA {eta:.0f} s"


class ScanProgress:
    """A spinner while walking, files/bytes/rate/ETA while hashing, on stderr when it is a TTY."""

    def __init__(self, *, enabled: bool) -> None:
        self.bar: RichProgress | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                SpinnerColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
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
