"""The change feed's figures (docs/feed.md): F1, a committed change reaching a `changes --follow`
reader, idle and during a storm of commits; F2, `changes --since 0 --json` on a 1,000,000-row
feed; F3, pruning 1,000,000 rows, as the longest another writer waits.

The commits are the scan's own (`ScanJournal.commit`) on a database of their own; the readers
and the pruning are the real commands and functions.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from bench.harness import Bench, Result, drop_db, run
from daemon import feed
from daemon.config import FeedConfig
from daemon.index import Index
from daemon.journal import Batch, ScanJournal, Write
from daemon.model import Kind, Op, Stat

FEED_ROWS = 1_000_000
PROBES = 200


def _stat(i: int) -> Stat:
    return Stat(Kind.FILE, i, 1_000_000_000 + i, 1_000_000_000 + i, 10_000_000 + i, 1, 0o100644, 0, 0, 1)


def _writes(start: int, n: int) -> list[Write]:
    return [Write(Op.ADDED, b"f%09d" % i, _stat(i), parent_id=0, blake3=b"\0" * 32) for i in range(start, start + n)]


def _journal(db: Path) -> tuple[Index, ScanJournal]:
    drop_db(db)
    index = Index(db)
    root = index.root(b"/bench/feed")
    assert root is not None
    return index, ScanJournal.begin(index, root.id, "full", "[]")


class _Follower:
    """`treewatch changes --follow --json`; the monotonic time each seq arrived."""

    def __init__(self, b: Bench, db: Path) -> None:
        argv = [b.python, "-m", "daemon", "--config", str(b.config), "--db", str(db), "changes", "--since", "0",
                "--json", "--follow"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=b.env)
        self.arrived: dict[int, float] = {}
        assert self.proc.stdout is not None
        self.reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.arrived[json.loads(line)["seq"]] = time.monotonic()

    def wait_for(self, seq: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while seq not in self.arrived:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the follower never printed seq {seq}")
            time.sleep(0.001)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def bench_f1(b: Bench) -> Iterator[Result]:
    """F1: from a commit returning to its row printed by a follower, idle and during a storm."""
    db = b.out / "feed-f1.db"
    index, journal = _journal(db)
    follower = _Follower(b, db)
    storm_stop = threading.Event()
    try:
        journal.commit(Batch(writes=_writes(0, 1)))
        follower.wait_for(1)  # started and caught up
        for label in ("idle", "storm"):
            if label == "storm":
                # Another connection commits 1,000-row batches back to back (a first index's load).
                def storm() -> None:
                    other = Index(db)
                    other_journal = ScanJournal(other, journal.root_id, journal.scan_id)
                    i = 10_000_000
                    while not storm_stop.is_set():
                        other_journal.commit(Batch(writes=_writes(i, 1000)))
                        i += 1000
                    other.close()

                threading.Thread(target=storm, daemon=True).start()
            latencies: list[float] = []
            for p in range(PROBES):
                time.sleep(0.02)  # probes 20 ms apart: each one is its own commit
                journal.commit(Batch(writes=_writes(1_000 + p + (PROBES if label == "storm" else 0), 1)))
                committed = time.monotonic()
                seq = index.last_seq()
                follower.wait_for(seq)
                latencies.append((follower.arrived[seq] - committed) * 1000)
            storm_stop.set()
            median = statistics.median(latencies)
            p99 = statistics.quantiles(latencies, n=100)[98]
            target_ok = median <= 20 and max(latencies) <= 100 if label == "idle" else median <= 100
            yield Result(
                "F1",
                f"commit to a --follow reader, {label}",
                median,
                "ms",
                "median <= 20 ms, max <= 100 ms" if label == "idle" else "median <= 100 ms",
                target_ok,
                f"p99 {p99:.1f} ms, max {max(latencies):.1f} ms, {PROBES} commits",
                {"median_ms": median, "p99_ms": p99, "max_ms": max(latencies)},
            )
    finally:
        storm_stop.set()
        follower.stop()
        index.close()
        drop_db(db)


def _big_feed(b: Bench) -> Path:
    db = b.out / "feed-1m.db"
    index, journal = _journal(db)
    try:
        for start in range(0, FEED_ROWS, 10_000):
            journal.commit(Batch(writes=_writes(start, 10_000)))
    finally:
        index.close()
    return db


def bench_f2(b: Bench) -> Iterator[Result]:
    """F2: `changes --since 0 --json` of a 1,000,000-row feed, to /dev/null."""
    db = _big_feed(b)
    argv = [b.python, "-m", "daemon", "--config", str(b.config), "--db", str(db), "changes", "--since", "0", "--json"]
    runs = [run(argv, env=b.env, keep_stdout=False) for _ in range(b.rounds)]
    seconds = min(r.seconds for r in runs)
    rate = FEED_ROWS / seconds
    yield Result("F2", f"changes --since 0 --json, {FEED_ROWS:,} rows", rate, "rows/s", "", None,
                 f"{seconds:.2f} s, peak RSS {min(r.max_rss for r in runs) / 2**20:.0f} MiB")  # fmt: skip


def bench_f3(b: Bench) -> Iterator[Result]:
    """F3: pruning a 1,000,000-row feed down to its last 1,000 rows (`max_rows`), while another
    connection takes the write lock again and again: the longest it waited is what a scan's
    commit would wait behind the pruning."""
    db = _big_feed(b)
    index = Index(db)
    other = Index(db)
    waits: list[float] = []
    done = threading.Event()

    def writer() -> None:
        while not done.is_set():
            asked = time.monotonic()
            with other.transaction():
                waits.append(time.monotonic() - asked)
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    started = time.monotonic()
    removed = feed.prune(index, FeedConfig(retention_s=0, max_rows=1000))
    seconds = time.monotonic() - started
    done.set()
    thread.join()
    index.close()
    other.close()
    longest = max(waits) * 1000
    yield Result("F3", f"prune {removed:,} feed rows: longest wait of another writer", longest, "ms", "<= 100 ms",
                 longest <= 100,
                 f"all pruned in {seconds:.1f} s, {feed.PRUNE_CHUNK:,} rows per transaction, "
                 f"{len(waits):,} writes beside it")  # fmt: skip
    drop_db(db)
