"""The index database: the connection, its transactions and schema upgrades, the roots, reading
entries, the change feed, counters and errors. Every other user of the database builds on one
`Index`: the scan's journal (journal.py), the library tools (toolstore.py), the daemon's loop
(`AsyncIndex`).

Writes happen in explicit transactions (one per batch). Sequence numbers and entry ids are
assigned inside a ``BEGIN IMMEDIATE`` transaction, which holds SQLite's single write lock, so
readers only ever see whole batches and the change feed has no gaps.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiosqlite

from daemon.model import ENTRY_COLUMNS, Entry, Kind, Op, RootState, Stat, VolumeState, entry_of
from daemon.schema import CONTENT_INDEX, CONTENT_INDEX_SQL, MIGRATIONS, SCHEMA_VERSION, statements

CHECKPOINT_PAGES = 8192  # of 4 KiB: SQLite's default page size
# How long a connection waits for another one's write lock before failing: as long as systemd's
# WatchdogSec= (a daemon busy for longer is restarted anyway).
BUSY_TIMEOUT_S = 60
COUNTERS = ("files_hashed", "bytes_hashed", "scans_full", "scans_subtree", "scans_folder", "scans_file")
# Counters only ever grow: each commit adds what its batch did (the daemon's loop too, async).
COUNTERS_UPSERT = (
    "INSERT INTO counters(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value"
)


_UMASK_LOCK = threading.Lock()


class IndexError_(Exception):
    """The database cannot be used: the message names the file and the reason."""


# SQLite's primary result codes for a file that is not a sound database (https://sqlite.org/rescode.html):
# SQLITE_CORRUPT ("database disk image is malformed") and SQLITE_NOTADB ("file is not a database").
# An extended code (SQLITE_CORRUPT_INDEX, ...) carries its primary code in its low byte.
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
# What to do about it, said by every command that meets one (docs/repair.md).
REPAIR_ADVICE = "run `treewatch repair` (a daemon that starts on it repairs it by itself)"


class DamagedError(IndexError_):
    """The file is damaged, or not an SQLite database at all: `treewatch repair` and the daemon
    move it aside and build a new index from what can be salvaged (daemon/repair.py)."""

    def __init__(self, path: Path, said: str) -> None:
        super().__init__(f'{path}: the database is damaged (SQLite: "{said}"); {REPAIR_ADVICE}')
        self.path = path
        self.said = said  # SQLite's own words


def is_damage(e: BaseException) -> bool:
    """Whether an error says the database file is damaged (not busy, full, or read-only)."""
    if isinstance(e, DamagedError):
        return True
    return isinstance(e, sqlite3.DatabaseError) and (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (
        SQLITE_CORRUPT,
        SQLITE_NOTADB,
    )


def under_sql(column: str) -> str:
    """SQL for "column is :p or below it", with :lo and :hi from `subtree_bounds` (memcmp order).

    One range the index can seek, [p, hi), then the filter: written as "= :p OR the range
    [lo, hi)", SQLite searched the index by root_id alone and read every entry of the root,
    86 ms per deleted path on a 1M-entry index. The range also holds p's siblings whose
    names continue with a byte below '/' ("b.jpg", "b 2/..."): read and filtered out.
    """
    return f"({column} >= :p AND {column} < :hi AND ({column} = :p OR {column} >= :lo))"


def subtree_sql(path: bytes, after: bytes | None) -> tuple[str, dict[str, bytes]]:
    """SQL (" AND ...") and parameters for "at or below path (b"" is the whole root), after
    ``after``". Terms are left out rather than written as ``(:p = x'' OR ...)``: SQLite cannot
    seek an index through such an OR, and `verify` paging a 1M-entry root by ``path > :after``
    read it from its start for every page (81 ms a page at 800k; quadratic over the root)."""
    sql, params = "", {}
    if path:
        sql, params = f" AND {under_sql('path')}", subtree_bounds(path)
    if after is not None:
        sql, params = sql + " AND path > :after", {**params, "after": after}
    return sql, params


def subtree_bounds(path: bytes) -> dict[str, bytes]:
    # Everything below "a/b" sorts between "a/b/" and "a/b0": '0' is the byte after '/'.
    # Computed here, not with SQL's ||, which turns BLOBs into TEXT (and TEXT sorts before BLOB).
    return {"p": path, "lo": path + b"/", "hi": path + b"0"}


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
class VolumeRow:
    """A filesystem mounted below a root, as the index records it (schema 7)."""

    path: bytes  # the mount point, relative to the root
    state: VolumeState
    offline_reason: str | None
    fs_type: str
    source: str
    fs_root: bytes
    fsid: str
    dev: int
    changed_at: float


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


@dataclass(frozen=True, slots=True)
class ReplicationRow:
    """Where the daemon's replication to a fleet catalogue stands, as it last published it."""

    url: str  # without its password
    box: str
    epoch: str | None  # the feed's epoch of what the catalogue holds; None: nothing yet
    applied_seq: int | None
    last_ok: float | None
    error: str | None


