"""The index: SQLite schema, migrations and every query. The only module with SQL.

Writes happen in explicit transactions (one per batch). Sequence numbers and entry ids are
assigned inside a ``BEGIN IMMEDIATE`` transaction, which holds SQLite's single write lock, so
readers only ever see whole batches and the change feed has no gaps.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiosqlite

from daemon.model import Entry, Kind, Op, RootState, Stat, parent_of
from daemon.rules import HASH_SCHEME

SCHEMA_VERSION = 5
CHECKPOINT_PAGES = 8192  # of 4 KiB: SQLite's default page size

# Each migration takes the database from version N-1 to N; append, never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE roots(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path BLOB NOT NULL UNIQUE,
        dev INTEGER,
        state TEXT NOT NULL DEFAULT 'online',
        offline_reason TEXT,
        last_full_sync REAL,
        overflows INTEGER NOT NULL DEFAULT 0,
        observer TEXT,
        pending INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE entries(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        root_id INTEGER NOT NULL REFERENCES roots(id),
        path BLOB NOT NULL,
        parent_id INTEGER NOT NULL,          -- 0 for the root's own children
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        dev INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        nlink INTEGER NOT NULL,
        blake3 BLOB,
        racy INTEGER NOT NULL DEFAULT 0,
        scheme INTEGER NOT NULL DEFAULT 0,
        target BLOB,
        xattrs TEXT,
        seq INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX entries_by_path ON entries(root_id, path);
    CREATE INDEX entries_by_parent ON entries(root_id, parent_id);
    CREATE INDEX entries_by_inode ON entries(inode);
    CREATE INDEX entries_by_hash ON entries(blake3, size) WHERE blake3 IS NOT NULL;
    CREATE TABLE changes(
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        entry_id INTEGER NOT NULL,
        root_id INTEGER NOT NULL,
        op TEXT NOT NULL,
        kind TEXT NOT NULL,
        path BLOB NOT NULL,
        old_path BLOB,
        at REAL NOT NULL
    );
    CREATE TABLE scans(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        root_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        scopes TEXT NOT NULL,
        state TEXT NOT NULL,                 -- walking | hashing | deleting | done
        started_at REAL NOT NULL,
        finished_at REAL,
        queued_files INTEGER NOT NULL DEFAULT 0,
        queued_bytes INTEGER NOT NULL DEFAULT 0,
        done_files INTEGER NOT NULL DEFAULT 0,
        done_bytes INTEGER NOT NULL DEFAULT 0,
        pid INTEGER NOT NULL
    );
    CREATE TABLE scan_queue(
        scan_id INTEGER NOT NULL,
        path BLOB NOT NULL,
        reason TEXT NOT NULL,                -- new | content | metadata | replaced
        entry_id INTEGER,                    -- the row now at this path, if any
        parent_id INTEGER,                   -- NULL when the parent is new too
        kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
        inode INTEGER NOT NULL, dev INTEGER NOT NULL, mode INTEGER NOT NULL, uid INTEGER NOT NULL,
        gid INTEGER NOT NULL, nlink INTEGER NOT NULL,
        renamed_from INTEGER,                -- a gone entry matched by inode
        PRIMARY KEY(scan_id, path)
    ) WITHOUT ROWID;
    CREATE INDEX scan_queue_by_inode ON scan_queue(scan_id, inode);
    CREATE TABLE scan_gone(
        scan_id INTEGER NOT NULL,
        entry_id INTEGER NOT NULL,
        PRIMARY KEY(scan_id, entry_id)
    ) WITHOUT ROWID;
    CREATE TABLE errors(
        root_id INTEGER NOT NULL,
        path BLOB NOT NULL,
        error TEXT NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY(root_id, path)
    ) WITHOUT ROWID;
    CREATE TABLE counters(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE daemon(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        state TEXT NOT NULL,
        activity TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # 2 (issue 6: dupes, verify, rebuild): the corruption mark, the indexes `dupes` and
    # `status` need, and the cursors that make `verify` and `rebuild` resumable.
    """
    ALTER TABLE entries ADD COLUMN corrupt_blake3 BLOB;  -- the hash `verify` saw on disk
    CREATE INDEX entries_corrupt ON entries(root_id, path) WHERE corrupt_blake3 IS NOT NULL;
    CREATE INDEX entries_dupes ON entries(size, blake3)
        WHERE kind = 'file' AND blake3 IS NOT NULL AND corrupt_blake3 IS NULL;
    CREATE TABLE jobs(
        name TEXT NOT NULL,                  -- verify | rebuild
        root_id INTEGER NOT NULL,            -- 0 for a job over every root
        scope BLOB NOT NULL,                 -- root-relative path (b'' is the whole root)
        cursor,                              -- the last item done: a path (verify) or an entry id (rebuild)
        done_files INTEGER NOT NULL DEFAULT 0,
        done_bytes INTEGER NOT NULL DEFAULT 0,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        pid INTEGER NOT NULL,
        PRIMARY KEY(name, root_id, scope)
    ) WITHOUT ROWID;
    """,
    # 3: entries_dupes (size, blake3) also serves rename matching by content, so the older
    # (blake3, size) index only cost every insert a second random B-tree update: 0.8 s of
    # a 6.4 s first index of 100k small files (docs/benchmarks.md).
    """
    DROP INDEX IF EXISTS entries_by_hash;
    """,
    # 4: a folder's listing digest, so a sync skips comparing the children of a folder whose
    # listing matches the one last found equal to the index (docs/scanning.md, "Unchanged
    # folders"). children_gen counts writes to the folder's children, and every such write
    # clears the digest: a digest is stored only if no child changed since the walk read them.
    # Inserts do the same in `commit`, once per parent and batch: a trigger per inserted row
    # cost a first index of 100k files 0.6 s of 2 s of inserts.
    """
    ALTER TABLE entries ADD COLUMN children_digest BLOB;
    ALTER TABLE entries ADD COLUMN children_gen INTEGER NOT NULL DEFAULT 0;
    CREATE TRIGGER entries_child_removed AFTER DELETE ON entries BEGIN
        UPDATE entries SET children_gen = children_gen + 1, children_digest = NULL WHERE id = OLD.parent_id;
    END;
    CREATE TRIGGER entries_child_changed AFTER UPDATE OF root_id, path, parent_id, kind, size, mtime_ns,
        ctime_ns, inode, dev, mode, uid, gid, nlink, blake3, racy, scheme ON entries BEGIN
        UPDATE entries SET children_gen = children_gen + 1, children_digest = NULL
            WHERE id IN (OLD.parent_id, NEW.parent_id);
    END;
    """,
    # 5: how long the oldest pending path of a root has waited, and the oldest few, published
    # by the daemon so that `status` shows a round that is late (docs/aggregation.md, "Stalls").
    """
    ALTER TABLE roots ADD COLUMN pending_since REAL;   -- wall-clock time its oldest pending event came
    ALTER TABLE roots ADD COLUMN pending_paths TEXT;   -- JSON list of the oldest pending paths (fsdecoded)
    """,
)


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements, keeping a trigger's body (which has `;`) whole.

    Not executescript: it commits first, and a migration must be one transaction with its check.
    """
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                yield pending
            pending = ""


