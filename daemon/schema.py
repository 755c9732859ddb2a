"""The index's schema: every migration, by number, as data. `Index` runs them (index.py).

Each migration takes the database to its number in one transaction with its check; add, never
edit a released one. Numbers are kept once given: a database goes through those above its
version in order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

# Each migration takes the database to its number; add, never edit a released one.
MIGRATIONS: dict[int, str] = {
    1: """
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
    2: """
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
    3: """
    DROP INDEX IF EXISTS entries_by_hash;
    """,
    # 4: a folder's listing digest, so a sync skips comparing the children of a folder whose
    # listing matches the one last found equal to the index (docs/scanning.md, "Unchanged
    # folders"). children_gen counts writes to the folder's children, and every such write
    # clears the digest: a digest is stored only if no child changed since the walk read them.
    # Inserts do the same in `commit`, once per parent and batch: a trigger per inserted row
    # cost a first index of 100k files 0.6 s of 2 s of inserts.
    4: """
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
    5: """
    ALTER TABLE roots ADD COLUMN pending_since REAL;   -- wall-clock time its oldest pending event came
    ALTER TABLE roots ADD COLUMN pending_paths TEXT;   -- JSON list of the oldest pending paths (fsdecoded)
    """,
    # 6: the change feed as a contract (docs/feed.md): a random epoch made with the database, so
    # that a consumer's cursor from another database (rebuilt, repaired, restored) is told apart,
    # and how far retention has pruned, so that a cursor older than what is held is too.
    6: """
    CREATE TABLE feed(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        epoch TEXT NOT NULL,                       -- 16 hex digits
        pruned_through INTEGER NOT NULL DEFAULT 0  -- the highest seq retention removed (0: none)
    );
    INSERT INTO feed(id, epoch) VALUES (1, lower(hex(randomblob(8))));
    """,
    # 7: the volumes below each root, filesystems mounted inside it (docs/scanning.md, "Offline, not
    # deleted"): what identifies each one, so that a disk unmounted (its mount point now an empty
    # folder) or replaced by another is offline and nothing indexed below it is deleted. The
    # inodes of its top-level entries, the other half of its identity, are its rows in `entries`.
    # An index made before knew no volumes: every folder on another device than its parent is
    # recorded `unconfirmed`, so that a disk unplugged at the upgrade is not taken for emptied;
    # the next scan keeps those that are mount points and drops the rest (btrfs subvolumes).
    7: """
    CREATE TABLE volumes(
        root_id INTEGER NOT NULL,
        path BLOB NOT NULL,                  -- the mount point, relative to the root
        state TEXT NOT NULL,                 -- online | offline
        offline_reason TEXT,
        fs_type TEXT NOT NULL,               -- as mountinfo names it (ext4, nfs4, tmpfs, fuse.sshfs)
        source TEXT NOT NULL,                -- mountinfo's mount source: /dev/sdb1, server:/export
        fs_root BLOB NOT NULL,               -- the folder of the filesystem mounted there (b'/' unless a bind mount)
        fsid TEXT NOT NULL,                  -- statvfs f_fsid in hex, '' when the filesystem has none
        dev INTEGER NOT NULL,                -- st_dev of its top folder when last online
        changed_at REAL NOT NULL,            -- when its state last changed
        PRIMARY KEY(root_id, path)
    ) WITHOUT ROWID;
    INSERT INTO volumes
        SELECT c.root_id, c.path, 'unconfirmed', NULL, '', '', x'2f', '', c.dev, 0
        FROM entries c JOIN roots r ON r.id = c.root_id LEFT JOIN entries p ON p.id = c.parent_id
        WHERE c.kind = 'dir' AND c.dev != coalesce(p.dev, r.dev) AND substr(c.path, 1, 1) != x'00';
    """,
    # 8: where the daemon's replication to a fleet catalogue stands (docs/fleet.md), so that
    # `status` (another process) shows it, and retention keeps what the catalogue has not taken.
    8: """
    CREATE TABLE replication(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        url TEXT NOT NULL,            -- the catalogue, without its password
        box TEXT NOT NULL,            -- this box's name there
        epoch TEXT,                   -- the feed's epoch of what the catalogue holds (NULL: nothing yet)
        applied_seq INTEGER,          -- the last seq of that epoch it has taken
        last_ok REAL,                 -- when it last took a batch or confirmed it was up to date
        error TEXT,                   -- why the last attempt failed; NULL when it did not
        updated_at REAL NOT NULL
    );
    """,
    # 9: a new folder's listing digest as the walk found it, kept with the folder's queue row
    # until step 2 has written every child as walked; it is then stored as the folder's
    # children_digest, so that the first sync after a first index skips unchanged folders as
    # every later one does (docs/scanning.md, "Unchanged folders").
    9: """
    ALTER TABLE scan_queue ADD COLUMN listing BLOB;
    """,
}
SCHEMA_VERSION = max(MIGRATIONS)

# The content-hash index of migration 2, as a first index builds it once at its end rather than
# row by row (Index.defer_content_index): its key (size, BLAKE3) is random, so each insert
# dirtied a page of its own; 1.5-1.8 s of CPU of a 6.5-8.5 s first index of 100k small files.
CONTENT_INDEX = "entries_dupes"
CONTENT_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS entries_dupes ON entries(size, blake3)"
    " WHERE kind = 'file' AND blake3 IS NOT NULL AND corrupt_blake3 IS NULL"
)
# Numbered from 1 with none missing: the runner takes every number above a database's version,
# and a gap would be a migration skipped without a word.
if sorted(MIGRATIONS) != list(range(1, SCHEMA_VERSION + 1)):
    raise ImportError(f"daemon.schema: migrations {sorted(MIGRATIONS)} are not numbered 1..{SCHEMA_VERSION}")


def statements(script: str) -> Iterator[str]:
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