def _connect(uri: str) -> sqlite3.Connection:
    db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
    return db


def sqlite_uri(path: Path | str, query: str) -> str:
    """``path`` as an SQLite URI filename with ``query``. Every byte of the path but letters,
    digits, ``/`` and ``_.-~`` is percent-encoded: SQLite reads ``?`` as the start of the
    parameters, ``#`` as the end of the path and ``%HH`` as an escape
    (https://sqlite.org/uri.html#the_uri_path), so a database below Synology's ``#recycle`` or a
    folder named ``50%25`` would otherwise open, or create, another file. An absolute path gets
    an empty authority (``file:///srv/…``): ``file://srv/…`` would name a host."""
    quoted = urllib.parse.quote(os.fsencode(path))
    return f"file://{quoted}?{query}" if quoted.startswith("/") else f"file:{quoted}?{query}"


def readonly_uri(path: Path) -> str:
    """A URI that reads ``path`` and writes nothing beside it. A read-only connection to a WAL
    database creates its -wal and -shm when they are missing, and cannot remove them when it
    closes; with no WAL there is no other connection and nothing to merge, and SQLite is told
    so (immutable=1: https://sqlite.org/uri.html#uriimmutable)."""
    if Path(str(path) + "-wal").exists():
        return sqlite_uri(path, "mode=ro")
    return sqlite_uri(path, "mode=ro&immutable=1")


