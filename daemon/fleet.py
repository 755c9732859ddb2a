"""The fleet's questions, asked of the catalogue: every box's entries, the copies of a content
across boxes (and what exists on one box only), what changed anywhere since a time, and where
each box's replication stands. Values come out JSON-ready, as the box's own commands show them.

Only the current load of each box is read (the join on `boxes.load_id`): a snapshot being
loaded beside it is invisible until its transaction makes it current.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from daemon.catalogue import ENTRY_COLUMNS
from daemon.index import subtree_bounds
from daemon.model import is_within, join

if TYPE_CHECKING:
    import psycopg

# Rows fetched per round trip by the server-side cursors that stream a listing.
FETCH = 10_000
_CURRENT = "JOIN treewatch.boxes b ON b.box = e.box AND b.load_id = e.load_id"


def status(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """Each box: its feed's epoch and the seq applied, when, and what it holds."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT b.box, b.epoch, b.seq, b.applied_at, count(e.box),"
            " coalesce(sum(e.size) FILTER (WHERE e.kind = 'file'), 0)"
            " FROM treewatch.boxes b LEFT JOIN treewatch.entries e ON e.box = b.box AND e.load_id = b.load_id"
            " WHERE b.epoch <> '' GROUP BY b.box ORDER BY b.box"
        )
        return [
            {"box": box, "epoch": epoch, "seq": int(seq), "applied_at": at.isoformat(timespec="seconds"),
             "entries": int(entries), "bytes": int(nbytes)}
            for box, epoch, seq, at, entries, nbytes in cur.fetchall()
        ]  # fmt: skip


