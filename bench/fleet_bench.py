"""The fleet catalogue's figures (`make bench`, part F): feed rows applied per second by the
stream, the snapshot load of a 1M-entry box, and how soon a change committed on a box is visible
in the catalogue while `replicate --follow` runs.

    .venv/bin/python -m bench.fleet_bench [--entries 1000000] [--stream-rows 200000] [--rounds 10]

A private PostgreSQL cluster is started for it (tests/pg_cluster.py) with PostgreSQL's default
durability (fsync on), as a catalogue in service has. The indexes for the first two figures are
synthetic (rows inserted with SQL into the real schema, library-shaped); the third is a real
folder, scanned by `treewatch scan`, followed by a real `treewatch replicate --follow`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from daemon.index import Index
from tests import pg_cluster

REPO = Path(__file__).resolve().parent.parent
FILES_PER_DIR = 100


@dataclass(frozen=True, slots=True)
class Figures:
    stream_rows: int
    stream_seconds: float
    load_entries: int
    load_seconds: float
    follow_latencies: list[float]

    @property
    def rows_per_second(self) -> float:
        return self.stream_rows / self.stream_seconds


def populate(index: Index, entries: int, *, feed: bool) -> None:
    """``entries`` library-shaped rows (a folder per 100 files, 32-byte hashes), with an `added`
    feed row each when ``feed``: what a first index of that many entries leaves."""
    index.root(b"/srv/bench")
    rows: list[tuple[object, ...]] = []
    changes: list[tuple[object, ...]] = []
    dir_id = 0
    now = time.time()
    for n in range(1, entries + 1):
        if (n - 1) % (FILES_PER_DIR + 1) == 0:
            dir_id = n
            rows.append((n, 1, b"d%07d" % n, 0, "dir", 4096, 1, 1, n, 1, 0o40755, 0, 0, 2, None, 1, n))
            changes.append((n, n, 1, "added", "dir", b"d%07d" % n, None, now))
            continue
        path = b"d%07d/IMG_%07d.JPG" % (dir_id, n)
        digest = hashlib.blake2b(n.to_bytes(8, "little"), digest_size=32).digest()
        rows.append((n, 1, path, dir_id, "file", 1000 + n % 7000, 2, 2, n, 1, 0o100644, 0, 0, 1, digest, 1, n))
        changes.append((n, n, 1, "added", "file", path, None, now))
    with index.transaction():
        index.db.executemany(
            "INSERT INTO entries(id, root_id, path, parent_id, kind, size, mtime_ns, ctime_ns, inode, dev, mode,"
            " uid, gid, nlink, blake3, scheme, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        if feed:
            index.db.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?, ?)", changes)


def replicate(db: Path, url: str, box: str) -> float:
    """One `treewatch replicate` run, as a user runs it; its wall time."""
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "daemon", "--db", str(db), "replicate", "--to", url, "--box", box],
        check=True, capture_output=True, cwd=REPO, env={**os.environ, "TREEWATCH_CONFIG": ""},
    )  # fmt: skip
    return time.perf_counter() - started


def visible(conn: psycopg.Connection[object], box: str, name: bytes) -> bool:
    row = conn.execute(
        "SELECT 1 FROM treewatch.entries e JOIN treewatch.boxes b ON b.box = e.box AND b.load_id = e.load_id"
        " WHERE e.box = %s AND e.path = %s",
        (box, name),
    ).fetchone()
    conn.rollback()
    return row is not None


def follow_latencies(cluster: pg_cluster.Cluster, url: str, work: Path, rounds: int) -> list[float]:
    """From a change's commit on the box (its feed row's time) to its row in the catalogue."""
    root, db = work / "live", work / "live.db"
    root.mkdir()
    (root / "first").write_bytes(b"first")
    env = {**os.environ, "TREEWATCH_CONFIG": ""}
    tw = [sys.executable, "-m", "daemon", "--db", str(db)]
    subprocess.run([*tw, "scan", "--root", str(root)], check=True, capture_output=True, cwd=REPO, env=env)
    follower = subprocess.Popen([*tw, "replicate", "--to", url, "--box", "live", "--follow"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    latencies = []
    try:
        with psycopg.connect(url) as conn:
            deadline = time.monotonic() + 60
            while not visible(conn, "live", b"first"):
                assert time.monotonic() < deadline, "the follower never loaded its snapshot"
                time.sleep(0.01)
            for i in range(rounds):
                name = b"change-%03d" % i
                (root / os.fsdecode(name)).write_bytes(b"%d" % i)
                subprocess.run([*tw, "scan", "--root", str(root)], check=True, capture_output=True, cwd=REPO, env=env)
                index = Index(db, readonly=True)
                committed = index.db.execute("SELECT max(at) FROM changes WHERE path = ?", (name,)).fetchone()[0]
                index.close()
                deadline = time.monotonic() + 30
                while not visible(conn, "live", name):
                    assert time.monotonic() < deadline, f"{name!r} never reached the catalogue"
                    time.sleep(0.005)
                latencies.append(time.time() - committed)
    finally:
        follower.terminate()
        follower.wait(30)
    return latencies


def measure(entries: int, stream_rows: int, rounds: int, work: Path) -> Figures:
    cluster = pg_cluster.Cluster(durable=True)
    try:
        url = cluster.new_database()
        # The stream: a box replicated while empty, then a first index of stream_rows entries.
        streamed = work / "stream.db"
        Index(streamed).close()
        replicate(streamed, url, "stream")
        index = Index(streamed)
        populate(index, stream_rows, feed=True)
        index.close()
        stream_seconds = replicate(streamed, url, "stream")
        # The snapshot: a new box of `entries` entries.
        loaded = work / "load.db"
        index = Index(loaded)
        populate(index, entries, feed=False)
        index.close()
        load_seconds = replicate(loaded, url, "load")
        latencies = follow_latencies(cluster, url, work, rounds)
        return Figures(stream_rows, stream_seconds, entries, load_seconds, latencies)
    finally:
        cluster.close()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000, help="the snapshot's box (1000000)")
    p.add_argument("--stream-rows", type=int, default=200_000, help="feed rows the stream applies (200000)")
    p.add_argument("--rounds", type=int, default=10, help="follow latency: changes measured (10)")
    args = p.parse_args()
    if (why := pg_cluster.available()) is not None:
        print(f"fleet: skipped: {why}")
        return 0
    with tempfile.TemporaryDirectory(prefix="treewatch-fleet-bench-") as tmp:
        f = measure(args.entries, args.stream_rows, args.rounds, Path(tmp))
    print(f"stream: {f.stream_rows} feed rows applied in {f.stream_seconds:.1f} s: {f.rows_per_second:,.0f} rows/s")
    print(f"snapshot: {f.load_entries} entries loaded in {f.load_seconds:.1f} s")
    print(f"follow: median {statistics.median(f.follow_latencies):.3f} s, max {max(f.follow_latencies):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
