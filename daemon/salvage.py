"""Salvage: the rows a damaged index still holds, copied into a scratch database.

SQLite's own tool for this is the command line's `.recover` (https://sqlite.org/recovery.html):
it reads every page of the file, keeps the intact ones of every table and writes them out as
SQL. It reads pages through the `sqlite_dbpage` virtual table, which exists only in a library
compiled with SQLITE_ENABLE_DBPAGE_VTAB; Debian 12's libsqlite3 (3.40.1) is not, and there
`sqlite3 FILE .recover` stops at "no such table: sqlite_dbpage" (Ubuntu 24.04's 3.45.1 too).

So the salvage takes `.recover` where the installed `sqlite3` has it, and otherwise reads the
tables it needs through SQLite's own B-tree code: each table in rowid order, and where a read
meets a page it cannot use, the next rowid it *can* seek to is found (doubling steps, then a
bisection) and the read goes on from there. What is lost is what the broken pages held: the
rows of a broken leaf, or those below a broken interior page. Indexes are never read (the new
database builds its own), so damage to them costs nothing. What neither way reads is a file
whose first page (the schema) is gone: then nothing is salvaged and the sync re-reads all.

Only what the new index is built from is salvaged: the roots and the entries. The change feed
starts a new epoch, and scans, errors, counters and the tools' cursors start again (docs/repair.md).
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from daemon.index import is_damage, readonly_uri

# The columns each salvaged table keeps, in the scratch database's order. `seq` tells two rows
# of one path apart (a lying cache can leave an older copy of a page); the rest is the entry.
TABLES: dict[str, tuple[str, ...]] = {
    "roots": ("id", "path", "dev"),
    "entries": (
        "id", "root_id", "path", "kind", "size", "mtime_ns", "ctime_ns", "inode", "dev", "mode", "uid", "gid",
        "nlink", "blake3", "racy", "scheme", "target", "xattrs", "corrupt_blake3", "seq",
    ),
}  # fmt: skip
# What the damaged file's own indexes say of each salvaged entry (see `_vouch`): 1 yes, 0 no,
# NULL when the index could not be read. Appended to the entries' columns in the scratch.
VOUCHED = ("hash_vouched", "path_vouched")
MAX_ROWID = 2**63 - 1
MIN_ROWID = -(2**63)
# How long the `sqlite3` command line may take to recover a file (a 1M-entry index: seconds).
RECOVER_TIMEOUT_S = 3600
SQLITE3 = "sqlite3"


@dataclass(frozen=True, slots=True)
class Salvage:
    """What a salvage read: the way it read it and how many rows of each table it kept."""

    method: str  # "recover" (the sqlite3 command line) or "btree" (SQLite's reads, stepping over damage)
    roots: int
    entries: int


class SalvageError(Exception):
    """The scratch database could not be written (disk full, permissions): the message says why."""


def salvage(damaged: Path, scratch: Path) -> Salvage:
    """Copy what can be read of ``damaged`` into a new database at ``scratch``, whose tables are
    TABLES. ``damaged`` is opened read-only and left as it is."""
    source, method = damaged, "btree"
    recovered = scratch.with_name(scratch.name + "-recovered")
    try:
        if recover_available():
            _remove(recovered)
            try:
                _recover(damaged, recovered)
                source, method = recovered, "recover"  # a sound database, read whole below
            except (OSError, subprocess.SubprocessError):
                _remove(recovered)  # `.recover` failed on this file: SQLite's reads may still get rows
        _copy_tables(source, scratch, damaged)
    finally:
        _remove(recovered)
    try:
        db = sqlite3.connect(scratch)
        try:
            counts = {t: int(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in TABLES}
        finally:
            db.close()
    except sqlite3.Error as e:
        raise SalvageError(f"{scratch}: cannot read the salvage back: {e}") from None
    return Salvage(method, counts["roots"], counts["entries"])


_AVAILABLE: list[bool] = []


def recover_available() -> bool:
    """Whether the `sqlite3` command line here can run `.recover` (it has `sqlite_dbpage`)."""
    if not _AVAILABLE:
        ok = False
        if shutil.which(SQLITE3) is not None:
            try:
                probe = subprocess.run([SQLITE3, ":memory:", "SELECT count(*) FROM sqlite_dbpage"],
                                       capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
                ok = probe.returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
        _AVAILABLE.append(ok)
    return _AVAILABLE[0]


def _recover(damaged: Path, recovered: Path) -> None:
    """`sqlite3 -readonly DAMAGED .recover | sqlite3 RECOVERED`, streamed: the SQL of a large
    index is never held in memory. Statements the second one rejects (a row of `lost_and_found`
    with too few values) are its own business; what it accepted is in the recovered database.
    Rows `.recover` could not place in their table (in `lost_and_found`) are not used."""
    with subprocess.Popen([SQLITE3, "-readonly", str(damaged), ".recover"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as reader:  # fmt: skip
        assert reader.stdout is not None
        writer = subprocess.run([SQLITE3, str(recovered)], stdin=reader.stdout, capture_output=True, text=True,
                                timeout=RECOVER_TIMEOUT_S, check=False)  # fmt: skip
        reader.stdout.close()
        _, err = reader.communicate(timeout=RECOVER_TIMEOUT_S)
    if reader.returncode != 0:
        raise subprocess.SubprocessError(f".recover failed: {err.decode(errors='replace').strip()}")
    if "database or disk is full" in writer.stderr:
        raise SalvageError(f"{recovered}: cannot write the salvage: the disk is full")


def _copy_tables(source: Path, scratch: Path, damaged: Path) -> None:
    """TABLES from ``source`` (the damaged file, or what `.recover` made of it) into ``scratch``,
    each entry with what ``damaged``'s indexes say of it."""
    try:
        out = sqlite3.connect(scratch, isolation_level=None)
    except sqlite3.Error as e:
        raise SalvageError(f"{scratch}: cannot create the salvage: {e}") from None
    try:
        # No WAL, no syncs: a scratch file, removed once the new index is built.
        out.execute("PRAGMA journal_mode = OFF")
        out.execute("PRAGMA synchronous = OFF")
        out.execute(f"CREATE TABLE roots({', '.join(TABLES['roots'])})")
        out.execute(f"CREATE TABLE entries({', '.join(TABLES['entries'] + VOUCHED)})")
        reader = _open_damaged(source)
        witness = reader if source == damaged else _open_damaged(damaged)
        if reader is None:
            return
        try:
            for table, columns in TABLES.items():
                held = _columns(reader, table)
                if not held:
                    continue
                # A column an older schema did not have yet is NULL.
                chosen = [c if c in held else "NULL" for c in columns]
                rows = readable_rows(reader, table, chosen)
                width = len(columns)
                if table == "entries":
                    rows = (row + _vouch(witness, TABLES["entries"], row) for row in rows)
                    width += len(VOUCHED)
                out.execute("BEGIN")
                out.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * width)})", rows)
                out.execute("COMMIT")
        finally:
            reader.close()
            if witness is not None and witness is not reader:
                witness.close()
    except sqlite3.OperationalError as e:  # the scratch's own disk: full, or gone
        raise SalvageError(f"{scratch}: cannot write the salvage: {e}") from None
    finally:
        out.close()


