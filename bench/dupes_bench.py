"""`treewatch dupes` on a synthetic 1M-entry index: rows inserted directly with SQL.

    .venv/bin/python bench/dupes_bench.py [--entries N] [--db FILE] [--keep]

The index has the real schema (made by daemon.index.Index) and a library-like shape: one
folder per 100 files, sizes spread log-uniformly from 1 byte to 1 GiB, 5% of the files in
duplicate groups of 2-4 copies, and 1% of those copies hard links of another. It prints the
time of the dupes query (the one `treewatch dupes` runs, best of several) and of the whole
command through the CLI, plus the query plan.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon import dupes
from daemon.index import Index
from daemon.toolstore import ToolStore

FILES_PER_DIR = 100
DUPE_SHARE = 0.05
HARDLINK_SHARE = 0.01


def populate(index: Index, entries: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    root_path = b"/srv/bench"
    index.root(root_path)
    rows: list[tuple[object, ...]] = []
    next_id = 1
    inode = 1000
    dir_id = 0
    n = 0
    while n < entries:
        if n % (FILES_PER_DIR + 1) == 0:
            dir_id = next_id
            rows.append((next_id, 1, b"d%07d" % dir_id, 0, "dir", 0, 1, 1, inode, 1, 0o40755, 0, 0, 2, None, 1, 1))
            next_id, inode, n = next_id + 1, inode + 1, n + 1
            continue
        size = int(2 ** rng.uniform(0, 30))
        digest = hashlib.blake2b(next_id.to_bytes(8, "little"), digest_size=32).digest()
        copies = rng.randint(2, 4) if rng.random() < DUPE_SHARE else 1
        file_inode = inode
        for c in range(copies):
            if c and rng.random() >= HARDLINK_SHARE:
                inode += 1
                file_inode = inode
            rows.append((next_id, 1, b"d%07d/f%09d.jpg" % (dir_id, next_id), dir_id, "file", size, 2, 2,
                         file_inode, 1, 0o100644, 0, 0, 1, digest, 1, 1))  # fmt: skip
            next_id, n = next_id + 1, n + 1
        inode += 1
    with index.transaction():
        index.db.executemany(
            "INSERT INTO entries(id, root_id, path, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode,"
            " uid, gid, nlink, blake3, scheme, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    index.db.execute("ANALYZE")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--db", type=Path)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "bench.db"
        index = Index(db)
        if index.db.execute("SELECT count(*) FROM entries").fetchone()[0] == 0:
            started = time.perf_counter()
            populate(index, args.entries)
            print(f"populated {args.entries} entries in {time.perf_counter() - started:.1f} s")
        times = []
        report = dupes.DupesReport()
        for _ in range(args.runs):
            started = time.perf_counter()
            report = dupes.find(index)
            times.append(time.perf_counter() - started)
        files = sum(len(c.paths) for g in report.groups for c in g.copies)
        print(f"dupes.find: best {min(times) * 1000:.0f} ms, median {sorted(times)[len(times) // 2] * 1000:.0f} ms;"
              f" {len(report.groups)} groups, {files} files, {report.reclaimable} bytes reclaimable")  # fmt: skip
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "daemon", "--db", str(db), "dupes", "--min-size", "1048576", "--json"],
            capture_output=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "TREEWATCH_CONFIG": ""},
        )
        print(f"`treewatch dupes --min-size 1048576 --json`: {time.perf_counter() - started:.2f} s")
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "daemon", "--db", str(db), "dupes", "--json"],
            capture_output=True,
            check=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "TREEWATCH_CONFIG": ""},
        )
        print(f"`treewatch dupes --json` (process start to exit): {time.perf_counter() - started:.2f} s,"
              f" {len(out.stdout)} bytes of output")  # fmt: skip
        statements: list[str] = []
        index.db.set_trace_callback(statements.append)
        ToolStore(index).dupe_groups(dupes.DEFAULT_MIN_SIZE)
        index.db.set_trace_callback(None)
        query = statements[-1]
        print("query plan:")
        for row in index.db.execute(f"EXPLAIN QUERY PLAN {query}"):
            print(f"  {row[3]}")
        index.close()


if __name__ == "__main__":
    main()
