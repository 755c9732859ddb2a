"""The tests' own idea of what the index should hold: an independent walk of the disk.

Deliberately shares no code with the scanner: os.scandir on bytes, lstat, blake3 of the
whole file read at once. ``indexed`` reads the index back through the CLI (`ls --json`).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3

Row = tuple[str, int, int, int, str | None]  # kind, size, mtime_ns, inode, blake3 hex


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def expected(root: Path | bytes, exclude_names: tuple[bytes, ...] = ()) -> dict[bytes, Row]:
    """{absolute path bytes: row} for everything below ``root`` (the root itself excluded)."""
    top = os.fsencode(root)
    out: dict[bytes, Row] = {}
    pending = [top]
    while pending:
        folder = pending.pop()
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name in exclude_names:
                    continue
                st = entry.stat(follow_symlinks=False)
                kind = _kind(st.st_mode)
                digest = None
                if kind == "file":
                    with open(entry.path, "rb") as f:
                        digest = blake3.blake3(f.read()).hexdigest()
                elif kind == "dir":
                    pending.append(entry.path)
                size = st.st_size if kind != "dir" else 0
                out[entry.path] = (kind, size, st.st_mtime_ns, st.st_ino, digest)
    return out


def cli(
    db: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `treewatch --db DB ARGS...` as a user would, with the test's interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "daemon", "--db", str(db), *args],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        timeout=600,
    )


def ls_json(db: Path, path: Path | None = None) -> list[dict[str, Any]]:
    args = ["ls", "--json"] + ([str(path)] if path is not None else [])
    out = cli(db, *args).stdout
    return [json.loads(line) for line in out.splitlines() if line]


def indexed(db: Path, root: Path | bytes) -> dict[bytes, Row]:
    """The index's rows under ``root`` in the oracle's shape (folder sizes are not compared)."""
    top = os.fsencode(root)
    rows: dict[bytes, Row] = {}
    for r in ls_json(db):
        path = os.fsencode(r["path"])
        if path == top or not path.startswith(top.rstrip(b"/") + b"/"):
            continue
        size = r["size"] if r["kind"] != "dir" else 0
        rows[path] = (r["kind"], size, r["mtime_ns"], r["inode"], r["blake3"])
    return rows


def diff(want: dict[bytes, Row], got: dict[bytes, Row]) -> list[str]:
    """Human-readable differences, empty when the index matches the disk."""
    problems = []
    for p in sorted(want.keys() - got.keys()):
        problems.append(f"missing from index: {p!r} {want[p]}")
    for p in sorted(got.keys() - want.keys()):
        problems.append(f"in index but not on disk: {p!r} {got[p]}")
    for p in sorted(want.keys() & got.keys()):
        if want[p] != got[p]:
            problems.append(f"differs: {p!r} disk={want[p]} index={got[p]}")
    return problems
