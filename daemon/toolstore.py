"""The library tools' tables and queries: duplicate groups, `verify`'s marks and cursors,
`rebuild`'s re-derivations, and the `jobs` table that makes the last two resumable.

Over the same database as the index (`ToolStore(index)`); the engine neither reads nor writes
these, except the corruption mark that a new content clears (journal.ScanJournal.commit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.index import Index, subtree_bounds, subtree_sql, under_sql
from daemon.model import ENTRY_COLUMNS, Entry, Kind, Op, entry_of

# One file of a duplicate group: size, blake3, root path, path in the root, dev, inode.
# A plain tuple: `dupes` reads hundreds of thousands of them and a class costs a second.
DupeRow = tuple[int, bytes, bytes, bytes, int, int]


@dataclass(frozen=True, slots=True)
class CorruptRow:
    id: int
    path: bytes
    size: int
    mtime_ns: int
    blake3: bytes
    corrupt_blake3: bytes


@dataclass(frozen=True, slots=True)
class JobRow:
    """A resumable job's progress: `cursor` is the last item done (None before the first)."""

    name: str
    root_id: int
    scope: bytes
    cursor: bytes | int | None
    done_files: int
    done_bytes: int
    started_at: float
    pid: int


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """What `rebuild` derived again for an entry whose stat still matched the index."""

    entry: Entry
    blake3: bytes
    corrupt_blake3: bytes | None
    racy: bool
    scheme: int
    xattrs: str | None


