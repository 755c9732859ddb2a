"""The change feed as a contract that programs follow for years (docs/feed.md): whether a
consumer's cursor still means something here, following changes as they are committed, the
files changed since a cursor, a consistent snapshot to start from, and retention.

A cursor is (epoch, seq). The epoch is random, made with the database: a consumer holding a
cursor of another database (rebuilt, repaired, restored) is told so instead of silently
receiving nothing, or the wrong rows. The anchors: Syncthing's index ID beside its sequence
numbers, Watchman's fresh-instance answer, Kafka's offset-out-of-range, Debezium's snapshot
taken at a known log position.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import fs, logs
from daemon.config import FeedConfig
from daemon.index import Index
from daemon.model import join

# Rows removed by retention per transaction: each holds the write lock for a few milliseconds
# (docs/benchmarks.md, F3), so the scan's commits never wait long behind it.
PRUNE_CHUNK = 5000
# Between two of those transactions the lock is left free this long. Without the pause another
# writer found no gap: SQLite's busy handler sleeps up to 100 ms between its tries, and back to
# back chunks made a commit wait for the whole pruning (630 ms for 1M rows, F3).
PRUNE_PAUSE_S = 0.1
# A follower wakes on the database's files changing (inotify); this is its check when nothing
# said so, in case a change came through a path it does not watch.
FOLLOW_SAFETY_S = 1.0


@dataclass(frozen=True, slots=True)
class FeedState:
    epoch: str  # 16 hex digits, made with the database
    oldest_seq: int  # the first seq still held (1 when nothing was pruned)
    seq: int  # the last seq given out

    def as_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "oldest_seq": self.oldest_seq, "seq": self.seq}


def state(index: Index) -> FeedState:
    return FeedState(*index.feed_state())


def cursor_reset(feed: FeedState, since: int, epoch: str | None) -> str | None:
    """Why a cursor means nothing here — "epoch" (another database), "ahead" (beyond the last
    seq: a database restored from an older backup), "expired" (retention pruned past it) —
    or None when `changes --since since` gives the consumer exactly what it has not seen."""
    if epoch is not None and epoch != feed.epoch:
        return "epoch"
    if since > feed.seq:
        return "ahead"
    if since < feed.oldest_seq - 1:
        return "expired"
    return None


def changed_files(index: Index, since: int) -> Iterator[bytes]:
    """The absolute paths of the files added, modified or renamed to after ``since`` that the
    index still holds, each once, at the path it holds them at now: what a backup job copies."""
    rows = index.db.execute(
        "SELECT DISTINCT r.path, e.path FROM changes c JOIN entries e ON e.id = c.entry_id"
        " JOIN roots r ON r.id = e.root_id"
        " WHERE c.seq > ? AND c.op IN ('added', 'modified', 'renamed') AND e.kind = 'file'"
        " AND NOT (e.path >= x'00' AND e.path < x'01')"  # a row parked by a scan in progress
        " ORDER BY r.path, e.path",
        (since,),
    )
    for root, rel in rows:
        yield join(root, rel)


def snapshot(index: Index, rows: Callable[[Index], Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The header ``{"epoch", "seq"}``, then every row that ``rows`` reads, all in one read
    transaction: what a consumer loads before following `changes --since seq --epoch epoch`."""
    index.db.execute("BEGIN")  # deferred: the first read fixes the snapshot, writers go on
    try:
        feed = state(index)
        yield {"epoch": feed.epoch, "seq": feed.seq}
        yield from rows(index)
    finally:
        index.db.execute("COMMIT")


