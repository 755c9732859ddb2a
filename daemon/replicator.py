"""Replication of one box's index into the fleet catalogue, with an exactly-once effect.

The feed is the boundary, as in change-data-capture into a sink: a snapshot, then the stream,
each applied idempotently (docs/fleet.md, "How it stays exact").

- One catch-up is one PostgreSQL transaction: it locks the box's row, reads where the catalogue
  stands (epoch, load, seq), and inside one SQLite read transaction of the box either loads a
  snapshot or applies every feed row since that seq up to the head — the state each changed path
  is left in, as of the head — then sets the box's seq to the head with a compare-and-set. Killed
  at any point, the transaction rolls back: the catalogue is the box's index as of the old seq or
  the new one. A batch delivered twice (two replicators of one box) finds the seq moved and
  applies nothing.
- A snapshot goes in under a new load id beside the rows it replaces, which are removed in the
  same transaction after the box's row points at the new load: readers see the old rows or the
  new ones, never none and never both. It is taken for a new box, a new epoch (the box's database
  was rebuilt), a cursor older than the box's feed still holds, or one ahead of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import feed, fs
from daemon.catalogue import ENTRY_COLUMNS, ENTRY_TYPES, CatalogueError, reason, redact
from daemon.index import Index
from daemon.replica_source import ReplicaSource, Row

if TYPE_CHECKING:
    import psycopg

# Feed rows read, looked up and sent per round trip of a stream (all in one transaction).
CHUNK = 5000
# A snapshot checks for a stop request this often (rows), and then rolls back.
STOP_EVERY = 20_000
# A follower that saw no change asks the catalogue where it stands this often anyway: that is
# how a catalogue that went away while the box was idle is noticed.
PROBE_S = 30.0
# The catalogue's copy of a box's feed history is pruned at most this often.
PRUNE_CHANGES_EVERY_S = 600.0

_COLUMNS = ", ".join(ENTRY_COLUMNS)
_HISTORY_COLUMNS = "box, epoch, seq, op, kind, root, path, old_path, at"
_HISTORY_TYPES = ("text", "text", "int8", "text", "text", "bytea", "bytea", "bytea", "timestamptz")
# A stream writes each chunk as: delete the keys it names that may hold a row (see _read_chunk),
# then COPY the entries there now.
# COPY is the fastest way in (rows encoded in C, no speculative insertion): an upsert by
# INSERT ... ON CONFLICT cost the server twice a plain insert, and psycopg encodes the arrays of
# an `unnest(%s)` element by element in Python.
# The delete finds each key by a probe of the primary key, in a subquery per key, and deletes by
# row address: written as a join of the keys with the table, the planner chose by statistics
# that did not know the rows this very transaction had inserted, and scanned all of a box's rows
# for each key (a 200,000-row stream ran for minutes).
_DELETE = (
    "DELETE FROM treewatch.entries WHERE ctid = ANY (ARRAY("
    "SELECT (SELECT e.ctid FROM treewatch.entries e"
    " WHERE e.box = %(box)s AND e.load_id = %(load)s AND e.root = d.root AND e.path = d.path)"
    " FROM unnest(%(roots)b::bytea[], %(paths)b::bytea[]) AS d(root, path)))"
)


class Stopped(Exception):
    """A stop was asked for in the middle of a batch: it was rolled back, nothing is half-done."""


@dataclass(frozen=True, slots=True)
class Position:
    """Where the catalogue stands for a box."""

    epoch: str
    load_id: int
    seq: int


@dataclass(frozen=True, slots=True)
class Applied:
    """What one catch-up did."""

    box: str
    epoch: str
    seq: int  # the box's feed seq the catalogue now holds
    action: str  # "snapshot" | "stream" | "none"
    reason: str | None  # why a snapshot: "new", "epoch", "expired", "ahead"
    rows: int  # entries loaded, or feed rows applied
    seconds: float


def snapshot_reason(position: Position | None, state: feed.FeedState) -> str | None:
    """Why the catalogue must load a snapshot of the box rather than its feed, or None."""
    if position is None:
        return "new"
    return feed.cursor_reset(state, position.seq, position.epoch)


class Replicator:
    """Sends one box's index (a database file) to the catalogue at ``url``, on ``conn``."""

    def __init__(self, conn: psycopg.Connection[Any], url: str, box: str, database: Path) -> None:
        self.conn = conn
        self.url = url
        self.box = box
        self.database = database
        self.index = Index(database, readonly=True)
        self.identity = fs.identity(database)
        self.last_prune = 0.0

    def close(self) -> None:
        self.index.close()

    def _reopen_if_replaced(self) -> None:
        """A database deleted and made again (a new epoch) is read from its new file."""
        now = fs.identity(self.database)
        if now is not None and now != self.identity:
            self.index.close()
            self.index = Index(self.database, readonly=True)
            self.identity = now

    def head(self) -> feed.FeedState:
        self._reopen_if_replaced()
        return feed.state(self.index)

    def catch_up(self, stop: threading.Event | None = None) -> Applied:
        """Bring the catalogue to the box's feed head, in one transaction (see the module's doc)."""
        import psycopg

        self._reopen_if_replaced()
        started = time.monotonic()
        try:
            try:
                applied = self._catch_up(stop, skip_fresh=True)
            except psycopg.errors.UniqueViolation:
                # A key skipped as fresh was not (a row a scan had parked moved away without a
                # feed row of its own): all of it rolled back; again, deleting every key first.
                applied = self._catch_up(stop, skip_fresh=False)
        except psycopg.Error as e:
            raise CatalogueError(f"catalogue {redact(self.url)}: {reason(e, self.url)}") from None
        return replace(applied, seconds=time.monotonic() - started)

    def _catch_up(self, stop: threading.Event | None, *, skip_fresh: bool) -> Applied:
        source = ReplicaSource(self.index)
        with source.reading() as state, self.conn.transaction(), self.conn.cursor() as cur:
            position = _lock_box(cur, self.box)
            why = snapshot_reason(position, state)
            if why is not None:
                rows = _load_snapshot(cur, self.box, state, source, stop)
                action = "snapshot"
            elif position is not None and position.seq < state.seq:
                rows = _apply_stream(cur, self.box, position, state, source, stop, skip_fresh=skip_fresh)
                action = "stream"
            else:
                rows, action = 0, "none"
        return Applied(self.box, state.epoch, state.seq, action, why, rows, 0.0)

    def prune_history(self, keep_s: float) -> None:
        """Drop the catalogue's copy of this box's feed rows older than the box keeps its own."""
        if keep_s <= 0 or time.monotonic() - self.last_prune < PRUNE_CHANGES_EVERY_S:
            return
        import psycopg

        try:
            with self.conn.transaction(), self.conn.cursor() as cur:
                cur.execute(
                    "DELETE FROM treewatch.changes WHERE box = %s AND at < now() - make_interval(secs => %s)",
                    (self.box, keep_s),
                )
        except psycopg.Error as e:
            raise CatalogueError(f"catalogue {redact(self.url)}: {reason(e, self.url)}") from None
        self.last_prune = time.monotonic()

    def follow(self, stop: threading.Event, applied: Callable[[Applied], None], keep_s: float = 0.0) -> None:
        """Keep the catalogue caught up until ``stop``: a catch-up whenever the box's database
        changes (feed.Waker), and a probe of the catalogue every PROBE_S while it does not.
        Raises CatalogueError when the catalogue fails; the caller decides whether to retry."""
        last: Applied | None = None
        probed = time.monotonic()
        with feed.Waker(self.database) as waker:
            while not stop.is_set():
                waker.clear()
                state = self.head()
                due = time.monotonic() - probed >= PROBE_S
                if last is None or due or (state.epoch, state.seq) != (last.epoch, last.seq):
                    try:
                        last = self.catch_up(stop)
                    except Stopped:
                        return
                    probed = time.monotonic()
                    applied(last)
                    self.prune_history(keep_s)
                    if last.action != "none":
                        continue  # what was committed meanwhile is sent before waiting
                waker.wait()


