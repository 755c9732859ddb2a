"""`treewatch rebuild` after a simulated scheme bump: exactly those re-derived, feed untouched, resumable."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from daemon.index import Index
from daemon.rebuild import needs_rebuild, rebuild
from tests.conftest import wait_for
from tests.oracle import cli, ls_json

PAST_NS = 1_600_000_000 * 10**9


def write(path: Path, data: bytes, mtime_ns: int = PAST_NS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def sql(db: Path, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """The test's own access to its database: the "migration" that bumps a scheme."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute(statement, params).fetchall()
    conn.close()
    return rows


def status(db: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(cli(db, "status", "--json").stdout)
    return data


def rows_by_path(db: Path) -> dict[str, dict[str, Any]]:
    return {r["path"]: r for r in ls_json(db)}


def test_rebuild_rederives_exactly_the_old_scheme_and_leaves_the_feed(library: Path, db: Path) -> None:
    for i in range(10):
        write(library / "old" / f"{i}.jpg", os.urandom(2000 + i))
        write(library / "new" / f"{i}.jpg", os.urandom(3000 + i))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    sql(db, "UPDATE entries SET scheme = 0 WHERE path >= CAST('old/' AS BLOB) AND path < CAST('old0' AS BLOB)")
    # One of them was edited since: not the rebuild's to hash but the next scan's.
    write(library / "old" / "9.jpg", b"edited", mtime_ns=PAST_NS + 10**9)
    before, feed_seq, rows = status(db), status(db)["seq"], rows_by_path(db)
    with closing(Index(db)) as index:
        assert needs_rebuild(index) == 10

    result = cli(db, "rebuild", "--json")
    report = json.loads(result.stdout)
    assert report["needed"] == 10 and report["rebuilt"] == 9 and report["skipped"] == 1
    assert report["rebuilt_bytes"] == sum(2000 + i for i in range(9))
    after = status(db)
    assert after["counters"]["files_hashed"] == before["counters"]["files_hashed"] + 9
    assert after["seq"] == feed_seq  # the change feed did not move
    assert rows_by_path(db) == rows  # same hashes, same seq, nothing else touched
    assert sql(db, "SELECT count(*) FROM entries WHERE kind = 'file' AND scheme = 0") == [(1,)]
    # The edited one is the scanner's: it re-hashes it and tells the feed.
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert sql(db, "SELECT count(*) FROM entries WHERE kind = 'file' AND scheme = 0") == [(0,)]
    feed = cli(db, "changes", "--since", str(feed_seq), "--json").stdout.splitlines()
    assert [(c["op"], c["path"]) for c in map(json.loads, feed)] == [("modified", str(library / "old" / "9.jpg"))]
    again = json.loads(cli(db, "rebuild", "--json").stdout)
    assert again["needed"] == 0 and again["rebuilt"] == 0


def test_content_changed_under_an_unchanged_stat_is_marked_not_adopted(library: Path, db: Path) -> None:
    victim = library / "victim.raw"
    write(victim, b"a" * 10_000)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    old = rows_by_path(db)[str(victim)]["blake3"]
    sql(db, "UPDATE entries SET scheme = 0")
    write(victim, b"b" * 10_000)  # same size, mtime put back
    result = cli(db, "rebuild", "--json", check=False)
    assert result.returncode == 1
    assert json.loads(result.stdout)["corrupt"] == [str(victim)]
    row = rows_by_path(db)[str(victim)]
    assert row["corrupt"] is True and row["blake3"] == old
    assert status(db)["roots"][0]["corrupt"] == 1


def test_rebuild_in_process_honours_stop(library: Path, db: Path) -> None:
    for i in range(5):
        write(library / f"{i}.bin", os.urandom(100))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    sql(db, "UPDATE entries SET scheme = 0")
    stop = threading.Event()
    stop.set()
    with closing(Index(db)) as index:
        report = rebuild(index, batch_size=2, stop=stop)
        assert report.interrupted and report.rebuilt == 0 and needs_rebuild(index) == 5
        report = rebuild(index, batch_size=2)
        assert report.resumed and report.rebuilt == 5 and needs_rebuild(index) == 0


@pytest.mark.slow
def test_sigkill_mid_rebuild_resumes_without_hashing_twice(library: Path, db: Path, tmp_path: Path) -> None:
    files = 3000
    for i in range(files):
        write(library / f"d{i // 100:02}" / f"f{i:04}.bin", os.urandom(64 * 1024))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    sql(db, "UPDATE entries SET scheme = 0")
    hashed_before = status(db)["counters"]["files_hashed"]
    config = tmp_path / "config.toml"
    config.write_text("[sync]\nbatch_size = 5\nhash_workers = 1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(config), "--db", str(db), "rebuild"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def done() -> int:
        return int(sql(db, "SELECT coalesce(sum(done_files), 0) FROM jobs WHERE name = 'rebuild'")[0][0])

    wait_for(lambda: done() >= 100, timeout=60, what="the rebuild to commit some batches")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = sql(db, "SELECT count(*) FROM entries WHERE kind = 'file' AND scheme = 0")[0][0]
    assert 0 < left < files, "the rebuild finished before it could be killed: make the corpus bigger"
    committed = files - left
    assert status(db)["counters"]["files_hashed"] == hashed_before + committed

    report = json.loads(cli(db, "--config", str(config), "rebuild", "--json").stdout)
    assert report["resumed"] is True
    assert report["needed"] == left and report["rebuilt"] == left  # the committed ones are not selected again
    assert status(db)["counters"]["files_hashed"] == hashed_before + files  # each file hashed once
    assert sql(db, "SELECT count(*) FROM jobs") == [(0,)]