def prune(index: Index, retention: FeedConfig, now: float | None = None, *, hold: tuple[str, int] | None = None) -> int:
    """Remove what retention no longer keeps, oldest first, PRUNE_CHUNK rows per transaction;
    the number of rows removed. Rows go by age (`retention_s`) and by count (`max_rows`).

    ``hold`` is a consumer's cursor (epoch, seq) whose rows are kept past their age until it has
    taken them: the fleet catalogue's (docs/fleet.md). `max_rows` still applies: a consumer away
    for that long loads a snapshot instead."""
    if retention.retention_s <= 0 and retention.max_rows <= 0:
        return 0
    cutoff = (now if now is not None else time.time()) - retention.retention_s
    removed = 0
    while True:
        if removed:
            time.sleep(PRUNE_PAUSE_S)
        with index.transaction():
            epoch, oldest, head = index.feed_state()
            keep_from = head - retention.max_rows + 1 if retention.max_rows > 0 else oldest
            aged_through = hold[1] if hold is not None and hold[0] == epoch else head
            last = None
            # In seq order: `at` follows seq (each commit stamps its rows), so the rows past the
            # cutoff are a prefix; a clock set back only delays their pruning.
            for seq, at in index.db.execute(
                "SELECT seq, at FROM changes WHERE seq >= ? ORDER BY seq LIMIT ?", (oldest, PRUNE_CHUNK)
            ).fetchall():
                if seq < keep_from or (retention.retention_s > 0 and at < cutoff and seq <= aged_through):
                    last = seq
                else:
                    break
            if last is None:
                return removed
            cur = index.db.execute("DELETE FROM changes WHERE seq >= ? AND seq <= ?", (oldest, last))
            index.db.execute("UPDATE feed SET pruned_through = ?", (last,))
            removed += cur.rowcount


def catalogue_hold(index: Index) -> tuple[str, int] | None:
    """The fleet catalogue's cursor as the daemon last published it (docs/fleet.md): what
    retention keeps rows for."""
    row = index.replication()
    return None if row is None or row.epoch is None or row.applied_seq is None else (row.epoch, row.applied_seq)


def prune_interval(retention: FeedConfig) -> float:
    """How often the daemon prunes: often enough that nothing outlives its window by much."""
    if retention.retention_s > 0:
        return min(60.0, max(1.0, retention.retention_s / 2))
    return 60.0


class Waker:
    """Wakes a follower when the database's files change (inotify, through watchdog), so that it
    costs nothing while nothing happens. Clear, read what is new, then wait: a change committed
    after the clear wakes the next wait at once."""

    def __init__(self, path: Path) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        changed = self.changed = threading.Event()
        names = {path.name, path.name + "-wal"}

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if p and os.path.basename(os.fsdecode(p)) in names:
                        changed.set()

        logs.quiet_watchdog()
        self.observer = Observer()
        self.observer.schedule(_Wake(), str(path.parent), recursive=False)

    def __enter__(self) -> Waker:
        self.observer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.observer.stop()
        self.observer.join()

    def clear(self) -> None:
        self.changed.clear()

    def wait(self, timeout: float = FOLLOW_SAFETY_S) -> bool:
        return self.changed.wait(timeout)


def follow(
    path: Path,
    since: int,
    epoch: str,
    emit: Callable[[list[tuple[Any, ...]]], None],
    stop: threading.Event,
    *,
    page: int = 10_000,
) -> str | None:
    """Hand every change after ``since`` to ``emit`` as it is committed, until ``stop``; the
    reset reason when the database is replaced by one of another epoch. Wakes on the database's
    files changing (`Waker`), not by polling the database."""
    with Waker(path) as waker:
        index = Index(path, readonly=True)
        identity = fs.identity(path)
        try:
            while not stop.is_set():
                waker.clear()
                batch: list[tuple[Any, ...]] = []
                for row in index.changes_since(since, page):
                    batch.append(row)
                    if len(batch) >= page:  # a long backlog goes out page by page, never whole in memory
                        emit(batch)
                        since, batch = batch[-1][0], []
                if batch:
                    emit(batch)
                    since = batch[-1][0]
                    continue  # a change came while these were read: look again before waiting
                waker.wait(FOLLOW_SAFETY_S)
                if fs.identity(path) != identity:
                    # Replaced (deleted and made again, restored, repaired): this connection still
                    # reads the old file. The new one is the same feed only with the same epoch.
                    now = fs.identity(path)
                    if now is None:
                        continue  # between the old file's removal and the new one's creation
                    index.close()
                    index = Index(path, readonly=True)
                    identity = now
                    if state(index).epoch != epoch:
                        return "epoch"
            return None
        finally:
            index.close()