def check_file(path: Path, *, thorough: bool = False) -> str | None:
    """None when SQLite finds the database sound, else what it found, in its words.

    quick_check reads every page and checks each B-tree's structure; integrity_check also
    matches every index against its table, which finds a stale page a lying disk cache left
    behind, at several times the cost (https://sqlite.org/pragma.html#pragma_integrity_check).
    Read-only, with no migration: nothing is written into a file that may be damaged."""
    try:
        db = _connect(readonly_uri(path))
        try:
            rows = db.execute("PRAGMA integrity_check" if thorough else "PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            return str(e)
        raise
    findings = [str(r[0]) for r in rows]
    if findings == ["ok"]:
        return None
    return "; ".join(findings[:3]) + (f" (and {len(findings) - 3} more)" if len(findings) > 3 else "")


class Index:
    """A connection to the index database. One per thread; cheap to open."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        try:  # Path.exists/is_dir raise on EACCES (a folder above that the user cannot enter)
            if readonly:
                if not path.exists():
                    raise IndexError_(f"{path}: no such database (run `treewatch scan` first)")
                uri = sqlite_uri(path, "mode=ro")
            else:
                if not path.parent.is_dir():
                    raise IndexError_(f"{path}: folder {path.parent} does not exist")
                if path.exists() and not os.access(path, os.R_OK | os.W_OK):
                    raise IndexError_(f"{path}: permission denied (the database must be readable and writable)")
                if not os.access(path.parent, os.W_OK | os.X_OK):
                    raise IndexError_(f"{path}: folder {path.parent} is not writable (SQLite needs it for its WAL)")
                uri = sqlite_uri(path, "mode=rwc")
        except OSError as e:
            raise IndexError_(f"{path}: cannot be reached: {e.strerror or e}") from None
        try:
            # The database is created without world bits: it lists every file of the library.
            # The umask is the process's: two connections opened at once in two threads (the
            # daemon's start) restored each other's 027 and left it for good, and every file the
            # process wrote afterwards lost its group and world bits.
            with _UMASK_LOCK:
                old_umask = os.umask(0o027)
                try:
                    self.db = _connect(uri)
                finally:
                    os.umask(old_umask)
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
                self._restore_content_index()
            else:
                version = self.db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise IndexError_(f"{path}: made by a newer treewatch (schema {version} > {SCHEMA_VERSION})")
                if version < SCHEMA_VERSION:
                    # An index from before an upgrade: migrate it once (needs write access), then read.
                    self.db.close()
                    Index(path).close()
                    self.db = _connect(uri)
        except sqlite3.DatabaseError as e:
            if hasattr(self, "db"):
                self.db.close()  # a failed open leaves no connection behind (nor its WAL)
            if is_damage(e):
                raise DamagedError(path, str(e)) from None
            raise IndexError_(f"{path}: {_describe(e)}") from None

    def close(self) -> None:
        self.db.close()

    # --- the content-hash index during a first index -------------------------------------

    def defer_content_index(self) -> bool:
        """Drop the content-hash index while nothing at all is indexed; True when dropped.

        A first index then inserts into three B-trees in near-sequential order instead of four,
        and `build_content_index` sorts the lot once at its end. Only an empty table: the index
        serves every root, and building it again over other roots' rows would cost more than
        it saves. Nothing in a first index reads it (nothing is gone, so no rename is matched
        by content); a reader meanwhile (`dupes`) scans instead, and a killed scan's index is
        built again by the next open that finds no scan running (`_restore_content_index`).
        """
        with self.transaction():
            if self.db.execute("SELECT 1 FROM entries LIMIT 1").fetchone() is not None:
                return False
            self.db.execute(f"DROP INDEX IF EXISTS {CONTENT_INDEX}")
            return True

    def build_content_index(self) -> None:
        with self.transaction():
            self.db.execute(CONTENT_INDEX_SQL)

    def _restore_content_index(self) -> None:
        """Build the content-hash index if a first index was killed before it could."""
        present = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (CONTENT_INDEX,)
        ).fetchone()
        if present is None:
            from daemon import fs  # only here: most opens find the index, and fs imports xattr

            if any(fs.pid_alive(s.pid) for s in self.active_scans()):
                return  # that scan builds it at its end
            self.build_content_index()

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
            for target in sorted(n for n in MIGRATIONS if n > version):
                for statement in statements(MIGRATIONS[target]):
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
        """A filesystem that came back with a new anonymous device number (NFS, btrfs, tmpfs).

        Only the rows on the root's own filesystem move: those of the volumes mounted below it
        keep theirs (each volume's check adopts its own, `move_volume_dev`)."""
        with self.transaction():
            row = self.db.execute("SELECT dev FROM roots WHERE id = ?", (root_id,)).fetchone()
            self.db.execute("UPDATE roots SET dev = ? WHERE id = ?", (dev, root_id))
            if row is not None and row[0] is not None:
                self.db.execute("UPDATE entries SET dev = ? WHERE root_id = ? AND dev = ?", (dev, root_id, row[0]))

    # --- volumes below a root ------------------------------------------------------------

    def volumes(self, root_id: int) -> list[VolumeRow]:
        rows = self.db.execute(
            "SELECT path, state, offline_reason, fs_type, source, fs_root, fsid, dev, changed_at FROM volumes"
            " WHERE root_id = ? ORDER BY path",
            (root_id,),
        ).fetchall()
        return [VolumeRow(r[0], VolumeState(r[1]), *r[2:]) for r in rows]

    def save_volumes(self, root_id: int, rows: Sequence[VolumeRow], dropped: Sequence[bytes] = ()) -> None:
        """Record volumes as now seen, and forget those no longer volumes (left out, excluded)."""
        with self.transaction():
            self.db.executemany(
                "INSERT OR REPLACE INTO volumes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(root_id, v.path, v.state.value, v.offline_reason, v.fs_type, v.source, v.fs_root, v.fsid, v.dev,
                  v.changed_at) for v in rows],
            )  # fmt: skip
            self.db.executemany("DELETE FROM volumes WHERE root_id = ? AND path = ?", [(root_id, p) for p in dropped])

    def move_volume_dev(self, root_id: int, path: bytes, old: int, new: int) -> None:
        """A volume back on a new device number (a loop device renumbered, an NFS remount): its
        rows take the new number before the walk compares them, so that nothing is re-hashed."""
        with self.transaction():
            self.db.execute(
                f"UPDATE entries SET dev = :new WHERE root_id = :r AND dev = :old AND {under_sql('path')}",
                {"new": new, "old": old, "r": root_id, **subtree_bounds(path)},
            )

    def volume_samples(self, root_id: int, path: bytes, limit: int = 16) -> list[tuple[bytes, Stat]]:
        """A few top-level entries of the volume mounted at ``path``, as indexed: its identity's
        second half (`rules.sample_matches`), as the root's own check samples the root's."""
        rows = self.db.execute(
            "SELECT c.path, c.kind, c.size, c.mtime_ns, c.ctime_ns, c.inode, c.dev, c.mode, c.uid, c.gid, c.nlink"
            " FROM entries c WHERE c.root_id = :r"
            " AND c.parent_id = (SELECT id FROM entries WHERE root_id = :r AND path = :p)"
            " ORDER BY c.path LIMIT :n",
            {"r": root_id, "p": path, "n": limit},
        ).fetchall()
        return [(r[0], Stat(Kind(r[1]), *r[2:])) for r in rows]

    def count_below(self, root_id: int, path: bytes) -> int:
        """Entries strictly below a root-relative folder (what a volume holds, for `status`)."""
        row = self.db.execute(
            "SELECT count(*) FROM entries WHERE root_id = :r AND path >= :lo AND path < :hi",
            {"r": root_id, **subtree_bounds(path)},
        ).fetchone()
        return int(row[0])

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
        return None if row is None else entry_of(row)

    def id_of(self, root_id: int, path: bytes) -> int | None:
        row = self.db.execute("SELECT id FROM entries WHERE root_id = ? AND path = ?", (root_id, path)).fetchone()
        return None if row is None else int(row[0])

    def entries_under(self, root_id: int, path: bytes) -> Iterator[Entry]:
        """Entries at or below a root-relative path (b"" is the whole root), in path order."""
        scope, params = subtree_sql(path, None)
        sql = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE root_id = :r{scope} ORDER BY path"
        for row in self.db.execute(sql, {"r": root_id, **params}):
            yield entry_of(row)

    def totals(self, root_id: int) -> tuple[int, int, int]:
        """(files, dirs, bytes of files) under a root."""
        row = self.db.execute(
            "SELECT count(*) FILTER (WHERE kind = 'file'), count(*) FILTER (WHERE kind = 'dir'),"
            " coalesce(sum(size) FILTER (WHERE kind = 'file'), 0) FROM entries WHERE root_id = ?",
            (root_id,),
        ).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

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

    # --- the change feed -----------------------------------------------------------------

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

    def feed_state(self) -> tuple[str, int, int]:
        """(epoch, the oldest seq still held, the last seq), read in one statement."""
        row = self.db.execute(
            "SELECT epoch, pruned_through + 1,"
            " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0) FROM feed"
        ).fetchone()
        return str(row[0]), int(row[1]), int(row[2])

    # --- errors, counters, scans in progress, the daemon ------------------------------------

    def errors(self, root_id: int, limit: int = 100) -> list[tuple[bytes, str]]:
        rows = self.db.execute(
            "SELECT path, error FROM errors WHERE root_id = ? ORDER BY at DESC LIMIT ?", (root_id, limit)
        ).fetchall()
        return [(r[0], r[1]) for r in rows]

    def error_count(self, root_id: int) -> int:
        return int(self.db.execute("SELECT count(*) FROM errors WHERE root_id = ?", (root_id,)).fetchone()[0])

    def counters(self) -> dict[str, int]:
        values = dict.fromkeys(COUNTERS, 0)
        values.update({name: int(v) for name, v in self.db.execute("SELECT name, value FROM counters")})
        return values

    def add_counters(self, counters: dict[str, int]) -> None:
        with self.transaction():
            self.add_counters_in(counters)

    def add_counters_in(self, counters: dict[str, int]) -> None:
        """Inside a transaction the caller holds: with the rows the counts describe."""
        self.db.executemany(COUNTERS_UPSERT, [(k, v) for k, v in counters.items() if v])

    def interrupted_scan(self, root_id: int) -> tuple[str, str, int, int] | None:
        """(kind, scopes, files done, files queued) of a scan that did not finish."""
        row = self.db.execute(
            "SELECT kind, scopes, done_files, queued_files FROM scans"
            " WHERE root_id = ? AND state NOT IN ('done', 'replaced') ORDER BY id DESC LIMIT 1",
            (root_id,),
        ).fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3])

    def active_scans(self) -> list[ActiveScan]:
        """Scans not finished, with the pid that runs (or ran) them."""
        return [
            ActiveScan(*r)
            for r in self.db.execute(
                "SELECT s.root_id, s.kind, s.state, s.done_files, s.queued_files, s.done_bytes, s.queued_bytes,"
                " s.started_at, s.pid FROM scans s WHERE s.state IN ('walking', 'hashing', 'deleting')"
            )
        ]

    def daemon_row(self) -> tuple[int, float, str, str, float] | None:
        row = self.db.execute("SELECT pid, started_at, state, activity, updated_at FROM daemon").fetchone()
        return None if row is None else (row[0], row[1], row[2], row[3], row[4])

    def replication(self) -> ReplicationRow | None:
        row = self.db.execute("SELECT url, box, epoch, applied_seq, last_ok, error FROM replication").fetchone()
        return None if row is None else ReplicationRow(*row)


def _describe(e: sqlite3.DatabaseError) -> str:
    text = str(e)
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

        self.db = await aiosqlite.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        await self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
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
        await self.db.executemany(COUNTERS_UPSERT, [(k, v) for k, v in counters.items() if v])

    async def set_replication(self, row: ReplicationRow | None) -> None:
        """Publish where replication stands (None: the daemon does not replicate)."""
        if row is None:
            await self._write("DELETE FROM replication", ())
            return
        await self._write(
            "INSERT OR REPLACE INTO replication VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
            (row.url, row.box, row.epoch, row.applied_seq, row.last_ok, row.error, time.time()),
        )
