"""Repair: a damaged index set aside, and a new one built from what could be salvaged.

The steps (docs/repair.md): salvage what SQLite can still read (salvage.py) into a scratch
file; build a new index beside the damaged one from it; then move the damaged file, with its
-wal and -shm, aside as ``index.db.damaged-YYYYMMDDTHHMMSS`` and put the new one in its place.
The damaged file is never deleted, and until the new index is complete nothing is moved: a
repair that fails (a full disk) leaves the files as they were, for the next attempt.

The new index holds every salvaged entry that is sound, each as an `added` row of the new
feed epoch (replaying the feed from seq 0 gives the entries), with no listing digest, so the
first sync compares every folder row by row and re-reads only the files whose size, mtime or
inode no longer match. A folder whose row was lost is made again, as a row that matches
nothing on disk: the sync refreshes it (reading its xattrs) and compares what it holds,
instead of re-hashing a whole subtree because one row of it broke.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.index import Index, IndexError_, sqlite_uri
from daemon.model import Kind, Op, parent_of
from daemon.salvage import TABLES, VOUCHED, SalvageError, salvage

# The files SQLite keeps beside a database, moved aside with it: its WAL, the WAL's index and
# a rollback journal (https://sqlite.org/tempfiles.html).
SIDECARS = ("-wal", "-shm", "-journal")
# Rows written per statement while the new index is built.
CHUNK = 5000
_KINDS = {k.value for k in Kind}
_DIGEST = 32  # bytes of a BLAKE3 digest


class RepairError(Exception):
    """The repair could not be completed; the damaged database is still in its place."""


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What a repair did, for `treewatch repair` and the daemon's journal entry."""

    database: Path
    damaged: Path  # where the damaged file now is (kept, never deleted)
    moved: tuple[Path, ...]  # its -wal, -shm, -journal, moved with it
    method: str  # how the salvage read it (salvage.Salvage.method)
    roots: int
    entries: int  # rows of the new index: salvaged ones and the folders made again
    hashed: int  # files whose content hash was salvaged: the sync does not read them again if unchanged
    unvouched: int  # files whose salvaged hash the damaged file's index did not vouch for: re-read
    folders_made: int  # folders whose own row was lost, made again for the rows below them
    dropped: int  # salvaged rows that were not sound (garbage from a broken page, a duplicate)
    seconds: float

    def fields(self) -> dict[str, Any]:
        """The report as log fields (TREEWATCH_* in the journal)."""
        return {
            "database": str(self.database), "damaged": str(self.damaged),
            "moved": " ".join(str(p) for p in self.moved), "method": self.method, "roots": self.roots,
            "entries": self.entries, "hashed": self.hashed, "unvouched": self.unvouched,
            "folders_made": self.folders_made,
            "dropped": self.dropped, "seconds": round(self.seconds, 3),
        }  # fmt: skip


def repair(database: Path, damage: str) -> RepairReport:
    """Salvage ``database`` into a new index and set the damaged file aside. Every connection
    to it must be closed first: SQLite's own advice is never to rename a database in use
    (https://sqlite.org/howtocorrupt.html, 2.4), and a connection's close deletes the WAL by
    its name, which would by then be the new database's."""
    started = time.monotonic()
    scratch = _sibling(database, ".salvage")
    fresh = _sibling(database, ".repair")
    for leftover in (scratch, fresh):  # from an attempt that did not finish: ours to remove
        _remove(leftover)
    try:
        salvaged = salvage(database, scratch)
        built = _build(scratch, fresh, owner=_owner(database))
    except (SalvageError, IndexError_, sqlite3.Error, OSError) as e:
        _remove(fresh)
        raise RepairError(f"{database}: cannot repair ({damage}): {e}") from None
    finally:
        _remove(scratch)
    try:
        damaged, moved = _set_aside(database)
        os.replace(fresh, database)
        _sync_folder(database.parent)
    except OSError as e:
        raise RepairError(f"{database}: the new index is at {fresh}, but cannot be put in place: {e}") from None
    return RepairReport(database, damaged, moved, salvaged.method, built.roots, built.entries, built.hashed,
                        built.unvouched, built.folders_made, built.dropped, time.monotonic() - started)  # fmt: skip


def _sibling(database: Path, suffix: str) -> Path:
    return database.with_name(database.name + suffix)


def _owner(database: Path) -> tuple[int, int, int] | None:
    """(uid, gid, mode) of the damaged file, which the new one takes: an administrator's
    `treewatch repair` as root must not leave the service's user an index it cannot write."""
    try:
        st = os.stat(database)
    except OSError:
        return None
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


@dataclass(slots=True)
class _Counts:
    roots: int = 0
    entries: int = 0
    hashed: int = 0
    unvouched: int = 0
    folders_made: int = 0
    dropped: int = 0


