"""The scan's journal: one object for everything a scan records while it runs.

A scan of one root (daemon/scan.py) walks, queues what differs, matches renames, writes the
queue back as rows in batches and deletes what is gone. All of that bookkeeping lives here, in
the scan's own tables (`scans`, `scan_queue`, `scan_gone`), behind `ScanJournal`: the walk and
the scan talk to it and to nothing else of the database for their work. Every batch commits its
rows, its feed entries and the queue rows it consumed in one transaction, which is what makes a
scan resumable (docs/scanning.md, "Resume").
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.index import Index, IndexError_, subtree_bounds, subtree_sql, under_sql
from daemon.model import (
    ENTRY_COLUMNS,
    LISTING_DIGEST_BYTES,
    Entry,
    EntryRow,
    FolderState,
    Kind,
    Op,
    QueueRow,
    Stat,
    entry_of,
    parent_of,
)


@dataclass(slots=True)
class Write:
    """One row to store: an insert (entry_id None), an update, or a rename (old_path set)."""

    op: Op
    path: bytes
    stat: Stat
    entry_id: int | None = None
    parent_id: int | None = None
    blake3: bytes | None = None
    keep_hash: bool = False  # a metadata refresh keeps the stored hash
    racy: bool = False
    scheme: int = 0
    target: bytes | None = None
    xattrs: str | None = None
    old_path: bytes | None = None
    evict_id: int | None = None  # a row to delete first because this one takes its path
    park_id: int | None = None  # a row to move aside first: it is renamed elsewhere later
    # Only the racy flag is stored: a racily clean row checked again and found as indexed. No
    # feed entry, and the row keeps its seq (the seq of its last change).
    quiet: bool = False


@dataclass(slots=True)
class Batch:
    """Everything one transaction of a scan commits."""

    writes: list[Write] = field(default_factory=list)
    deletes: list[tuple[int, bytes, Kind]] = field(default_factory=list)
    queue_done: list[bytes] = field(default_factory=list)
    errors: dict[bytes, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    # (folder path, listing digest): new folders whose every child this batch or an earlier
    # one wrote as walked (Stepper._count_child); stored after the children's writes.
    digests: list[tuple[bytes, bytes]] = field(default_factory=list)
    done_files: int = 0
    done_bytes: int = 0
    found: tuple[int, int] | None = None  # a first index: files and bytes its walk found so far

    def __len__(self) -> int:
        return len(self.writes) + len(self.deletes) + len(self.queue_done)


_QUEUE_COLUMNS = (
    "path, reason, entry_id, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode, uid, gid, nlink,"
    " renamed_from, listing"
)


def _queue_row(r: Sequence[Any]) -> QueueRow:
    return QueueRow(r[0], r[1], r[2], r[3], Stat(Kind(r[4]), *r[5:14]), r[14], r[15])


class ScanJournal:
    """One scan of one root, as the database records it: begun by `begin`, ended by `finish`."""

    def __init__(self, index: Index, root_id: int, scan_id: int) -> None:
        self.index = index
        self.db = index.db
        self.root_id = root_id
        self.scan_id = scan_id
        self._gone_by_content: dict[tuple[bytes, int], list[int]] = {}  # see gone_with_hash

    @classmethod
    def begin(cls, index: Index, root_id: int, kind: str, scopes: str) -> ScanJournal:
        """A new scan of a root. It replaces whatever an interrupted one left queued: the walk
        finds again all that was not committed, and nothing that was."""
        with index.transaction():
            _drop_scans(index, root_id)
            _unpark(index, root_id)
            cur = index.db.execute(
                "INSERT INTO scans(root_id, kind, scopes, state, started_at, pid) VALUES (?, ?, ?, 'walking', ?, ?)",
                (root_id, kind, scopes, time.time(), os.getpid()),
            )
            return cls(index, root_id, int(cur.lastrowid or 0))

    # --- what the walk reads ---------------------------------------------------------------

    def entry(self, path: bytes) -> Entry | None:
        return self.index.entry(self.root_id, path)

    def id_of(self, path: bytes) -> int | None:
        return self.index.id_of(self.root_id, path)

    def children_rows(self, parent_id: int) -> dict[bytes, EntryRow]:
        """A folder's rows by path, raw: most are compared without building an Entry (rules.row_unchanged)."""
        rows = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = ? AND parent_id = ?", (self.root_id, parent_id)
        ).fetchall()
        return {row[2]: row for row in rows}

    def folder_state(self, path: bytes) -> FolderState | None:
        """A folder's id with its stored listing digest, read before its children (see `store_digests`)."""
        row = self.db.execute(
            "SELECT id, children_digest, children_gen FROM entries WHERE root_id = ? AND path = ? AND kind = 'dir'",
            (self.root_id, path),
        ).fetchone()
        return None if row is None else FolderState(row[0], row[1], row[2])

    # --- what the walk records ---------------------------------------------------------------

    def queue(self, rows: Iterable[QueueRow]) -> None:
        with self.index.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO scan_queue VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                [
                    (self.scan_id, r.path, r.reason, r.entry_id, r.parent_id, r.stat.kind.value, r.stat.size,
                     r.stat.mtime_ns, r.stat.ctime_ns, r.stat.inode, r.stat.dev, r.stat.mode, r.stat.uid,
                     r.stat.gid, r.stat.nlink, r.listing)
                    for r in rows
                ],
            )  # fmt: skip

    def mark_gone(self, paths: Iterable[bytes]) -> None:
        """Mark index entries (and everything below them) as not found on disk by this scan."""
        with self.index.transaction():
            for path in paths:
                self.db.execute(
                    "INSERT OR IGNORE INTO scan_gone SELECT :s, id FROM entries"
                    f" WHERE root_id = :r AND {under_sql('path')}",
                    {"s": self.scan_id, "r": self.root_id, **subtree_bounds(path)},
                )

    def store_digests(self, digests: Iterable[tuple[bytes, int, int]]) -> None:
        """Store (digest, folder id, children_gen read before its children were compared).

        A child written since then moved children_gen, so its folder keeps no digest: a
        digest in the index always describes children rows that are still there as compared.
        """
        with self.index.transaction():
            self.db.executemany("UPDATE entries SET children_digest = ? WHERE id = ? AND children_gen = ?", digests)

    def record_errors(self, errors: dict[bytes, str]) -> None:
        """Entries the walk could not read (kept in `status` until a scan reads them)."""
        self.commit(Batch(errors=errors))

    def clear_errors_under(self, path: bytes) -> None:
        """This scan looks at ``path`` again: what was recorded as unreadable there is its to find."""
        scope, params = subtree_sql(path, None)
        with self.index.transaction():
            self.db.execute(f"DELETE FROM errors WHERE root_id = :r{scope}", {"r": self.root_id, **params})

    # --- between the steps -------------------------------------------------------------------

    def match_renames_by_inode(self) -> list[tuple[bytes, int, bytes]]:
        """Pairs (new path, gone entry id, its old path) with the same dev, inode and kind.

        The sources are the gone entries and also the *displaced* ones: an entry whose path
        now holds another inode (`mv b c; mv a b` leaves b on disk, so b's row is queued as
        changed content rather than gone). Without the second half, b's row is overwritten
        by a's and c arrives as a new entry: b's identity and feed history are lost and c
        is hashed again.

        A displaced entry whose name was taken again by a *new* entry of the same kind — one
        that is not itself arriving by a rename — keeps its name (docs/feed.md, "Save
        patterns"): `exiftool` renames IMG.jpg to IMG.jpg_original and writes the edited photo
        as IMG.jpg; an editor keeps `file~`. The person edited IMG.jpg, and a consumer keyed on
        its entry (albums, tags) must see it `modified`, and the backup `added`.

        A queued path whose own row already holds that inode is not a rename's arrival, only
        re-checked (racily clean, or its content changed): when one name of a hard-linked
        file is deleted, the other keeps its identity instead of taking the deleted one's.

        An inode is always taken with its device: a btrfs subvolume and its snapshots hold the
        same inode numbers on different st_dev, and so do two filesystems mounted in one root.
        """
        # CROSS JOIN fixes the join order (SQLite's rule): from the few gone or displaced rows,
        # to their entry, to the queue by (scan_id, inode). Left to itself, the planner put
        # the whole queue outside and scanned the queue again inside it: quadratic, minutes
        # for a first index of 20k files. Ties on the new path go to the lowest entry id.
        # The last two columns are, for a displaced entry, what now holds its name.
        rows = self.db.execute(
            """SELECT q.path, e.id, e.path, e.kind, e.size, e.mtime_ns, q.size, q.mtime_ns, NULL, NULL
               FROM scan_gone g CROSS JOIN entries e ON e.id = g.entry_id
               CROSS JOIN scan_queue q INDEXED BY scan_queue_by_inode
                    ON q.scan_id = g.scan_id AND q.inode = e.inode AND q.dev = e.dev
                    AND q.kind = e.kind
               WHERE g.scan_id = :s AND q.reason != 'metadata' AND NOT EXISTS (
                    SELECT 1 FROM entries cur WHERE cur.id = q.entry_id AND cur.inode = q.inode AND cur.dev = q.dev)
               UNION ALL
               SELECT q.path, e.id, e.path, e.kind, e.size, e.mtime_ns, q.size, q.mtime_ns, c.path, c.kind
               FROM scan_queue c CROSS JOIN entries e ON e.id = c.entry_id AND (e.inode != c.inode OR e.dev != c.dev)
               CROSS JOIN scan_queue q INDEXED BY scan_queue_by_inode
                    ON q.scan_id = c.scan_id AND q.inode = e.inode AND q.dev = e.dev
                    AND q.kind = e.kind AND q.path != c.path
               WHERE c.scan_id = :s AND c.reason = 'content' AND q.reason != 'metadata' AND NOT EXISTS (
                    SELECT 1 FROM entries cur WHERE cur.id = q.entry_id AND cur.inode = q.inode AND cur.dev = q.dev)
               ORDER BY 1, 2""",
            {"s": self.scan_id},
        ).fetchall()
        taken_new: set[bytes] = set()
        taken_old: set[int] = set()
        # new path -> (gone entry id, its old path, what holds that old path now if displaced)
        chosen: dict[bytes, tuple[int, bytes, bytes | None]] = {}
        for new_path, old_id, old_path, kind, old_size, old_mtime, size, mtime, holder, holder_kind in rows:
            if new_path in taken_new or old_id in taken_old:
                continue  # hard links: one inode, several names; the first pair wins
            if kind == Kind.FILE.value and (old_size, old_mtime) != (size, mtime):
                continue
            taken_new.add(new_path)
            taken_old.add(old_id)
            chosen[new_path] = (old_id, old_path, holder if holder_kind == kind else None)
        # A name taken by an entry that is not arriving by rename stays with its entry. Dropping
        # one pair can make another name's holder new too (its own source kept its name), so
        # until nothing changes.
        while True:
            kept = {n: c for n, c in chosen.items() if c[2] is None or c[2] in chosen}
            if len(kept) == len(chosen):
                break
            chosen = kept
        pairs = [(new_path, old_id, old_path) for new_path, (old_id, old_path, _) in sorted(chosen.items())]
        with self.index.transaction():
            self.db.executemany(
                "UPDATE scan_queue SET renamed_from = ? WHERE scan_id = ? AND path = ?",
                [(old_id, self.scan_id, new_path) for new_path, old_id, _ in pairs],
            )
            self.db.executemany(
                "DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?",
                [(self.scan_id, old_id) for _, old_id, _ in pairs],
            )
        return pairs

    def queue_totals(self, small: int) -> tuple[int, int, int]:
        """(entries, bytes to hash, files of at most ``small`` bytes to hash) still queued."""
        row = self.db.execute(
            "SELECT count(*), coalesce(sum(size) FILTER (WHERE hashed), 0),"
            " count(*) FILTER (WHERE hashed AND size <= ?)"
            " FROM (SELECT size, kind = 'file' AND reason != 'metadata' AND renamed_from IS NULL AS hashed"
            " FROM scan_queue WHERE scan_id = ?)",
            (small, self.scan_id),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def set_state(self, state: str, **totals: int) -> None:
        """The step the scan is in (walking | hashing | deleting), with the queue's totals."""
        assert set(totals) <= {"queued_files", "queued_bytes"}, totals
        sets = "".join(f", {k} = :{k}" for k in totals)
        with self.index.transaction():
            self.db.execute(
                f"UPDATE scans SET state = :state{sets} WHERE id = :id", {"state": state, **totals, "id": self.scan_id}
            )

    # --- what step 2 reads -------------------------------------------------------------------

    def queued(self, chunk: int = 1000) -> Iterator[QueueRow]:
        """The queue in path order (a folder before what it holds), read in chunks."""
        after = b""
        first = True
        while True:
            # Two statements, not one with "(? OR path > ?)": that form cannot seek to `after`,
            # so each page re-read the queue from its start (quadratic in the queue's length).
            rows = (
                self.db.execute(
                    f"SELECT {_QUEUE_COLUMNS} FROM scan_queue WHERE scan_id = ? ORDER BY path LIMIT ?",
                    (self.scan_id, chunk),
                ).fetchall()
                if first
                else self.db.execute(
                    f"SELECT {_QUEUE_COLUMNS} FROM scan_queue WHERE scan_id = ? AND path > ? ORDER BY path LIMIT ?",
                    (self.scan_id, after, chunk),
                ).fetchall()
            )
            for r in rows:
                yield _queue_row(r)
            if len(rows) < chunk:
                return
            first = False
            after = rows[-1][0]

    def queued_row(self, path: bytes) -> QueueRow | None:
        """One row of a scan's queue, if it is still queued."""
        r = self.db.execute(
            f"SELECT {_QUEUE_COLUMNS} FROM scan_queue WHERE scan_id = ? AND path = ?",
            (self.scan_id, path),
        ).fetchone()
        return None if r is None else _queue_row(r)

    def rename_targets(self) -> dict[int, bytes]:
        """The renames matched by inode so far: source entry id -> the queued path it moves to."""
        rows = self.db.execute(
            "SELECT renamed_from, path FROM scan_queue WHERE scan_id = ? AND renamed_from IS NOT NULL", (self.scan_id,)
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def any_gone(self) -> bool:
        """Whether the scan marked anything gone (step 2 only removes such marks, never adds)."""
        return (
            self.db.execute("SELECT 1 FROM scan_gone WHERE scan_id = ? LIMIT 1", (self.scan_id,)).fetchone() is not None
        )

    def gone_with_hash(self, blake3: bytes, size: int, exclude: set[int]) -> tuple[int, bytes] | None:
        """A gone file with this content: the rename rule's last resort.

        The candidates of one content are read once per scan, in path order, and handed out one
        by one: asked anew for each new file, 10,000 identical files replaced by 10,000 others
        read and sorted 10,000 rows 10,000 times (a 31 s scan). Step 2 only removes gone marks
        (see `any_gone`), so the list can only hold too much, never miss one: each candidate is
        checked again, by id, before it is handed out.
        """
        key = (blake3, size)
        candidates = self._gone_by_content.get(key)
        if candidates is None:
            rows = self.db.execute(
                # No INDEXED BY: the index may be missing while a first index of another root
                # builds it (Index.defer_content_index); where it exists, the planner takes it.
                "SELECT e.id FROM entries e"
                " JOIN scan_gone g ON g.entry_id = e.id AND g.scan_id = ?"
                " WHERE e.blake3 = ? AND e.size = ? AND e.kind = 'file' AND e.blake3 IS NOT NULL"
                " AND e.corrupt_blake3 IS NULL ORDER BY e.path DESC",
                (self.scan_id, blake3, size),
            ).fetchall()
            candidates = [int(r[0]) for r in rows]  # the first in path order last
            if len(candidates) > 1:
                # Kept for the scan, emptied or not: asked again, the query would read them all
                # once more. A content gone once is not kept: a million files moved across
                # filesystems (new inodes, each content once) must not leave a million keys.
                self._gone_by_content[key] = candidates
        while candidates:
            entry_id = candidates.pop()  # handed out once: the caller takes it (Stepper.hash_matched)
            if entry_id in exclude:
                continue
            row = self.db.execute(
                "SELECT e.path FROM entries e JOIN scan_gone g ON g.entry_id = e.id AND g.scan_id = ?"
                " WHERE e.id = ? AND e.blake3 = ? AND e.size = ? AND e.kind = 'file' AND e.corrupt_blake3 IS NULL",
                (self.scan_id, entry_id, blake3, size),
            ).fetchone()
            if row is not None:
                return entry_id, bytes(row[0])
        return None

    def path_of(self, entry_id: int) -> bytes:
        """Where an entry is now, as its rename's `old_path` (a parked row's NUL taken off)."""
        row = self.db.execute("SELECT path FROM entries WHERE id = ?", (entry_id,)).fetchone()
        path: bytes = row[0]
        return path[1:] if path.startswith(b"\x00") else path

    def as_indexed(self, entry_id: int) -> tuple[Entry, bool] | None:
        """An entry as the index holds it, and whether `verify` (or a repair, which keeps its
        marks) found its file unlike its hash; None when it no longer exists."""
        row = self.db.execute(
            f"SELECT {ENTRY_COLUMNS}, corrupt_blake3 IS NOT NULL FROM entries WHERE id = ?", (entry_id,)
        ).fetchone()
        return None if row is None else (entry_of(row[:-1]), bool(row[-1]))

    def other_names(self, entry_ids: Sequence[int], *, unless_file: tuple[int, int] | None = None) -> list[bytes]:
        """The other names (hard links) of these file entries, as the index knows them; with
        ``unless_file`` (dev, inode), only of entries whose row holds another file than that."""
        if not entry_ids:
            return []
        marks = ",".join("?" * len(entry_ids))
        other_file = "" if unless_file is None else " AND NOT (e.dev = ? AND e.inode = ?)"
        rows = self.db.execute(
            # From the given rows by id, then their inode's other rows: left to itself, the
            # planner read every entry of the root first (16 s for 100 ids on a 1M-entry index).
            f"SELECT DISTINCT o.path FROM entries e CROSS JOIN entries o INDEXED BY entries_by_inode"
            f" ON o.inode = e.inode AND o.dev = e.dev AND o.root_id = e.root_id AND o.id != e.id AND o.kind = 'file'"
            f" WHERE e.id IN ({marks}) AND +e.root_id = ? AND e.kind = 'file' AND e.nlink > 1{other_file}",
            (*entry_ids, self.root_id, *(unless_file or ())),
        ).fetchall()
        return [bytes(r[0]) for r in rows if not bytes(r[0]).startswith(b"\x00")]

    def stale_links(self, path: bytes, st: Stat) -> list[bytes]:
        """Other names of this file (hard links) whose row no longer matches its fresh stat."""
        rows = self.db.execute(
            "SELECT path, size, mtime_ns, ctime_ns, nlink, mode FROM entries"
            " WHERE inode = ? AND root_id = ? AND dev = ? AND kind = 'file' AND path != ?",
            (st.inode, self.root_id, st.dev, path),
        ).fetchall()
        fresh = (st.size, st.mtime_ns, st.ctime_ns, st.nlink, st.mode)
        return [bytes(r[0]) for r in rows if tuple(r[1:]) != fresh and not bytes(r[0]).startswith(b"\x00")]

    # --- writing -----------------------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Commit one batch in one transaction: rows, feed entries, queue progress, counters."""
        now = time.time()
        root_id = self.root_id
        with self.index.transaction():
            seq = self.index.last_seq()
            next_id_row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
            next_id = (int(next_id_row[0]) if next_id_row else 0) + 1
            feed: list[tuple[int, int, int, str, str, bytes, bytes | None, float]] = []
            new_ids: dict[bytes, int] = {}

            for entry_id, path, kind in batch.deletes:
                seq += 1
                self.db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                self.db.execute("DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?", (self.scan_id, entry_id))
                feed.append((seq, entry_id, root_id, Op.DELETED.value, kind.value, path, None, now))

            # Inserts are sent in runs with executemany (one call per run, not per row: the
            # first index is nearly all inserts); any other statement flushes the run first.
            inserts: list[tuple[Any, ...]] = []
            parents: set[int] = set()  # of inserted rows: see migration 4

            def flush_inserts() -> None:
                if inserts:
                    parents.update(row[3] for row in inserts)
                    self.db.executemany(
                        "INSERT INTO entries(id, root_id, path, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev,"
                        " mode, uid, gid, nlink, blake3, racy, scheme, target, xattrs, seq)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        inserts,
                    )
                    inserts.clear()

            for w in batch.writes:
                if w.quiet:
                    self.db.execute("UPDATE entries SET racy = ? WHERE id = ?", (w.racy, w.entry_id))
                    continue
                seq += 1
                if w.evict_id is not None or w.park_id is not None or w.entry_id is not None:
                    flush_inserts()
                if w.evict_id is not None:
                    row = self.db.execute("SELECT path, kind FROM entries WHERE id = ?", (w.evict_id,)).fetchone()
                    if row is not None and row[0] == w.path:
                        self.db.execute("DELETE FROM entries WHERE id = ?", (w.evict_id,))
                        feed.append((seq, w.evict_id, root_id, Op.DELETED.value, row[1], row[0], None, now))
                        seq += 1
                if w.park_id is not None:
                    # The row at this path moves elsewhere later in this scan (mv b c; mv a b):
                    # park it under a name no kernel allows, until its own rename comes.
                    # The new path is built in Python: SQL's || turns the BLOB into TEXT, which
                    # _unpark's BLOB range never matches and which fails to decode for a name
                    # that is not UTF-8. Only a row still at this path is parked: when its own
                    # rename sorted first (mv b a; mv x b), it has already left.
                    self.db.execute(
                        "UPDATE entries SET path = ? WHERE id = ? AND path = ?", (b"\x00" + w.path, w.park_id, w.path)
                    )
                if w.op is Op.RENAMED:
                    self.db.execute(
                        "DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?", (self.scan_id, w.entry_id)
                    )
                parent_id = w.parent_id
                if parent_id is None:
                    parent_path = parent_of(w.path)
                    parent_id = 0 if not parent_path else new_ids.get(parent_path) or self.id_of(parent_path)
                    if parent_id is None:
                        flush_inserts()
                        parent_id = self.id_of(parent_path)
                    if parent_id is None:
                        raise IndexError_(f"{self.index.path}: parent of {w.path!r} is not indexed")
                s = w.stat
                stat_values = (
                    s.kind.value,
                    s.size,
                    s.mtime_ns,
                    s.ctime_ns,
                    s.inode,
                    s.dev,
                    s.mode,
                    s.uid,
                    s.gid,
                    s.nlink,
                )
                if w.entry_id is None:
                    entry_id = next_id
                    next_id += 1
                    inserts.append(
                        (entry_id, root_id, w.path, parent_id, *stat_values, w.blake3, w.racy, w.scheme,
                         w.target, w.xattrs, seq)
                    )  # fmt: skip
                    if s.kind is Kind.DIR:
                        new_ids[w.path] = entry_id
                else:
                    entry_id = w.entry_id
                    # New content clears `verify`'s corruption mark (the file changed again).
                    hash_sql = (
                        ""
                        if w.keep_hash
                        else ", blake3 = :blake3, racy = :racy, scheme = :scheme, corrupt_blake3 = NULL"
                    )
                    self.db.execute(
                        "UPDATE entries SET path = :path, parent_id = :parent, kind = :kind, size = :size,"
                        " mtime_ns = :mtime, ctime_ns = :ctime, inode = :inode, dev = :dev, mode = :mode, uid = :uid,"
                        f" gid = :gid, nlink = :nlink, target = :target, xattrs = :xattrs, seq = :seq{hash_sql}"
                        " WHERE id = :id",
                        {"path": w.path, "parent": parent_id, "kind": s.kind.value, "size": s.size,
                         "mtime": s.mtime_ns, "ctime": s.ctime_ns, "inode": s.inode, "dev": s.dev, "mode": s.mode,
                         "uid": s.uid, "gid": s.gid, "nlink": s.nlink, "target": w.target, "xattrs": w.xattrs,
                         "seq": seq, "blake3": w.blake3, "racy": w.racy, "scheme": w.scheme, "id": entry_id},
                    )  # fmt: skip
                    if w.old_path is not None and s.kind is Kind.DIR:
                        new_ids[w.path] = entry_id
                feed.append((seq, entry_id, root_id, w.op.value, s.kind.value, w.path, w.old_path, now))

            flush_inserts()
            self.db.executemany(
                "UPDATE entries SET children_gen = children_gen + 1, children_digest = NULL WHERE id = ?",
                [(p,) for p in parents],
            )
            # After the line above, which cleared the digests of these very folders. A digest
            # counts the folder's children: any other row below it (written after the count was
            # reached, in this batch) and the folder is compared in full next time instead.
            self.db.executemany(
                "UPDATE entries SET children_digest = :digest WHERE root_id = :root AND path = :path AND kind = 'dir'"
                " AND (SELECT count(*) FROM entries c WHERE c.root_id = :root AND c.parent_id = entries.id) = :count",
                [{"digest": digest, "root": root_id, "path": path,
                  "count": int.from_bytes(digest[LISTING_DIGEST_BYTES:], "little")} for path, digest in batch.digests],
            )  # fmt: skip
            self.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", feed)
            self.db.executemany(
                "DELETE FROM scan_queue WHERE scan_id = ? AND path = ?", [(self.scan_id, p) for p in batch.queue_done]
            )
            if batch.found is not None:
                self.db.execute(
                    "UPDATE scans SET queued_files = ?, queued_bytes = ? WHERE id = ?", (*batch.found, self.scan_id)
                )
            if batch.done_files or batch.done_bytes:
                self.db.execute(
                    "UPDATE scans SET done_files = done_files + ?, done_bytes = done_bytes + ?, state = 'hashing'"
                    " WHERE id = ?",
                    (batch.done_files, batch.done_bytes, self.scan_id),
                )
            self.db.executemany(
                "INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?)",
                [(root_id, p, e, now) for p, e in batch.errors.items()],
            )
            self.index.add_counters_in(batch.counters)

    def unpark(self) -> None:
        """Put back what step 2 parked and did not move after all (see `_unpark`)."""
        with self.index.transaction():
            _unpark(self.index, self.root_id)

    # --- step 3 and the end -------------------------------------------------------------------

    def mark_gone_below_gone(self) -> None:
        """Mark gone every row whose folder is marked gone, level by level until none is new.

        The walk marked whole subtrees (mark_gone), so this finds only rows written since below
        a folder found gone. One probe of entries_by_parent per gone entry, per level."""
        with self.index.transaction():
            while True:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO scan_gone SELECT :s, e.id FROM scan_gone g"
                    " CROSS JOIN entries e INDEXED BY entries_by_parent ON e.root_id = :r AND e.parent_id = g.entry_id"
                    " WHERE g.scan_id = :s",
                    {"s": self.scan_id, "r": self.root_id},
                )
                if cur.rowcount <= 0:
                    return

    def unmark_gone_under(self, path: bytes) -> None:
        """What the scan found gone at or below ``path`` is not deleted after all (a volume
        unmounted during the scan: its mount point showed the empty folder below it)."""
        with self.index.transaction():
            self.db.execute(
                "DELETE FROM scan_gone WHERE scan_id = :s AND entry_id IN"
                f" (SELECT id FROM entries WHERE root_id = :r AND {under_sql('path')})",
                {"s": self.scan_id, "r": self.root_id, **subtree_bounds(path)},
            )

    def gone(self, chunk: int) -> list[tuple[int, bytes, Kind]]:
        """The next chunk of gone entries, deepest first so a folder goes after what it held."""
        rows = self.db.execute(
            "SELECT e.id, e.path, e.kind FROM scan_gone g JOIN entries e ON e.id = g.entry_id"
            " WHERE g.scan_id = ? ORDER BY e.path DESC LIMIT ?",
            (self.scan_id, chunk),
        ).fetchall()
        return [(r[0], r[1], Kind(r[2])) for r in rows]

    def finish(self, *, full: bool, counter: str) -> None:
        """The scan is over: its tables are emptied, the root's last full sync noted, the scan counted."""
        now = time.time()
        scan_id, root_id = self.scan_id, self.root_id
        with self.index.transaction():
            self.db.execute("DELETE FROM scan_queue WHERE scan_id = ?", (scan_id,))
            self.db.execute("DELETE FROM scan_gone WHERE scan_id = ?", (scan_id,))
            self.db.execute("UPDATE scans SET state = 'done', finished_at = ? WHERE id = ?", (now, scan_id))
            # Keep a short history of scans; the queue tables of finished ones are already empty.
            self.db.execute("DELETE FROM scans WHERE state IN ('done', 'replaced') AND id < ? - 1000", (scan_id,))
            if full:
                self.db.execute("UPDATE roots SET last_full_sync = ? WHERE id = ?", (now, root_id))
            self.index.add_counters_in({counter: 1})


def _drop_scans(index: Index, root_id: int) -> None:
    for (scan_id,) in index.db.execute(
        "SELECT id FROM scans WHERE root_id = ? AND state != 'done'", (root_id,)
    ).fetchall():
        index.db.execute("DELETE FROM scan_queue WHERE scan_id = ?", (scan_id,))
        index.db.execute("DELETE FROM scan_gone WHERE scan_id = ?", (scan_id,))
        index.db.execute("UPDATE scans SET state = 'replaced', finished_at = ? WHERE id = ?", (time.time(), scan_id))


def _unpark(index: Index, root_id: int) -> None:
    """Put back rows an interrupted scan parked; one whose path was taken meanwhile is gone."""
    parked = index.db.execute(
        "SELECT id, path, kind FROM entries WHERE root_id = ? AND path >= x'00' AND path < x'01'", (root_id,)
    ).fetchall()
    for entry_id, path, kind in parked:
        if index.id_of(root_id, path[1:]) is None:
            index.db.execute("UPDATE entries SET path = ? WHERE id = ?", (path[1:], entry_id))
        else:
            index.db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
            index.db.execute(
                "INSERT INTO changes(entry_id, root_id, op, kind, path, old_path, at) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                (entry_id, root_id, Op.DELETED.value, kind, path[1:], time.time()),
            )
