"""In-process access to the real engine for fast tests (the same code the CLI runs).

``rows`` reads the index through ``queries.listing`` (what `ls --json` prints) into the
oracle's shape; ``replay`` applies the change feed from seq 0 to an empty set of paths.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from daemon import queries
from daemon.config import RootConfig, SyncConfig
from daemon.index import Index
from daemon.model import ScanReport, ScanScope
from daemon.scan import scan
from tests.oracle import Row


def settle(path: Path) -> None:
    """Age every mtime below ``path`` by a minute, so no entry is racily clean.

    A scan starting within the racy window of a file's write (100 ms on local filesystems)
    hashes it again on the next pass: a test counting hashes must not depend on how fast
    the process starts.
    """
    old = time.time_ns() - 60 * 1_000_000_000
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(old, old), follow_symlinks=False)


def many_small_files(root: Path, count: int) -> int:
    """``count`` files of 1-3 KiB in 40 folders below ``root``, settled; their total bytes."""
    total = 0
    for i in range(count):
        folder = root / f"d{i % 40:02d}"
        folder.mkdir(exist_ok=True)
        data = i.to_bytes(4, "little") * (256 + i % 500)
        (folder / f"f{i:05d}").write_bytes(data)
        total += len(data)
    settle(root)
    return total


HASH_WORKER = b"from daemon.hasher import serve"  # in a hash worker process's command line


def processes(marker: bytes, parent: int | None) -> list[int]:
    """Live processes (not zombies) whose command line contains ``marker``; with ``parent``,
    only its children."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if state != "Z" and marker in cmdline and parent in (None, int(ppid)):
            found.append(int(pid))
    return found


def run_scan(
    index: Index,
    root: Path,
    *,
    exclude: Sequence[str] = (),
    batch_size: int = 1000,
    subtrees: Sequence[bytes] = (b"",),
) -> ScanReport:
    cfg = RootConfig(path=root, exclude=tuple(exclude))
    rb = os.fsencode(root)
    return scan(index, cfg, [ScanScope(rb, s) for s in subtrees], SyncConfig(hash_workers=2, batch_size=batch_size))


def rows(index: Index, root: Path) -> dict[bytes, Row]:
    out: dict[bytes, Row] = {}
    for r in queries.listing(index, [(os.fsencode(root), b"")]):
        size = r["size"] if r["kind"] != "dir" else 0
        out[os.fsencode(r["path"])] = (r["kind"], size, r["mtime_ns"], r["inode"], r["blake3"])
    return out


def replay(index: Index) -> set[bytes]:
    """The set of paths a consumer following the feed from seq 0 ends with."""
    paths: set[bytes] = set()
    for c in queries.changes(index, 0):
        path = os.fsencode(c["path"])
        if c["op"] == "deleted":
            assert path in paths, f"feed deletes {path!r}, which it never added (seq {c['seq']})"
            paths.discard(path)
        elif c["op"] == "renamed":
            old = os.fsencode(c["old_path"])
            assert old in paths, f"feed renames from {old!r}, which it does not hold (seq {c['seq']})"
            paths.discard(old)
            paths.add(path)
        elif c["op"] == "added":
            paths.add(path)
        else:
            assert path in paths, f"feed {c['op']} {path!r}, which it never added (seq {c['seq']})"
    return paths


def counters(index: Index) -> dict[str, int]:
    return index.counters()