def _build(scratch: Path, fresh: Path, *, owner: tuple[int, int, int] | None) -> _Counts:
    """A new index at ``fresh`` from the salvage, and what it holds."""
    index = Index(fresh)  # the schema, and a new feed epoch (schema 6)
    try:
        counts = _Counts()
        db = index.db
        db.execute("ATTACH DATABASE ? AS salvage", (sqlite_uri(scratch, "mode=ro"),))
        with index.transaction():
            writer = _Writer(db, time.time())
            seen_roots: set[bytes] = set()
            for old_id, path, dev in db.execute("SELECT id, path, dev FROM salvage.roots ORDER BY id").fetchall():
                if not _sound_root(path, dev) or path in seen_roots:
                    counts.dropped += 1
                    continue
                seen_roots.add(path)
                root_id = int(db.execute("INSERT INTO roots(path, dev) VALUES (?, ?)", (path, dev)).lastrowid or 0)
                counts.roots += 1
                _build_root(db, writer, old_id, root_id, counts)
            writer.flush()
        db.execute("DETACH DATABASE salvage")
        # Everything into the database file itself, and the WAL gone with the close: the file
        # that is renamed into place is the whole index.
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        index.close()
    if owner is not None:
        st = os.stat(fresh)
        if (st.st_uid, st.st_gid) != owner[:2]:
            # Only when they differ: the unit's SystemCallFilter (~@privileged) refuses chown
            # even to the owner a file already has, and the daemon owns what it repairs.
            os.chown(fresh, owner[0], owner[1])
        os.chmod(fresh, owner[2])
    with open(fresh, "rb") as f:
        os.fsync(f.fileno())
    return counts


def _build_root(db: sqlite3.Connection, writer: _Writer, old_id: int, root_id: int, counts: _Counts) -> None:
    """The salvaged entries of one root, in path order: a folder comes before what it holds."""
    columns = TABLES["entries"] + VOUCHED
    rows = db.execute(
        f"SELECT {', '.join(columns)} FROM salvage.entries WHERE root_id = ? ORDER BY path, seq DESC", (old_id,)
    )
    folders: dict[bytes, int] = {}  # folder path -> its new id
    last: bytes | None = None
    for raw in rows:
        row = _decoded(dict(zip(columns, raw, strict=True)))
        path = row["path"]
        if not _sound_entry(row) or path == last or row["path_vouched"] == 0:
            counts.dropped += 1  # garbage read from a broken page, or an older copy of a row
            continue
        if not _trust(row):
            counts.unvouched += 1
        last = path
        parent = parent_of(path)
        if parent and parent not in folders and not _make_folders(db, writer, root_id, parent, folders, counts):
            counts.dropped += 1  # below an entry that is not a folder: stale, the sync finds it if it is there
            continue
        entry_id = writer.add(root_id, folders.get(parent, 0), row)
        counts.entries += 1
        if row["kind"] == Kind.DIR.value:
            folders[path] = entry_id
        elif row["kind"] == Kind.FILE.value and row["blake3"] is not None and not row["racy"]:
            counts.hashed += 1


def _make_folders(
    db: sqlite3.Connection, writer: _Writer, root_id: int, path: bytes, folders: dict[bytes, int], counts: _Counts
) -> bool:
    """Make the folder rows from the root down to ``path`` that the salvage lost; False when one
    of them is held by an entry that is not a folder."""
    missing: list[bytes] = []
    at = path
    while at and at not in folders:
        missing.append(at)
        at = parent_of(at)
    for folder in reversed(missing):
        writer.flush()  # so that a row written for this path is seen
        held = db.execute("SELECT kind FROM entries WHERE root_id = ? AND path = ?", (root_id, folder)).fetchone()
        if held is not None:
            return False  # sorted before its children, so not a folder (folders are in `folders`)
        parent = parent_of(folder)
        # Nothing of it is known: a row equal to no stat on disk, so the first sync refreshes
        # it (kind folder: metadata, not "replaced") and compares every row below it.
        placeholder = dict.fromkeys(TABLES["entries"] + VOUCHED, 0) | {
            "path": folder, "kind": Kind.DIR.value, "blake3": None, "target": None, "xattrs": None,
            "corrupt_blake3": None,
        }  # fmt: skip
        folders[folder] = writer.add(root_id, folders.get(parent, 0), placeholder)
        counts.entries += 1
        counts.folders_made += 1
    return True