class ToolStore:
    """The tools' queries over one index connection."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.db = index.db

    def dupe_groups(self, min_size: int, root_id: int | None = None, path: bytes = b"") -> list[DupeRow]:
        """Every file of each (size, blake3) that more than one indexed file has, in no order.

        Two steps over ``entries_dupes`` (size first, so ``min_size`` is a range): the groups
        of two or more names, then their members by index lookup. Telling hard links apart
        (same dev+inode) is the caller's; entries marked corrupt are left out, their indexed
        hash no longer describes what is on disk.
        """
        scope = ""
        params: dict[str, Any] = {"min": min_size}
        if root_id is not None:
            scope = " AND {t}root_id = :r" + (f" AND {under_sql('{t}path')}" if path else "")
            params.update({"r": root_id, **subtree_bounds(path)})
        rows = self.db.execute(
            "WITH g AS (SELECT size, blake3 FROM entries WHERE kind = 'file' AND blake3 IS NOT NULL"
            f" AND corrupt_blake3 IS NULL AND size >= :min{scope.format(t='')} GROUP BY size, blake3"
            " HAVING count(*) > 1)"
            " SELECT g.size, g.blake3, r.path, e.path, e.dev, e.inode FROM g"
            " JOIN entries e ON e.size = g.size AND e.blake3 = g.blake3 JOIN roots r ON r.id = e.root_id"
            f" WHERE e.kind = 'file' AND e.corrupt_blake3 IS NULL{scope.format(t='e.')}",
            params,
        ).fetchall()
        return rows

    def corrupt_under(self, root_id: int, path: bytes) -> list[CorruptRow]:
        """Entries marked corrupt at or below a root-relative path, in path order."""
        scope, params = subtree_sql(path, None)
        rows = self.db.execute(
            "SELECT id, path, size, mtime_ns, blake3, corrupt_blake3 FROM entries"
            f" WHERE root_id = :r AND corrupt_blake3 IS NOT NULL{scope} ORDER BY path",
            {"r": root_id, **params},
        ).fetchall()
        return [CorruptRow(*r) for r in rows]

    def files_after(self, root_id: int, path: bytes, after: bytes | None, limit: int) -> list[Entry]:
        """Hashed files at or below ``path`` whose path sorts after ``after``, in path order."""
        scope, params = subtree_sql(path, after)
        rows = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = :r AND kind = 'file' AND blake3 IS NOT NULL"
            f"{scope} ORDER BY path LIMIT :n",
            {"r": root_id, "n": limit, **params},
        ).fetchall()
        return [entry_of(r) for r in rows]

    def file_totals_after(self, root_id: int, path: bytes, after: bytes | None) -> tuple[int, int]:
        """(files, bytes) that `files_after` would still return."""
        scope, params = subtree_sql(path, after)
        row = self.db.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE root_id = :r AND kind = 'file'"
            f" AND blake3 IS NOT NULL{scope}",
            {"r": root_id, **params},
        ).fetchone()
        return int(row[0]), int(row[1])

    def set_corrupt(self, entry: Entry, seen: bytes | None) -> bool:
        """Mark (or, with None, unmark) an entry, only if its row is still the one verified."""
        s = entry.stat
        with self.index.transaction():
            cur = self.db.execute(
                "UPDATE entries SET corrupt_blake3 = ? WHERE id = ? AND size = ? AND mtime_ns = ? AND inode = ?"
                " AND blake3 = ?",
                (seen, entry.id, s.size, s.mtime_ns, s.inode, entry.blake3),
            )
            return cur.rowcount == 1

    def accept_content(self, entry: Entry, digest: bytes, racy: bool) -> int | None:
        """Store a corrupt-marked entry's new content as its hash and tell the feed (`modified`).

        Returns the change's sequence number, or None when the row moved on meanwhile.
        """
        s = entry.stat
        with self.index.transaction():
            seq = self.index.last_seq() + 1
            cur = self.db.execute(
                "UPDATE entries SET blake3 = ?, racy = ?, corrupt_blake3 = NULL, seq = ? WHERE id = ? AND size = ?"
                " AND mtime_ns = ? AND inode = ? AND corrupt_blake3 IS NOT NULL",
                (digest, racy, seq, entry.id, s.size, s.mtime_ns, s.inode),
            )
            if cur.rowcount != 1:
                return None
            self.db.execute(
                "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (seq, entry.id, entry.root_id, Op.MODIFIED.value, Kind.FILE.value, entry.path, time.time()),
            )
            return seq

    def job(self, name: str, root_id: int, scope: bytes) -> JobRow | None:
        row = self.db.execute(
            "SELECT cursor, done_files, done_bytes, started_at, pid FROM jobs"
            " WHERE name = ? AND root_id = ? AND scope = ?",
            (name, root_id, scope),
        ).fetchone()
        return None if row is None else JobRow(name, root_id, scope, *row)

    def save_job(self, job: JobRow, counters: dict[str, int] | None = None) -> None:
        """Persist a job's cursor (and the counters of the work it covers) in one transaction."""
        with self.index.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.name, job.root_id, job.scope, job.cursor, job.done_files, job.done_bytes, job.started_at,
                 time.time(), os.getpid()),
            )  # fmt: skip
            self.index.add_counters_in(counters or {})

    def end_job(self, name: str, root_id: int, scope: bytes) -> None:
        with self.index.transaction():
            self.db.execute("DELETE FROM jobs WHERE name = ? AND root_id = ? AND scope = ?", (name, root_id, scope))

    def rebuild_count(self, scheme: int) -> tuple[int, int]:
        """(files, bytes) whose stored hash predates ``scheme``."""
        row = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM entries"
            " WHERE kind = 'file' AND blake3 IS NOT NULL AND scheme < ?",
            (scheme,),
        ).fetchone()
        return int(row[0]), int(row[1])

    def rebuild_batch(self, scheme: int, after_id: int, limit: int) -> list[tuple[bytes, Entry]]:
        """(root path, entry) of the next files whose stored hash predates ``scheme``, in id order."""
        rows = self.db.execute(
            f"SELECT r.path, {', '.join('e.' + c.strip() for c in ENTRY_COLUMNS.split(','))}"
            " FROM entries e JOIN roots r ON r.id = e.root_id"
            " WHERE e.kind = 'file' AND e.blake3 IS NOT NULL AND e.scheme < ? AND e.id > ? ORDER BY e.id LIMIT ?",
            (scheme, after_id, limit),
        ).fetchall()
        return [(r[0], entry_of(r[1:])) for r in rows]

    def store_rebuilt(self, rows: Sequence[Rebuilt], job: JobRow, counters: dict[str, int]) -> int:
        """Store re-derived fields of unchanged files, with the job's cursor, in one transaction.

        Neither ``seq`` nor the feed moves: the content is what consumers were already told.
        A row the scanner rewrote meanwhile (stat moved) is left alone. Returns rows stored.
        """
        stored = 0
        with self.index.transaction():
            for r in rows:
                s = r.entry.stat
                cur = self.db.execute(
                    "UPDATE entries SET blake3 = ?, corrupt_blake3 = ?, racy = ?, scheme = ?, xattrs = ?"
                    " WHERE id = ? AND size = ? AND mtime_ns = ? AND inode = ? AND scheme = ?",
                    (r.blake3, r.corrupt_blake3, r.racy, r.scheme, r.xattrs, r.entry.id, s.size, s.mtime_ns,
                     s.inode, r.entry.scheme),
                )  # fmt: skip
                stored += cur.rowcount
            self.db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.name, job.root_id, job.scope, job.cursor, job.done_files, job.done_bytes, job.started_at,
                 time.time(), os.getpid()),
            )  # fmt: skip
            self.index.add_counters_in(counters)
        return stored