def _vouch(db: sqlite3.Connection | None, columns: tuple[str, ...], row: tuple[object, ...]) -> tuple[int | None, ...]:
    """Whether the damaged file's indexes hold this row's content hash and its path.

    A page overwritten from its middle on is read without an error when the cut falls inside
    a row's values: the row's first columns are its own, the rest garbage of the right length
    (a salvaged hash once matched the file's in its first 15 bytes only). The hash is what the
    first sync trusts without reading the file, so it is kept only when the index
    `entries_dupes` (size, blake3), another B-tree on other pages, holds it for this rowid.
    A path that entries_by_path positively does not hold is garbage as well."""
    if db is None:
        return None, None
    value = dict(zip(columns, row, strict=True))
    hashed = None
    if value["kind"] == b"file" and isinstance(value["blake3"], bytes):
        if value["corrupt_blake3"] is None:
            hashed = _holds(db, "entries_dupes", "kind = 'file' AND blake3 IS NOT NULL AND corrupt_blake3 IS NULL"
                            " AND size = ? AND blake3 = ?", (value["size"], value["blake3"], value["id"]))  # fmt: skip
        else:  # marked by `verify`: its index holds only the path
            hashed = _holds(db, "entries_corrupt", "corrupt_blake3 IS NOT NULL AND root_id = ? AND path = ?",
                            (value["root_id"], value["path"], value["id"]))  # fmt: skip
    pathed = _holds(db, "entries_by_path", "root_id = ? AND path = ?", (value["root_id"], value["path"], value["id"]))
    return hashed, pathed