class _Writer:
    """The new index's rows, written in chunks: each entry with its `added` row in the feed,
    ids and seqs counted from 1 (the new database's AUTOINCREMENT follows them)."""

    def __init__(self, db: sqlite3.Connection, now: float) -> None:
        self.db = db
        self.now = now
        self.next_id = 1
        self.entries: list[tuple[Any, ...]] = []
        self.changes: list[tuple[Any, ...]] = []

    def add(self, root_id: int, parent_id: int, row: dict[str, Any]) -> int:
        entry_id = seq = self.next_id
        self.next_id += 1
        self.entries.append(
            (entry_id, root_id, row["path"], parent_id, row["kind"], row["size"], row["mtime_ns"], row["ctime_ns"],
             row["inode"], row["dev"], row["mode"], row["uid"], row["gid"], row["nlink"], row["blake3"],
             1 if row["racy"] else 0, row["scheme"] or 0, row["target"], row["xattrs"], seq, row["corrupt_blake3"])
        )  # fmt: skip
        self.changes.append((seq, entry_id, root_id, Op.ADDED.value, row["kind"], row["path"], None, self.now))
        if len(self.entries) >= CHUNK:
            self.flush()
        return entry_id

    def flush(self) -> None:
        self.db.executemany(
            "INSERT INTO entries(id, root_id, path, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode,"
            " uid, gid, nlink, blake3, racy, scheme, target, xattrs, seq, corrupt_blake3)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            self.entries,
        )
        self.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", self.changes)
        self.entries.clear()
        self.changes.clear()


def _sound_root(path: object, dev: object) -> bool:
    return isinstance(path, bytes) and path.startswith(b"/") and b"\0" not in path and _int_or_none(dev)


def _sound_entry(row: dict[str, Any]) -> bool:
    """Whether a salvaged row is one the index could have written: a page read in part can
    yield values of the wrong type or shape, and such a row is not worth keeping."""
    path = row["path"]
    if not isinstance(path, bytes) or not path or b"\0" in path:
        return False  # also a row a scan had parked (its path starts with a NUL byte)
    if path.startswith(b"/") or path.endswith(b"/") or any(p in (b"", b".", b"..") for p in path.split(b"/")):
        return False
    if row["kind"] not in _KINDS:
        return False
    ints = ("size", "mtime_ns", "ctime_ns", "inode", "dev", "mode", "uid", "gid", "nlink")
    if not all(isinstance(row[c], int) and not isinstance(row[c], bool) for c in ints):
        return False
    if not all(_int_or_none(row[c]) for c in ("racy", "scheme", "seq")):
        return False
    for digest in ("blake3", "corrupt_blake3"):
        if row[digest] is not None and not (isinstance(row[digest], bytes) and len(row[digest]) == _DIGEST):
            return False
    return (row["target"] is None or isinstance(row["target"], bytes)) and (
        row["xattrs"] is None or isinstance(row["xattrs"], str)
    )


def _trust(row: dict[str, Any]) -> bool:
    """Keep of a salvaged row only what the first sync can check or what is vouched for: False
    when its content hash is not vouched for (the sync hashes the file again).

    What the sync trusts without reading the disk is the hash (see salvage._vouch), a symlink's
    target and the xattrs. A target cannot be vouched for, but reading it again costs one
    readlink: a zero mtime makes the sync do it. xattrs that are not the JSON object the index
    writes are garbage: a zero ctime makes the sync read them again (a metadata refresh)."""
    if row["kind"] == Kind.SYMLINK.value:
        row["mtime_ns"] = 0
    if row["xattrs"] is not None and not _xattrs_sound(row["xattrs"]):
        row["xattrs"], row["ctime_ns"] = None, 0
    if row["kind"] == Kind.FILE.value and row["blake3"] is not None and row["hash_vouched"] != 1:
        # Kept, but racily clean: the sync hashes the file before trusting it; the feed says
        # nothing when the content and the lstat are what the row said (the index page was the
        # broken one), `metadata` when only the lstat differs, `modified` when the hash was garbage.
        row["racy"] = 1
        return False
    return True


def _xattrs_sound(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """The salvage keeps text as bytes (salvage._open_damaged): `kind` and `xattrs` as the
    index wrote them, UTF-8 (a value that is not stays bytes, and the row is not sound)."""
    for column in ("kind", "xattrs"):
        value = row[column]
        if isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                row[column] = value.decode("utf-8")
    return row


def _int_or_none(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _set_aside(database: Path) -> tuple[Path, tuple[Path, ...]]:
    """Move the damaged file and its sidecars to ``NAME.damaged-YYYYMMDDTHHMMSS[-N]``.

    The sidecars go first: a WAL left behind under the database's name would be read as the
    new database's own and replayed into it. A stop between the two leaves the damaged file
    in place without its WAL: the next repair salvages what the file alone holds."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    damaged = _sibling(database, f".damaged-{stamp}")
    n = 1
    while any(Path(str(damaged) + s).exists() for s in ("", *SIDECARS)):
        damaged = _sibling(database, f".damaged-{stamp}-{n}")
        n += 1
    moved: list[Path] = []
    for suffix in SIDECARS:
        side = Path(str(database) + suffix)
        if side.exists():
            os.replace(side, str(damaged) + suffix)
            moved.append(Path(str(damaged) + suffix))
    if database.exists():
        os.replace(database, damaged)
    return damaged, tuple(moved)


def _sync_folder(folder: Path) -> None:
    """The renames reach the disk (a power cut is what brought us here)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    for suffix in ("", *SIDECARS):
        Path(str(path) + suffix).unlink(missing_ok=True)