ENTRY_COLUMNS = (
    "id, root_id, path, kind, size, mtime_ns, ctime_ns, inode, dev, mode, uid, gid, nlink,"
    " blake3, racy, scheme, seq, target, xattrs"
)
COUNTERS = ("files_hashed", "bytes_hashed", "scans_full", "scans_subtree", "scans_folder", "scans_file")


class IndexError_(Exception):
    """The database cannot be used: the message names the file and the reason."""


def _entry(row: Sequence[Any]) -> Entry:
    stat = Stat(Kind(row[3]), *row[4:13])
    return Entry(row[0], row[1], row[2], stat, row[13], bool(row[14]), row[15], row[16], row[17], row[18])


# A row of ENTRY_COLUMNS as SQLite returns it.
EntryRow = tuple[Any, ...]


def entry_of(row: EntryRow) -> Entry:
    return _entry(row)


def row_unchanged(row: EntryRow, st: Stat) -> bool:
    """``classify(entry_of(row), st) is Change.NONE``, without building the Entry and its Stat.

    A no-change sync asks this of every entry; building the two frozen dataclasses per row
    was a third of its time. It must stay equal to `rules.classify`: change both together.
    """
    if (row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11], row[12]) != (
        st.size, st.mtime_ns, st.ctime_ns, st.inode, st.dev, st.mode, st.uid, st.gid, st.nlink
    ) or row[3] != st.kind.value:  # fmt: skip
        return False
    # A file is trusted only when hashed, not racily clean and hashed by the current scheme.
    return st.kind is not Kind.FILE or (not row[14] and row[13] is not None and row[15] >= HASH_SCHEME)


def _under(column: str) -> str:
    """SQL for "column is :p or below it", with :lo and :hi from `_bounds` (memcmp order).

    One range the index can seek, [p, hi), then the filter: written as "= :p OR the range
    [lo, hi)", SQLite searched the index by root_id alone and read every entry of the root,
    86 ms per deleted path on a 1M-entry index. The range also holds p's siblings whose
    names continue with a byte below '/' ("b.jpg", "b 2/..."): read and filtered out.
    """
    return f"({column} >= :p AND {column} < :hi AND ({column} = :p OR {column} >= :lo))"


def _scope(path: bytes, after: bytes | None) -> tuple[str, dict[str, bytes]]:
    """SQL (" AND ...") and parameters for "at or below path (b"" is the whole root), after
    ``after``". Terms are left out rather than written as ``(:p = x'' OR ...)``: SQLite cannot
    seek an index through such an OR, and `verify` paging a 1M-entry root by ``path > :after``
    read it from its start for every page (81 ms a page at 800k; quadratic over the root)."""
    sql, params = "", {}
    if path:
        sql, params = f" AND {_under('path')}", _bounds(path)
    if after is not None:
        sql, params = sql + " AND path > :after", {**params, "after": after}
    return sql, params


def _bounds(path: bytes) -> dict[str, bytes]:
    # Everything below "a/b" sorts between "a/b/" and "a/b0": '0' is the byte after '/'.
    # Computed here, not with SQL's ||, which turns BLOBs into TEXT (and TEXT sorts before BLOB).
    return {"p": path, "lo": path + b"/", "hi": path + b"0"}


@dataclass(frozen=True, slots=True)
class FolderState:
    id: int
    digest: bytes | None  # of the listing last found equal to the index; None once a child changed
    generation: int  # children_gen: moves with every write to a child row


@dataclass(frozen=True, slots=True)
class RootRow:
    id: int
    path: bytes
    dev: int | None
    state: RootState
    offline_reason: str | None
    last_full_sync: float | None
    overflows: int
    observer: str | None
    pending: int
    pending_since: float | None
    pending_paths: str | None


@dataclass(frozen=True, slots=True)
class ActiveScan:
    root_id: int
    kind: str
    state: str
    done_files: int
    queued_files: int
    done_bytes: int
    queued_bytes: int
    started_at: float
    pid: int


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