def _holds(db: sqlite3.Connection, index: str, where: str, params: tuple[object, ...]) -> int | None:
    """1 when ``index`` holds the entry (its key and rowid), 0 when it does not, None when the
    index cannot be read (broken, or older than the schema that made it)."""
    try:
        sql = f"SELECT 1 FROM entries INDEXED BY {index} WHERE {where} AND rowid = ?"
        return int(db.execute(sql, params).fetchone() is not None)
    except sqlite3.DatabaseError as e:
        if is_damage(e) or isinstance(e, sqlite3.OperationalError):
            return None
        raise


def _open_damaged(damaged: Path) -> sqlite3.Connection | None:
    try:
        # Read-only: nothing is written into the damaged file, nor its WAL checkpointed.
        db = sqlite3.connect(readonly_uri(damaged), uri=True, isolation_level=None)
        # Check each cell's size against its page as it is read: a page half overwritten is
        # found broken instead of yielding rows of garbage (https://sqlite.org/pragma.html#pragma_cell_size_check).
        db.execute("PRAGMA cell_size_check = ON")
        db.execute("PRAGMA query_only = ON")
        # Text as the bytes stored: a broken page yields text that is not UTF-8, which Python
        # cannot decode. The scratch keeps the bytes; the new index's builder decides.
        db.text_factory = bytes
        return db
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            return None
        raise


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The table's columns as its schema says; none when even the schema cannot be read."""
    try:
        names = (r[1] for r in db.execute(f"PRAGMA table_info({table})"))
        return {n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names}
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            return set()
        raise


def readable_rows(db: sqlite3.Connection, table: str, columns: list[str]) -> Iterator[tuple[object, ...]]:
    """Every row of ``table`` that can be read, in rowid order, stepping over broken pages."""
    select = f"SELECT rowid, {', '.join(columns)} FROM {table} WHERE rowid >= ? ORDER BY rowid"
    at = MIN_ROWID
    while True:
        try:
            for row in db.execute(select, (at,)):
                yield row[1:]
                if row[0] >= MAX_ROWID:
                    return
                at = row[0] + 1
            return
        except sqlite3.DatabaseError as e:
            if not is_damage(e):
                raise
            after = _next_readable(db, table, at)
            if after is None:
                return
            at = after


def _readable(db: sqlite3.Connection, table: str, at: int) -> bool:
    """Whether a seek to the first rowid at or after ``at`` reaches a page that can be read."""
    try:
        db.execute(f"SELECT rowid FROM {table} WHERE rowid >= ? ORDER BY rowid LIMIT 1", (at,)).fetchall()
        return True
    except sqlite3.DatabaseError as e:
        if is_damage(e):
            return False
        raise


def _next_readable(db: sqlite3.Connection, table: str, at: int) -> int | None:
    """The first rowid after ``at`` from which the table reads again, None when none does.

    A seek for rowid r reads the pages on the way to the leaf that would hold r: it fails for
    every r in the range a broken page covers, and succeeds from the first r past it. Doubling
    steps find a readable r, then a bisection finds the first one; a few dozen seeks per broken
    page, whatever the table's size."""
    step = 1
    while not _readable(db, table, at + step):
        if at + step >= MAX_ROWID:
            return None
        step = min(step * 2, MAX_ROWID - at)
    bad, good = at + step // 2 if step > 1 else at, at + step
    while good - bad > 1:
        middle = (bad + good) // 2
        if _readable(db, table, middle):
            good = middle
        else:
            bad = middle
    return good


def _remove(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
