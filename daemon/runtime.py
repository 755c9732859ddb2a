"""One root as the daemon runs it: its aggregator, connection, watcher and worker's state, the
mounts below it, and what `status` shows of it. The scheduler (scheduler.py) drives them."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field

from daemon import fs, logs
from daemon.aggregate import Aggregator
from daemon.config import RootConfig
from daemon.filters import Excluder
from daemon.index import Index
from daemon.model import Mount, ScanKind, ScanReport, join
from daemon.progress import LiveProgress
from daemon.rules import mounts_below, polled_volumes
from daemon.watch import RootWatcher

# The oldest pending paths of a root that `status` and the stall guard's log line name.
PENDING_PATHS_SHOWN = 10
# Through a storm the inotify queue can overflow every few seconds, each a full sync: one
# journal line a minute says so (with the sysctl to raise), and how many it stands for.
OVERFLOW_LOGGED_EVERY_S = 60.0


@dataclass(eq=False)
class RootRuntime:
    config: RootConfig
    aggregator: Aggregator
    index: Index
    watcher: RootWatcher | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    worker_ends: int = 0  # worker tasks that ended in a row (see Scheduler._worker_ended)
    in_flight: asyncio.Future[ScanReport] | None = None  # the scan thread, which outlives a cancelled worker
    sleeping: bool = False  # the worker waits for its wake event or sleep_until
    sleep_until: float = 0.0
    next_full: float = float("inf")
    next_poll: float = float("inf")
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the root the watches were placed on
    next_identity_check: float = float("inf")
    failures: int = 0  # scans failed in a row
    retry_after: float = 0.0  # no scan before this (monotonic) after a failure
    offline: str | None = None
    scanning: ScanKind | None = None
    progress: LiveProgress = field(default_factory=LiveProgress)
    files: int = 0
    overflows: int = 0  # not yet written to the database
    # An overflow is logged once per OVERFLOW_LOGGED_EVERY_S (a storm overflows every few seconds).
    overflow_lines: logs.Throttle = field(default_factory=lambda: logs.Throttle(OVERFLOW_LOGGED_EVERY_S))
    poll_pass: bool = False  # the next full sync is a polling pass, not one an admin alerts on
    # The mounts below the root (not excluded), by mount point: what the mount table showed last.
    mounts: dict[bytes, Mount] = field(default_factory=dict)
    volumes_offline: dict[bytes, str] = field(default_factory=dict)  # as the last scan found them, logged
    next_volume_poll: float = 0.0  # volumes on a network filesystem below an inotify root (rules.polled_volumes)

    @property
    def path(self) -> bytes:
        return os.fsencode(self.config.path)

    @property
    def polled(self) -> list[bytes]:
        if self.observer_state != "inotify" or self.config.one_filesystem:
            return []  # a polled root's own syncs cover its volumes; left-out ones are not indexed
        return polled_volumes(self.config.observer, {rel: m.fs_type for rel, m in self.mounts.items()})

    @property
    def left_out(self) -> frozenset[bytes]:
        """one_filesystem: the mount points below the root that are not watched."""
        return frozenset(self.mounts) if self.config.one_filesystem else frozenset()

    @property
    def observer_state(self) -> str:
        if self.offline:
            return "offline"
        return self.watcher.mode if self.watcher is not None else "stopped"

    def mounts_in(self, table: list[Mount]) -> dict[bytes, Mount]:
        """The mounts of ``table`` below this root that its excludes leave in, by mount point."""
        excluder = Excluder(self.config.exclude)
        below = mounts_below(os.fsencode(os.path.realpath(self.path)), table)
        return {rel: m for rel, m in below.items() if not excluder.any_component(rel)}

    def pending_state(self, wall_offset: float) -> tuple[int, str, float | None, str | None]:
        """(pending paths, observer, wall-clock time of the oldest pending event, the oldest
        paths as JSON), as `status` shows them."""
        oldest = self.aggregator.oldest(PENDING_PATHS_SHOWN)
        if not oldest:
            return self.aggregator.pending, self.observer_state, None, None
        paths = json.dumps([os.fsdecode(join(self.path, p)) for p, _ in oldest])
        return self.aggregator.pending, self.observer_state, round(oldest[0][1] + wall_offset, 3), paths

    def count_files(self) -> int:
        row = self.index.root(self.path, create=False)
        return 0 if row is None else self.index.totals(row.id)[0]


def read_mount_table() -> list[Mount]:
    """/proc/self/mountinfo, or nothing when it cannot be read."""
    try:
        return fs.mounts()
    except OSError:
        return []


def mount_identity(m: Mount | None) -> tuple[int, str, bytes, str, str] | None:
    """What tells one mount from the next at a mount point (ids are reused after an unmount)."""
    return None if m is None else (m.mount_id, m.devno, m.fs_root, m.source, m.fs_type)
