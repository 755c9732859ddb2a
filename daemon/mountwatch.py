"""Notices mounts and unmounts as they happen: one thread blocked in poll() on /proc/self/mountinfo.

The kernel wakes a poll() of an open /proc/self/mountinfo with POLLPRI (and POLLERR) whenever
the mount table of the process's namespace changes (proc(5), "/proc/pid/mountinfo"), so a
disk plugged in or pulled out below a root is seen at once, without a timer and without
looking at the tree. The thread reads the table again and hands it to the loop, where the
scheduler compares each root's mounts with those it knew (daemon/scheduler.py). inotify also
reports the last unmount of a filesystem (IN_UNMOUNT on every watch on it), but not the
unmount of a bind mount or of a filesystem still mounted elsewhere, nor any mount: the mount
table is what tells.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path

from daemon import fs
from daemon.model import Mount


class MountWatcher:
    """Calls ``sink(table)`` on the loop's thread with the new mount table after every change."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sink: Callable[[list[Mount]], None], path: Path = fs.MOUNTINFO
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._path = path
        self._thread: threading.Thread | None = None
        self._fd = -1
        self._wake_r, self._wake_w = -1, -1
        self._open = False

    def start(self) -> bool:
        """False when the table cannot be watched (no /proc): mounts are then noticed by the scans."""
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._open = True
        self._thread = threading.Thread(target=self._run, name="treewatch-mounts", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._open = False
        if self._thread is not None:
            os.write(self._wake_w, b"!")
            self._thread.join()
            self._thread = None
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLPRI | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        while self._open:
            ready = dict(poller.poll())
            if self._wake_r in ready or not self._open:
                return
            # poll() itself takes note of the change it reported (proc_namespace.c: mounts_poll),
            # so the next poll() blocks until the table changes again.
            if ready.get(self._fd, 0) & (select.POLLPRI | select.POLLERR):
                try:
                    table = fs.mounts(self._path)
                except OSError:
                    continue  # the next change, or the next scan's own look, will tell
                with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
                    self._loop.call_soon_threadsafe(self._deliver, table)

    def _deliver(self, table: list[Mount]) -> None:
        if self._open:
            self._sink(table)
