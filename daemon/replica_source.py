"""What a replicator reads from a box's index: every entry at one position of the feed (the
snapshot), and the feed after a cursor with the state it leaves each path in — all inside one
read transaction, so that what is sent is the index exactly as of one seq.

The rows come out in the catalogue's column order (catalogue.ENTRY_COLUMNS), ready for COPY.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from daemon import feed
from daemon.feed import FeedState
from daemon.index import Index

# An entry's columns in catalogue.ENTRY_COLUMNS' order, with its root's path.
_ENTRY = (
    "r.path, e.path, e.kind, e.size, e.mtime_ns, e.ctime_ns, e.inode, e.dev, e.mode, e.uid, e.gid, e.nlink,"
    " e.blake3, e.target, e.xattrs, e.corrupt_blake3 IS NOT NULL, e.id, e.seq"
)
# A row a scan in progress has moved aside under a name no kernel allows (journal.py, parking):
# not an entry anyone can see on disk; its own rename, when it comes, is in the feed.
_NOT_PARKED = "NOT (e.path >= x'00' AND e.path < x'01')"
FETCH = 10_000

Row = tuple[Any, ...]


class ReplicaSource:
    """Reads for a replicator, on an index connection of its own."""

    def __init__(self, index: Index) -> None:
        self.index = index

    @contextlib.contextmanager
    def reading(self) -> Iterator[FeedState]:
        """One read transaction; yields the feed's position that everything read in it is as of."""
        db = self.index.db
        db.execute("BEGIN")  # deferred: the first read fixes what this transaction sees, writers go on
        try:
            yield feed.state(self.index)
        finally:
            db.execute("COMMIT")

    def entries(self, *prefix: Any) -> Iterator[Row]:
        """Every entry, each row led by ``prefix`` (the box and load the COPY writes it under)."""
        marks = ", ".join("?" for _ in prefix)
        cur = self.index.db.execute(
            f"SELECT {marks}{', ' if prefix else ''}{_ENTRY} FROM entries e JOIN roots r ON r.id = e.root_id"
            f" WHERE {_NOT_PARKED}",
            prefix,
        )
        while rows := cur.fetchmany(FETCH):
            yield from rows

    def changes(self, after: int, through: int, page: int) -> Iterator[list[Row]]:
        """The feed in (after, through], page by page: (seq, op, kind, root id, root path, path,
        old path, at)."""
        while after < through:
            rows = self.index.db.execute(
                "SELECT c.seq, c.op, c.kind, c.root_id, r.path, c.path, c.old_path, c.at FROM changes c"
                " JOIN roots r ON r.id = c.root_id WHERE c.seq > ? AND c.seq <= ? ORDER BY c.seq LIMIT ?",
                (after, through, page),
            ).fetchall()
            if not rows:
                return
            yield rows
            after = rows[-1][0]

    def current(self, keys: Iterable[tuple[int, bytes]], *prefix: Any) -> Iterator[tuple[int, bytes, Row | None]]:
        """For each (root id, path): the entry there now (led by ``prefix``, as `entries` does),
        or None when there is none."""
        db = self.index.db
        marks = "".join("?, " for _ in prefix)
        sql = (
            f"SELECT {marks}{_ENTRY} FROM entries e JOIN roots r ON r.id = e.root_id WHERE e.root_id = ? AND e.path = ?"
        )
        for root_id, path in keys:
            yield root_id, path, db.execute(sql, (*prefix, root_id, path)).fetchone()