def _roots(conn: psycopg.Connection[Any], box: str | None) -> list[tuple[str, int, bytes]]:
    """(box, load, root) of every root of every box (or of one): a skip scan of the primary key,
    one index probe per root instead of a read of every entry."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT box, load_id FROM treewatch.boxes WHERE epoch <> '' AND (%s::text IS NULL OR box = %s)"
            " ORDER BY box",
            (box, box),
        )
        boxes = cur.fetchall()
        found = []
        for name, load_id in boxes:
            cur.execute(
                "WITH RECURSIVE r(root) AS ("
                " (SELECT root FROM treewatch.entries WHERE box = %(b)s AND load_id = %(l)s ORDER BY root LIMIT 1)"
                " UNION ALL SELECT (SELECT root FROM treewatch.entries WHERE box = %(b)s AND load_id = %(l)s"
                " AND root > r.root ORDER BY root LIMIT 1) FROM r WHERE r.root IS NOT NULL"
                ") SELECT root FROM r WHERE root IS NOT NULL",
                {"b": name, "l": load_id},
            )
            found += [(name, int(load_id), bytes(row[0])) for row in cur.fetchall()]
        return found


def scopes(conn: psycopg.Connection[Any], path: bytes | None, box: str | None) -> list[tuple[str, int, bytes, bytes]]:
    """(box, load, root, path relative to the root) for everything at or below the absolute
    ``path`` (None: everything), on every box or one."""
    chosen = []
    for name, load_id, root in _roots(conn, box):
        if path is None or is_within(path, root) or root == b"/":
            rel = b"" if path is None else path[len(root) :].lstrip(b"/")
            chosen.append((name, load_id, root, rel))
        elif is_within(root, path) or path == b"/":
            chosen.append((name, load_id, root, b""))  # a root below the path: all of it
    return chosen


def entry_json(box: str, row: tuple[Any, ...]) -> dict[str, Any]:
    """A catalogue row (ENTRY_COLUMNS) as `ls --json` shows it, with its box."""
    root, path, kind, size, mtime, ctime, inode, dev, mode, uid, gid, nlink, digest, target, xattrs, corrupt = row[:16]
    return {
        "box": box,
        "path": os.fsdecode(join(bytes(root), bytes(path))),
        "kind": kind,
        "size": size,
        "mtime_ns": mtime,
        "ctime_ns": ctime,
        "inode": inode,
        "dev": dev,
        "mode": mode,
        "uid": uid,
        "gid": gid,
        "nlink": nlink,
        "blake3": bytes(digest).hex() if digest is not None else None,
        "target": os.fsdecode(bytes(target)) if target is not None else None,
        "xattrs": json.loads(xattrs) if xattrs else {},
        "id": row[16],
        "seq": row[17],
        "corrupt": corrupt,
    }


def listing(conn: psycopg.Connection[Any], path: bytes | None, box: str | None) -> Iterator[dict[str, Any]]:
    """Every entry at or below ``path`` on every box (or one), by box, root and path."""
    for name, load_id, root, rel in scopes(conn, path, box):
        where, params = "", {}
        if rel:
            where = " AND path >= %(p)s AND path < %(hi)s AND (path = %(p)s OR path >= %(lo)s)"
            params = subtree_bounds(rel)
        with conn.cursor(name="fleet_ls") as cur:
            cur.itersize = FETCH
            cur.execute(
                f"SELECT {', '.join(ENTRY_COLUMNS)} FROM treewatch.entries"
                f" WHERE box = %(b)s AND load_id = %(l)s AND root = %(r)s{where} ORDER BY path",
                {"b": name, "l": load_id, "r": root, **params},
            )
            for row in cur:
                yield entry_json(name, row)
        conn.rollback()


@dataclass(frozen=True, slots=True)
class Copy:
    """One inode holding the content on one box, with every name it has there (hard links)."""

    box: str
    dev: int
    inode: int
    paths: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Group:
    size: int
    blake3: bytes
    copies: tuple[Copy, ...]

    @property
    def boxes(self) -> list[str]:
        return sorted({c.box for c in self.copies})

    @property
    def wasted(self) -> int:
        """What deleting copies would reclaim while every box keeps one: copies on other boxes
        are backups, on purpose."""
        return self.size * (len(self.copies) - len(self.boxes))


@dataclass(slots=True)
class Report:
    groups: list[Group] = field(default_factory=list)

    @property
    def reclaimable(self) -> int:
        return sum(g.wasted for g in self.groups)


def dupes(
    conn: psycopg.Connection[Any], min_size: int, *, only_on_one_box: bool = False, box: str | None = None
) -> Report:
    """Contents held by more than one inode anywhere in the fleet — or, with ``only_on_one_box``,
    contents that exist on one box only (one copy or several there, none elsewhere): what no
    other box backs up. ``box``: only the groups that have a copy on that box."""
    having = "count(DISTINCT e.box) = 1" if only_on_one_box else "count(DISTINCT (e.box, e.dev, e.inode)) > 1"
    filtered = " AND bool_or(e.box = %(box)s)" if box is not None else ""
    sql = (
        "WITH files AS (SELECT e.box, e.root, e.path, e.size, e.blake3, e.dev, e.inode"
        f" FROM treewatch.entries e {_CURRENT}"
        " WHERE e.kind = 'file' AND e.blake3 IS NOT NULL AND NOT e.corrupt AND e.size >= %(min)s),"
        f" groups AS (SELECT e.size, e.blake3 FROM files e GROUP BY e.size, e.blake3 HAVING {having}{filtered})"
        " SELECT f.size, f.blake3, f.box, f.dev, f.inode, f.root, f.path FROM files f JOIN groups g"
        " ON g.size = f.size AND g.blake3 = f.blake3 ORDER BY f.size, f.blake3, f.box, f.dev, f.inode, f.root, f.path"
    )
    report = Report()
    with conn.cursor(name="fleet_dupes") as cur:
        cur.itersize = FETCH
        cur.execute(sql, {"min": min_size, "box": box})
        key: tuple[int, bytes] | None = None
        inodes: dict[tuple[str, int, int], list[bytes]] = {}

        def close_group() -> None:
            if key is not None:
                copies = tuple(Copy(b, d, i, tuple(sorted(p))) for (b, d, i), p in inodes.items())
                report.groups.append(Group(key[0], key[1], tuple(sorted(copies, key=lambda c: (c.box, c.paths)))))

        for size, digest, name, dev, inode, root, path in cur:
            this = (int(size), bytes(digest))
            if this != key:
                close_group()
                key, inodes = this, {}
            inodes.setdefault((name, int(dev), int(inode)), []).append(join(bytes(root), bytes(path)))
        close_group()
    conn.rollback()
    if only_on_one_box:
        report.groups.sort(key=lambda g: (g.boxes, -g.size, g.copies[0].paths))
    else:
        report.groups.sort(key=lambda g: (-g.wasted, -len(g.boxes), -g.size, g.blake3))
    return report


def changes(conn: psycopg.Connection[Any], since: datetime, box: str | None) -> Iterator[dict[str, Any]]:
    """The boxes' feed rows committed at or after ``since``, oldest first."""
    with conn.cursor(name="fleet_changes") as cur:
        cur.itersize = FETCH
        cur.execute(
            "SELECT box, epoch, seq, op, kind, root, path, old_path, at FROM treewatch.changes"
            " WHERE at >= %s AND (%s::text IS NULL OR box = %s) ORDER BY at, box, seq",
            (since, box, box),
        )
        for name, epoch, seq, op, kind, raw_root, path, old_path, at in cur:
            root = bytes(raw_root)
            yield {
                "box": name,
                "epoch": epoch,
                "seq": seq,
                "op": op,
                "kind": kind,
                "path": os.fsdecode(join(root, bytes(path))),
                "old_path": os.fsdecode(join(root, bytes(old_path))) if old_path is not None else None,
                "at": at.isoformat(),
            }
    conn.rollback()