def _lock_box(cur: psycopg.Cursor[Any], box: str) -> Position | None:
    """Lock the box's row for this transaction (a placeholder for a new box, never committed as
    such): a second replicator of the same box waits here, then sees where the first left it."""
    cur.execute("INSERT INTO treewatch.boxes VALUES (%s, '', 0, 0, now(), now()) ON CONFLICT (box) DO NOTHING", (box,))
    cur.execute("SELECT epoch, load_id, seq FROM treewatch.boxes WHERE box = %s FOR UPDATE", (box,))
    row = cur.fetchone()
    assert row is not None
    return None if row[0] == "" else Position(row[0], int(row[1]), int(row[2]))


def _load_snapshot(
    cur: psycopg.Cursor[Any], box: str, state: feed.FeedState, source: ReplicaSource, stop: threading.Event | None
) -> int:
    cur.execute("SELECT nextval('treewatch.loads')")
    row = cur.fetchone()
    assert row is not None
    load_id = int(row[0])
    rows = 0
    with cur.copy(f"COPY treewatch.entries (box, load_id, {_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["text", "int8", *ENTRY_TYPES])
        for entry in source.entries(box, load_id):
            copy.write_row(entry)
            rows += 1
            if rows % STOP_EVERY == 0 and stop is not None and stop.is_set():
                raise Stopped
    cur.execute(
        "UPDATE treewatch.boxes SET epoch = %s, load_id = %s, seq = %s, loaded_at = now(), applied_at = now()"
        " WHERE box = %s",
        (state.epoch, load_id, state.seq, box),
    )
    # The rows of the load this one replaces: gone in the same transaction that makes it current.
    cur.execute("DELETE FROM treewatch.entries WHERE box = %s AND load_id <> %s", (box, load_id))
    return rows


@dataclass(slots=True)
class _Chunk:
    """One chunk of a stream, read from the index and ready to send."""

    roots: list[bytes]  # the keys to delete first: (roots[i], paths[i])
    paths: list[bytes]
    entries: list[Row]  # the entries at those keys now, in the catalogue's COPY columns
    history: list[tuple[Any, ...]]  # its feed rows, as treewatch.changes holds them
    rows: int


def _read_chunk(
    source: ReplicaSource, page: list[Row], box: str, load_id: int, epoch: str, seen: set[tuple[int, bytes]] | None
) -> _Chunk:
    """The keys a page names, the entries there now, and its feed rows.

    With ``seen`` (the keys of the run's earlier chunks), a key is *fresh* when its first mention
    in the run is as where an entry arrived (`added`, or the target of `renamed`): the index held
    nothing there at that seq — it cannot, two entries never share a path — so neither does the
    catalogue, and a fresh key with an entry is written without a delete first. Most of a large
    stream is that (a first index, a folder moved). The one way the index empties a path without
    a feed row is a scan parking a row there; the COPY then meets the catalogue's row and fails
    on the primary key, and the caller does it again without skipping (`catch_up`)."""
    roots: dict[int, bytes] = {}
    keys: dict[tuple[int, bytes], bool] = {}  # -> fresh
    history = []
    for seq, op, kind, root_id, root, path, old_path, at in page:
        roots[root_id] = root
        if old_path is not None:
            keys.setdefault((root_id, old_path), False)
        key = (root_id, path)
        if key not in keys:
            keys[key] = seen is not None and op in ("added", "renamed") and key not in seen
        history.append((box, epoch, seq, op, kind, root, path, old_path, datetime.fromtimestamp(at, UTC)))
    if seen is not None:
        seen.update(keys)
    entries: list[Row] = []
    delete_roots: list[bytes] = []
    delete_paths: list[bytes] = []
    for root_id, path, entry in source.current(keys, box, load_id):
        if entry is not None:
            entries.append(entry)
        if entry is None or not keys[(root_id, path)]:
            delete_roots.append(roots[root_id])
            delete_paths.append(path)
    return _Chunk(delete_roots, delete_paths, entries, history, len(page))


def _apply_stream(
    cur: psycopg.Cursor[Any],
    box: str,
    position: Position,
    state: feed.FeedState,
    source: ReplicaSource,
    stop: threading.Event | None,
    *,
    skip_fresh: bool,
) -> int:
    """Every feed row in (position.seq, state.seq], as the state of each path it names at
    state.seq: the row there now, or none. Order within the run does not matter — each path's
    final state is read, not replayed — so a path named by several rows (renamed away and back,
    modified twice) is sent once per chunk with what it is now."""
    from concurrent.futures import ThreadPoolExecutor

    pages = source.changes(position.seq, state.seq, CHUNK)
    seen: set[tuple[int, bytes]] | None = set() if skip_fresh else None

    def next_chunk() -> _Chunk | None:
        page = next(pages, None)
        return None if page is None else _read_chunk(source, page, box, position.load_id, state.epoch, seen)

    applied = 0
    # The next chunk is read from the index while this one is sent: the server's work and ours
    # overlap (SQLite and psycopg let go of the GIL while they wait).
    with ThreadPoolExecutor(1, thread_name_prefix="replicate-read") as reader:
        pending = reader.submit(next_chunk)
        while (chunk := pending.result()) is not None:
            pending = reader.submit(next_chunk)
            if chunk.paths:
                cur.execute(_DELETE, {"box": box, "load": position.load_id, "roots": chunk.roots, "paths": chunk.paths})
            with cur.copy(f"COPY treewatch.entries (box, load_id, {_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["text", "int8", *ENTRY_TYPES])
                for entry in chunk.entries:
                    copy.write_row(entry)
            with cur.copy(f"COPY treewatch.changes ({_HISTORY_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(list(_HISTORY_TYPES))
                for row in chunk.history:
                    copy.write_row(row)
            applied += chunk.rows
            if stop is not None and stop.is_set():
                raise Stopped
    # The compare-and-set that makes the batch count once: the row is locked by this transaction,
    # so it holds unless the box's row was changed under the lock (it cannot be) — an assertion of
    # the invariant, not a race handled.
    cur.execute(
        "UPDATE treewatch.boxes SET seq = %s, applied_at = now() WHERE box = %s AND load_id = %s AND seq = %s",
        (state.seq, box, position.load_id, position.seq),
    )
    if cur.rowcount != 1:
        raise CatalogueError(f"box {box}: its position in the catalogue moved during a batch; nothing was applied")
    return applied