@dataclass(slots=True)
class Batch:
    """Everything one transaction commits."""

    root_id: int
    scan_id: int | None = None
    writes: list[Write] = field(default_factory=list)
    deletes: list[tuple[int, bytes, Kind]] = field(default_factory=list)
    queue_done: list[bytes] = field(default_factory=list)
    errors: dict[bytes, str] = field(default_factory=dict)
    errors_cleared: list[bytes] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    done_files: int = 0
    done_bytes: int = 0

    def __len__(self) -> int:
        return len(self.writes) + len(self.deletes) + len(self.queue_done)


@dataclass(frozen=True, slots=True)
class QueueRow:
    path: bytes
    reason: str
    entry_id: int | None
    parent_id: int | None
    stat: Stat
    renamed_from: int | None


class Index:
    """A connection to the index database. One per thread; cheap to open."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:  # Path.exists/is_dir raise on EACCES (a folder above that the user cannot enter)
            if readonly:
                if not path.exists():
                    raise IndexError_(f"{path}: no such database (run `treewatch scan` first)")
                uri = f"file:{path}?mode=ro"
            else:
                if not path.parent.is_dir():
                    raise IndexError_(f"{path}: folder {path.parent} does not exist")
                if path.exists() and not os.access(path, os.R_OK | os.W_OK):
                    raise IndexError_(f"{path}: permission denied (the database must be readable and writable)")
                if not os.access(path.parent, os.W_OK | os.X_OK):
                    raise IndexError_(f"{path}: folder {path.parent} is not writable (SQLite needs it for its WAL)")
                uri = f"file:{path}?mode=rwc"
        except OSError as e:
            raise IndexError_(f"{path}: cannot be reached: {e.strerror or e}") from None
        try:
            # The database is created without world bits: it lists every file of the library.
            old_umask = os.umask(0o027)
            try:
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=60)
            finally:
                os.umask(old_umask)
            self.db.execute("PRAGMA busy_timeout = 60000")
            if not readonly:
                # Migrate (which refuses a foreign or newer database) before switching to WAL:
                # journal_mode = WAL rewrites the file's header, and a database that is not
                # ours must be left byte for byte as it was.
                self._migrate()
                self.db.execute("PRAGMA journal_mode = WAL")
                # NORMAL in WAL mode loses at most the last transactions on power loss, never
                # consistency; the next scan finds what they held on disk again.
                self.db.execute("PRAGMA synchronous = NORMAL")
                # A checkpoint syncs the WAL and the database to disk. At the default of every
                # 1000 pages, a first index checkpointed every other batch (the content-hash
                # index dirties ~600 random pages per 1000 rows): 32 MiB between checkpoints
                # took a first index of 100k small files from 4.3 s to 4.0 s.
                self.db.execute(f"PRAGMA wal_autocheckpoint = {CHECKPOINT_PAGES}")
            else:
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise IndexError_(f"{path}: made by a newer treewatch (schema {version} > {SCHEMA_VERSION})")
                if version < SCHEMA_VERSION:
                    # An index from before an upgrade: migrate it once (needs write access), then read.
                    self.db.close()
                    Index(path).close()
                    self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=60)
                    self.db.execute("PRAGMA busy_timeout = 60000")
        except sqlite3.DatabaseError as e:
            raise IndexError_(f"{path}: {_describe(e)}") from None

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        # One write transaction around the check and the migrations: two processes creating
        # the database at once (the daemon's first start and a `status` beside it) used to
        # interleave, one seeing the other's new tables with user_version still 0 and calling
        # the index "not a treewatch index" (torture: database deleted, daemon restarted).
        with self.transaction():
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise IndexError_(f"{self.path}: made by a newer treewatch (schema {version} > {SCHEMA_VERSION})")
            if version == 0 and self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise IndexError_(f"{self.path}: an SQLite database, but not a treewatch index")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _statements(MIGRATIONS[target - 1]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {target}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # --- roots -------------------------------------------------------------------------

    def root(self, path: bytes, *, create: bool = True) -> RootRow | None:
        row = self.db.execute("SELECT * FROM roots WHERE path = ?", (path,)).fetchone()
        if row is None and create:
            with self.transaction():
                self.db.execute("INSERT OR IGNORE INTO roots(path) VALUES (?)", (path,))
            row = self.db.execute("SELECT * FROM roots WHERE path = ?", (path,)).fetchone()
        return None if row is None else RootRow(row[0], row[1], row[2], RootState(row[3]), *row[4:])

    def roots(self) -> list[RootRow]:
        rows = self.db.execute("SELECT * FROM roots ORDER BY path").fetchall()
        return [RootRow(r[0], r[1], r[2], RootState(r[3]), *r[4:]) for r in rows]

    def set_root(self, root_id: int, **fields: Any) -> None:
        allowed = {"dev", "state", "offline_reason", "last_full_sync", "overflows", "observer", "pending"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self.transaction():
            self.db.execute(f"UPDATE roots SET {sets} WHERE id = :id", {**fields, "id": root_id})

    def move_root_dev(self, root_id: int, dev: int) -> None:
        """A filesystem that came back with a new anonymous device number (NFS, btrfs, tmpfs)."""
        with self.transaction():
            self.db.execute("UPDATE roots SET dev = ? WHERE id = ?", (dev, root_id))
            self.db.execute("UPDATE entries SET dev = ? WHERE root_id = ?", (dev, root_id))

    def has_entries(self, root_id: int) -> bool:
        """Whether anything is indexed under the root: an EXISTS, not a count, since every
        scan asks it (a count of a 1M-entry root took 25-70 ms of a one-file scan: P3)."""
        row = self.db.execute("SELECT EXISTS(SELECT 1 FROM entries WHERE root_id = ?)", (root_id,)).fetchone()
        return bool(row[0])

    def sample_inodes(self, root_id: int, limit: int = 16) -> list[tuple[bytes, int]]:
        rows = self.db.execute(
            "SELECT path, inode FROM entries WHERE root_id = ? AND parent_id = 0 ORDER BY path LIMIT ?",
            (root_id, limit),
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # --- reading entries ---------------------------------------------------------------

    def entry(self, root_id: int, path: bytes) -> Entry | None:
        row = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = ? AND path = ?", (root_id, path)
        ).fetchone()
        return None if row is None else _entry(row)

    def children(self, root_id: int, parent_id: int) -> dict[bytes, Entry]:
        rows = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = ? AND parent_id = ?", (root_id, parent_id)
        ).fetchall()
        return {row[2]: _entry(row) for row in rows}

    def children_rows(self, root_id: int, parent_id: int) -> dict[bytes, EntryRow]:
        """`children` as raw rows, for the walk: see `row_unchanged` and `entry_of`."""
        rows = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = ? AND parent_id = ?", (root_id, parent_id)
        ).fetchall()
        return {row[2]: row for row in rows}

    def entries_under(self, root_id: int, path: bytes) -> Iterator[Entry]:
        """Entries at or below a root-relative path (b"" is the whole root), in path order."""
        scope, params = _scope(path, None)
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = :r{scope} ORDER BY path"
        for row in self.db.execute(sql, {"r": root_id, **params}):
            yield _entry(row)

    def changes_since(
        self, seq: int, limit: int = 10_000
    ) -> Iterator[tuple[int, Op, Kind, bytes, bytes | None, bytes]]:
        """The feed after ``seq``: (seq, op, kind, root path, old path, path), read in pages."""
        while True:
            rows = self.db.execute(
                "SELECT c.seq, c.op, c.kind, r.path, c.old_path, c.path FROM changes c JOIN roots r ON r.id = c.root_id"
                " WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
                (seq, limit),
            ).fetchall()
            for row in rows:
                yield row[0], Op(row[1]), Kind(row[2]), row[3], row[4], row[5]
            if len(rows) < limit:
                return
            seq = rows[-1][0]

    def last_seq(self) -> int:
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    def totals(self, root_id: int) -> tuple[int, int, int]:
        """(files, dirs, bytes of files) under a root."""
        row = self.db.execute(
            "SELECT count(*) FILTER (WHERE kind = 'file'), count(*) FILTER (WHERE kind = 'dir'),"
            " coalesce(sum(size) FILTER (WHERE kind = 'file'), 0) FROM entries WHERE root_id = ?",
            (root_id,),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def errors(self, root_id: int, limit: int = 100) -> list[tuple[bytes, str]]:
        rows = self.db.execute(
            "SELECT path, error FROM errors WHERE root_id = ? ORDER BY at DESC LIMIT ?", (root_id, limit)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def counters(self) -> dict[str, int]:
        values = dict.fromkeys(COUNTERS, 0)
        values.update({name: int(v) for name, v in self.db.execute("SELECT name, value FROM counters")})
        return values

    def add_counters(self, counters: dict[str, int]) -> None:
        with self.transaction():
            self._add_counters(counters)

    def _add_counters(self, counters: dict[str, int]) -> None:
        self.db.executemany(
            "INSERT INTO counters(name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in counters.items() if v],
        )

    # --- scans (progress, for resume) --------------------------------------------------

    def begin_scan(self, root_id: int, kind: str, scopes: str) -> int:
        with self.transaction():
            # A new scan of a root replaces whatever an interrupted one left queued: the walk
            # finds again all that was not committed, and nothing that was.
            self._drop_scans(root_id)
            self._unpark(root_id)
            cur = self.db.execute(
                "INSERT INTO scans(root_id, kind, scopes, state, started_at, pid) VALUES (?, ?, ?, 'walking', ?, ?)",
                (root_id, kind, scopes, time.time(), os.getpid()),
            )
            return int(cur.lastrowid or 0)

    def _drop_scans(self, root_id: int) -> None:
        for (scan_id,) in self.db.execute(
            "SELECT id FROM scans WHERE root_id = ? AND state != 'done'", (root_id,)
        ).fetchall():
            self.db.execute("DELETE FROM scan_queue WHERE scan_id = ?", (scan_id,))
            self.db.execute("DELETE FROM scan_gone WHERE scan_id = ?", (scan_id,))
            self.db.execute("UPDATE scans SET state = 'replaced', finished_at = ? WHERE id = ?", (time.time(), scan_id))

    def unpark(self, root_id: int) -> None:
        with self.transaction():
            self._unpark(root_id)

    def _unpark(self, root_id: int) -> None:
        """Put back rows an interrupted scan parked; one whose path was taken meanwhile is gone."""
        parked = self.db.execute(
            "SELECT id, path, kind FROM entries WHERE root_id = ? AND path >= x'00' AND path < x'01'", (root_id,)
        ).fetchall()
        for entry_id, path, kind in parked:
            if self.id_of(root_id, path[1:]) is None:
                self.db.execute("UPDATE entries SET path = ? WHERE id = ?", (path[1:], entry_id))
            else:
                self.db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                self.db.execute(
                    "INSERT INTO changes(entry_id, root_id, op, kind, path, old_path, at)"
                    " VALUES (?, ?, ?, ?, ?, NULL, ?)",
                    (entry_id, root_id, Op.DELETED.value, kind, path[1:], time.time()),
                )

    def interrupted_scan(self, root_id: int) -> tuple[str, str, int, int] | None:
        """(kind, scopes, files done, files queued) of a scan that did not finish."""
        row = self.db.execute(
            "SELECT kind, scopes, done_files, queued_files FROM scans"
            " WHERE root_id = ? AND state NOT IN ('done', 'replaced') ORDER BY id DESC LIMIT 1",
            (root_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def set_scan(self, scan_id: int, **fields: Any) -> None:
        allowed = {"state", "queued_files", "queued_bytes", "finished_at"}
        assert set(fields) <= allowed, fields
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        with self.transaction():
            self.db.execute(f"UPDATE scans SET {sets} WHERE id = :id", {**fields, "id": scan_id})

    def finish_scan(self, scan_id: int, root_id: int, *, full: bool, counter: str) -> None:
        now = time.time()
        with self.transaction():
            self.db.execute("DELETE FROM scan_queue WHERE scan_id = ?", (scan_id,))
            self.db.execute("DELETE FROM scan_gone WHERE scan_id = ?", (scan_id,))
            self.db.execute("UPDATE scans SET state = 'done', finished_at = ? WHERE id = ?", (now, scan_id))
            # Keep a short history of scans; the queue tables of finished ones are already empty.
            self.db.execute("DELETE FROM scans WHERE state IN ('done', 'replaced') AND id < ? - 1000", (scan_id,))
            if full:
                self.db.execute("UPDATE roots SET last_full_sync = ? WHERE id = ?", (now, root_id))
            self._add_counters({counter: 1})

    def active_scans(self) -> list[ActiveScan]:
        """Scans not finished, with the pid that runs (or ran) them."""
        return [
            ActiveScan(*r)
            for r in self.db.execute(
                "SELECT s.root_id, s.kind, s.state, s.done_files, s.queued_files, s.done_bytes, s.queued_bytes,"
                " s.started_at, s.pid FROM scans s WHERE s.state IN ('walking', 'hashing', 'deleting')"
            )
        ]

    def queue(self, scan_id: int, rows: Iterable[QueueRow]) -> None:
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO scan_queue VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                [
                    (scan_id, r.path, r.reason, r.entry_id, r.parent_id, r.stat.kind.value, r.stat.size,
                     r.stat.mtime_ns, r.stat.ctime_ns, r.stat.inode, r.stat.dev, r.stat.mode, r.stat.uid,
                     r.stat.gid, r.stat.nlink)
                    for r in rows
                ],
            )  # fmt: skip

    def mark_gone(self, scan_id: int, root_id: int, paths: Iterable[bytes]) -> None:
        """Mark index entries (and everything below them) as not found on disk by this scan."""
        with self.transaction():
            for path in paths:
                self.db.execute(
                    "INSERT OR IGNORE INTO scan_gone SELECT :s, id FROM entries"
                    f" WHERE root_id = :r AND {_under('path')}",
                    {"s": scan_id, "r": root_id, **_bounds(path)},
                )

    def mark_gone_below_gone(self, scan_id: int, root_id: int) -> None:
        """Mark gone every row whose folder is marked gone, level by level until none is new.

        The walk marked whole subtrees (mark_gone), so this finds only rows written since below
        a folder found gone. One probe of entries_by_parent per gone entry, per level."""
        with self.transaction():
            while True:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO scan_gone SELECT :s, e.id FROM scan_gone g"
                    " CROSS JOIN entries e INDEXED BY entries_by_parent ON e.root_id = :r AND e.parent_id = g.entry_id"
                    " WHERE g.scan_id = :s",
                    {"s": scan_id, "r": root_id},
                )
                if cur.rowcount <= 0:
                    return

    def match_renames_by_inode(self, scan_id: int) -> list[tuple[bytes, int, bytes]]:
        """Pairs (new path, gone entry id, its old path) with the same dev, inode and kind.

        The sources are the gone entries and also the *displaced* ones: an entry whose path
        now holds another inode (`mv b c; mv a b` leaves b on disk, so b's row is queued as
        changed content rather than gone). Without the second half, b's row is overwritten
        by a's and c arrives as a new entry: b's identity and feed history are lost and c
        is hashed again.

        A queued path whose own row already holds that inode is not a rename's arrival, only
        re-checked (racily clean, or its content changed): when one name of a hard-linked
        file is deleted, the other keeps its identity instead of taking the deleted one's.
        """
        # CROSS JOIN fixes the join order (SQLite's rule): from the few gone or displaced rows,
        # to their entry, to the queue by (scan_id, inode). Left to itself, the planner put
        # the whole queue outside and scanned the queue again inside it: quadratic, minutes
        # for a first index of 20k files. Ties on the new path go to the lowest entry id.
        rows = self.db.execute(
            """SELECT q.path, e.id, e.path, e.kind, e.size, e.mtime_ns, q.size, q.mtime_ns
               FROM scan_gone g CROSS JOIN entries e ON e.id = g.entry_id
               CROSS JOIN scan_queue q INDEXED BY scan_queue_by_inode
                    ON q.scan_id = g.scan_id AND q.inode = e.inode AND q.dev = e.dev
                    AND q.kind = e.kind
               WHERE g.scan_id = :s AND q.reason != 'metadata' AND NOT EXISTS (
                    SELECT 1 FROM entries cur WHERE cur.id = q.entry_id AND cur.inode = q.inode AND cur.dev = q.dev)
               UNION ALL
               SELECT q.path, e.id, e.path, e.kind, e.size, e.mtime_ns, q.size, q.mtime_ns
               FROM scan_queue c CROSS JOIN entries e ON e.id = c.entry_id AND e.inode != c.inode
               CROSS JOIN scan_queue q INDEXED BY scan_queue_by_inode
                    ON q.scan_id = c.scan_id AND q.inode = e.inode AND q.dev = e.dev
                    AND q.kind = e.kind AND q.path != c.path
               WHERE c.scan_id = :s AND c.reason = 'content' AND q.reason != 'metadata' AND NOT EXISTS (
                    SELECT 1 FROM entries cur WHERE cur.id = q.entry_id AND cur.inode = q.inode AND cur.dev = q.dev)
               ORDER BY 1, 2""",
            {"s": scan_id},
        ).fetchall()
        taken_new: set[bytes] = set()
        taken_old: set[int] = set()
        pairs = []
        for new_path, old_id, old_path, kind, old_size, old_mtime, size, mtime in rows:
            if new_path in taken_new or old_id in taken_old:
                continue  # hard links: one inode, several names; the first pair wins
            if kind == Kind.FILE.value and (old_size, old_mtime) != (size, mtime):
                continue
            taken_new.add(new_path)
            taken_old.add(old_id)
            pairs.append((new_path, old_id, old_path))
        with self.transaction():
            self.db.executemany(
                "UPDATE scan_queue SET renamed_from = ? WHERE scan_id = ? AND path = ?",
                [(old_id, scan_id, new_path) for new_path, old_id, _ in pairs],
            )
            self.db.executemany(
                "DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?",
                [(scan_id, old_id) for _, old_id, _ in pairs],
            )
        return pairs

    def queued(self, scan_id: int, chunk: int = 1000) -> Iterator[QueueRow]:
        """The queue in path order (a folder before what it holds), read in chunks."""
        after = b""
        first = True
        columns = "path, reason, entry_id, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode, uid, gid, nlink"
        while True:
            # Two statements, not one with "(? OR path > ?)": that form cannot seek to `after`,
            # so each page re-read the queue from its start (quadratic in the queue's length).
            rows = (
                self.db.execute(
                    f"SELECT {columns}, renamed_from FROM scan_queue WHERE scan_id = ? ORDER BY path LIMIT ?",
                    (scan_id, chunk),
                ).fetchall()
                if first
                else self.db.execute(
                    f"SELECT {columns}, renamed_from FROM scan_queue WHERE scan_id = ? AND path > ?"
                    " ORDER BY path LIMIT ?",
                    (scan_id, after, chunk),
                ).fetchall()
            )
            for r in rows:
                yield QueueRow(r[0], r[1], r[2], r[3], Stat(Kind(r[4]), *r[5:14]), r[14])
            if len(rows) < chunk:
                return
            first = False
            after = rows[-1][0]

    def queue_totals(self, scan_id: int, small: int) -> tuple[int, int, int]:
        """(entries, bytes to hash, files of at most ``small`` bytes to hash) still queued."""
        row = self.db.execute(
            "SELECT count(*), coalesce(sum(size) FILTER (WHERE hashed), 0),"
            " count(*) FILTER (WHERE hashed AND size <= ?)"
            " FROM (SELECT size, kind = 'file' AND reason != 'metadata' AND renamed_from IS NULL AS hashed"
            " FROM scan_queue WHERE scan_id = ?)",
            (small, scan_id),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def any_gone(self, scan_id: int) -> bool:
        """Whether the scan marked anything gone (step 2 only removes such marks, never adds)."""
        return self.db.execute("SELECT 1 FROM scan_gone WHERE scan_id = ? LIMIT 1", (scan_id,)).fetchone() is not None

    def gone_with_hash(self, scan_id: int, blake3: bytes, size: int, exclude: set[int]) -> tuple[int, bytes] | None:
        """A gone file with this content: the rename rule's last resort."""
        for entry_id, path in self.db.execute(
            "SELECT e.id, e.path FROM entries e INDEXED BY entries_dupes"
            " JOIN scan_gone g ON g.entry_id = e.id AND g.scan_id = ?"
            " WHERE e.blake3 = ? AND e.size = ? AND e.kind = 'file' AND e.blake3 IS NOT NULL"
            " AND e.corrupt_blake3 IS NULL ORDER BY e.path",
            (scan_id, blake3, size),
        ):
            if entry_id not in exclude:
                return int(entry_id), bytes(path)
        return None

    def gone(self, scan_id: int, chunk: int) -> list[tuple[int, bytes, Kind]]:
        """The next chunk of gone entries, deepest first so a folder goes after what it held."""
        rows = self.db.execute(
            "SELECT e.id, e.path, e.kind FROM scan_gone g JOIN entries e ON e.id = g.entry_id"
            " WHERE g.scan_id = ? ORDER BY e.path DESC LIMIT ?",
            (scan_id, chunk),
        ).fetchall()
        return [(r[0], r[1], Kind(r[2])) for r in rows]

    def rename_targets(self, scan_id: int) -> dict[int, bytes]:
        """The renames matched by inode so far: source entry id -> the queued path it moves to."""
        rows = self.db.execute(
            "SELECT renamed_from, path FROM scan_queue WHERE scan_id = ? AND renamed_from IS NOT NULL", (scan_id,)
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def queued_row(self, scan_id: int, path: bytes) -> QueueRow | None:
        """One row of a scan's queue, if it is still queued."""
        r = self.db.execute(
            "SELECT path, reason, entry_id, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode, uid, gid,"
            " nlink, renamed_from FROM scan_queue WHERE scan_id = ? AND path = ?",
            (scan_id, path),
        ).fetchone()
        return None if r is None else QueueRow(r[0], r[1], r[2], r[3], Stat(Kind(r[4]), *r[5:14]), r[14])

    def folder_state(self, root_id: int, path: bytes) -> FolderState | None:
        """A folder's id with its stored listing digest, read before its children (see `store_digests`)."""
        row = self.db.execute(
            "SELECT id, children_digest, children_gen FROM entries WHERE root_id = ? AND path = ? AND kind = 'dir'",
            (root_id, path),
        ).fetchone()
        return None if row is None else FolderState(row[0], row[1], row[2])

    def store_digests(self, digests: Iterable[tuple[bytes, int, int]]) -> None:
        """Store (digest, folder id, children_gen read before its children were compared).

        A child written since then moved children_gen, so its folder keeps no digest: a
        digest in the index always describes children rows that are still there as compared.
        """
        with self.transaction():
            self.db.executemany("UPDATE entries SET children_digest = ? WHERE id = ? AND children_gen = ?", digests)

    def id_of(self, root_id: int, path: bytes) -> int | None:
        row = self.db.execute("SELECT id FROM entries WHERE root_id = ? AND path = ?", (root_id, path)).fetchone()
        return None if row is None else int(row[0])

    def other_names(
        self, root_id: int, entry_ids: Sequence[int], *, unless_file: tuple[int, int] | None = None
    ) -> list[bytes]:
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
            (*entry_ids, root_id, *(unless_file or ())),
        ).fetchall()
        return [bytes(r[0]) for r in rows if not bytes(r[0]).startswith(b"\x00")]

    def stale_links(self, root_id: int, path: bytes, st: Stat) -> list[bytes]:
        """Other names of this file (hard links) whose row no longer matches its fresh stat."""
        rows = self.db.execute(
            "SELECT path, size, mtime_ns, ctime_ns, nlink, mode FROM entries"
            " WHERE inode = ? AND root_id = ? AND dev = ? AND kind = 'file' AND path != ?",
            (st.inode, root_id, st.dev, path),
        ).fetchall()
        fresh = (st.size, st.mtime_ns, st.ctime_ns, st.nlink, st.mode)
        return [bytes(r[0]) for r in rows if tuple(r[1:]) != fresh and not bytes(r[0]).startswith(b"\x00")]

    # --- writing -----------------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """Commit one batch in one transaction: rows, feed entries, queue progress, counters."""
        now = time.time()
        with self.transaction():
            seq = self.last_seq()
            next_id_row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
            next_id = (int(next_id_row[0]) if next_id_row else 0) + 1
            feed: list[tuple[int, int, int, str, str, bytes, bytes | None, float]] = []
            new_ids: dict[bytes, int] = {}

            for entry_id, path, kind in batch.deletes:
                seq += 1
                self.db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                if batch.scan_id is not None:
                    self.db.execute(
                        "DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?", (batch.scan_id, entry_id)
                    )
                feed.append((seq, entry_id, batch.root_id, Op.DELETED.value, kind.value, path, None, now))

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
                seq += 1
                if w.evict_id is not None or w.park_id is not None or w.entry_id is not None:
                    flush_inserts()
                if w.evict_id is not None:
                    row = self.db.execute("SELECT path, kind FROM entries WHERE id = ?", (w.evict_id,)).fetchone()
                    if row is not None and row[0] == w.path:
                        self.db.execute("DELETE FROM entries WHERE id = ?", (w.evict_id,))
                        feed.append((seq, w.evict_id, batch.root_id, Op.DELETED.value, row[1], row[0], None, now))
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
                if w.op is Op.RENAMED and batch.scan_id is not None:
                    self.db.execute(
                        "DELETE FROM scan_gone WHERE scan_id = ? AND entry_id = ?", (batch.scan_id, w.entry_id)
                    )
                parent_id = w.parent_id
                if parent_id is None:
                    parent_path = parent_of(w.path)
                    parent_id = (
                        0 if not parent_path else new_ids.get(parent_path) or self.id_of(batch.root_id, parent_path)
                    )
                    if parent_id is None:
                        flush_inserts()
                        parent_id = self.id_of(batch.root_id, parent_path)
                    if parent_id is None:
                        raise IndexError_(f"{self.path}: parent of {w.path!r} is not indexed")
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
                        (entry_id, batch.root_id, w.path, parent_id, *stat_values, w.blake3, w.racy, w.scheme,
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
                feed.append((seq, entry_id, batch.root_id, w.op.value, s.kind.value, w.path, w.old_path, now))

            flush_inserts()
            self.db.executemany(
                "UPDATE entries SET children_gen = children_gen + 1, children_digest = NULL WHERE id = ?",
                [(p,) for p in parents],
            )
            self.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", feed)
            if batch.scan_id is not None and batch.queue_done:
                self.db.executemany(
                    "DELETE FROM scan_queue WHERE scan_id = ? AND path = ?",
                    [(batch.scan_id, p) for p in batch.queue_done],
                )
            if batch.scan_id is not None and (batch.done_files or batch.done_bytes):
                self.db.execute(
                    "UPDATE scans SET done_files = done_files + ?, done_bytes = done_bytes + ?, state = 'hashing'"
                    " WHERE id = ?",
                    (batch.done_files, batch.done_bytes, batch.scan_id),
                )
            self.db.executemany(
                "INSERT OR REPLACE INTO errors VALUES (?, ?, ?, ?)",
                [(batch.root_id, p, e, now) for p, e in batch.errors.items()],
            )
            self.db.executemany(
                "DELETE FROM errors WHERE root_id = ? AND path = ?", [(batch.root_id, p) for p in batch.errors_cleared]
            )
            self._add_counters(batch.counters)

    def clear_errors_under(self, root_id: int, path: bytes) -> None:
        scope, params = _scope(path, None)
        with self.transaction():
            self.db.execute(f"DELETE FROM errors WHERE root_id = :r{scope}", {"r": root_id, **params})

    # --- the daemon's row --------------------------------------------------------------

    def daemon_row(self) -> tuple[int, float, str, str, float] | None:
        row = self.db.execute("SELECT pid, started_at, state, activity, updated_at FROM daemon").fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3], row[4])

    # --- library tools: dupes, verify, rebuild, metrics (issue 6) ----------------------
    # Appended as one section so the engine's methods above stay as they are.

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
            scope = " AND {t}root_id = :r" + (f" AND {_under('{t}path')}" if path else "")
            params.update({"r": root_id, **_bounds(path)})
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

    def corrupt_ids(self, root_id: int) -> set[int]:
        return {
            r[0]
            for r in self.db.execute(
                "SELECT id FROM entries WHERE root_id = ? AND corrupt_blake3 IS NOT NULL", (root_id,)
            )
        }

    def corrupt_count(self, root_id: int) -> int:
        row = self.db.execute(
            "SELECT count(*) FROM entries WHERE root_id = ? AND corrupt_blake3 IS NOT NULL", (root_id,)
        ).fetchone()
        return int(row[0])

    def corrupt_under(self, root_id: int, path: bytes) -> list[CorruptRow]:
        """Entries marked corrupt at or below a root-relative path, in path order."""
        scope, params = _scope(path, None)
        rows = self.db.execute(
            "SELECT id, path, size, mtime_ns, blake3, corrupt_blake3 FROM entries"
            f" WHERE root_id = :r AND corrupt_blake3 IS NOT NULL{scope} ORDER BY path",
            {"r": root_id, **params},
        ).fetchall()
        return [CorruptRow(*r) for r in rows]

    def error_count(self, root_id: int) -> int:
        return int(self.db.execute("SELECT count(*) FROM errors WHERE root_id = ?", (root_id,)).fetchone()[0])

    def files_after(self, root_id: int, path: bytes, after: bytes | None, limit: int) -> list[Entry]:
        """Hashed files at or below ``path`` whose path sorts after ``after``, in path order."""
        scope, params = _scope(path, after)
        rows = self.db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = :r AND kind = 'file' AND blake3 IS NOT NULL"
            f"{scope} ORDER BY path LIMIT :n",
            {"r": root_id, "n": limit, **params},
        ).fetchall()
        return [_entry(r) for r in rows]

    def file_totals_after(self, root_id: int, path: bytes, after: bytes | None) -> tuple[int, int]:
        """(files, bytes) that `files_after` would still return."""
        scope, params = _scope(path, after)
        row = self.db.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE root_id = :r AND kind = 'file'"
            f" AND blake3 IS NOT NULL{scope}",
            {"r": root_id, **params},
        ).fetchone()
        return int(row[0]), int(row[1])

    def set_corrupt(self, entry: Entry, seen: bytes | None) -> bool:
        """Mark (or, with None, unmark) an entry, only if its row is still the one verified."""
        s = entry.stat
        with self.transaction():
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
        with self.transaction():
            seq = self.last_seq() + 1
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

    def jobs(self, name: str) -> list[JobRow]:
        rows = self.db.execute(
            "SELECT name, root_id, scope, cursor, done_files, done_bytes, started_at, pid FROM jobs WHERE name = ?",
            (name,),
        ).fetchall()
        return [JobRow(*r) for r in rows]

    def save_job(self, job: JobRow, counters: dict[str, int] | None = None) -> None:
        """Persist a job's cursor (and the counters of the work it covers) in one transaction."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.name, job.root_id, job.scope, job.cursor, job.done_files, job.done_bytes, job.started_at,
                 time.time(), os.getpid()),
            )  # fmt: skip
            self._add_counters(counters or {})

    def end_job(self, name: str, root_id: int, scope: bytes) -> None:
        with self.transaction():
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
        return [(r[0], _entry(r[1:])) for r in rows]

    def store_rebuilt(self, rows: Sequence[Rebuilt], job: JobRow, counters: dict[str, int]) -> int:
        """Store re-derived fields of unchanged files, with the job's cursor, in one transaction.

        Neither ``seq`` nor the feed moves: the content is what consumers were already told.
        A row the scanner rewrote meanwhile (stat moved) is left alone. Returns rows stored.
        """
        stored = 0
        with self.transaction():
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
            self._add_counters(counters)
        return stored


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


def _describe(e: sqlite3.DatabaseError) -> str:
    text = str(e)
    if "file is not a database" in text:
        return "not an SQLite database (corrupt, or another kind of file)"
    if "unable to open" in text:
        return "cannot be opened (missing folder or permission denied)"
    if "readonly" in text:
        return "is read-only"
    return text


class AsyncIndex:
    """The daemon loop's own connection (aiosqlite): small writes that must never block the loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db: aiosqlite.Connection | None = None

    async def open(self) -> None:
        import aiosqlite  # here, not at the top: it imports asyncio, 20 ms of every CLI start

        self.db = await aiosqlite.connect(self.path, isolation_level=None, timeout=60)
        await self.db.execute("PRAGMA busy_timeout = 60000")
        # As for the scanner's connection: WAL with NORMAL syncs at checkpoints, not per write.
        await self.db.execute("PRAGMA synchronous = NORMAL")

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()
            self.db = None

    async def _write(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> None:
        assert self.db is not None
        await self.db.execute(sql, params)

    async def heartbeat(self, pid: int, started_at: float, state: str, activity: str) -> None:
        await self._write(
            "INSERT OR REPLACE INTO daemon VALUES (1, ?, ?, ?, ?, ?)", (pid, started_at, state, activity, time.time())
        )

    async def root_runtime(
        self, path: bytes, *, pending: int, observer: str, pending_since: float | None, pending_paths: str | None
    ) -> None:
        await self._write(
            "UPDATE roots SET pending = ?, observer = ?, pending_since = ?, pending_paths = ? WHERE path = ?",
            (pending, observer, pending_since, pending_paths, path),
        )

    async def count_overflows(self, path: bytes, n: int) -> None:
        await self._write("UPDATE roots SET overflows = overflows + ? WHERE path = ?", (n, path))

    async def add_counters(self, counters: dict[str, int]) -> None:
        assert self.db is not None
        await self.db.executemany(
            "INSERT INTO counters(name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in counters.items() if v],
        )
