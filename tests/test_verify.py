"""`treewatch verify`: silent corruption found, marked, shown, cleared, accepted; rate; resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import blake3
import pytest

from daemon.index import sqlite_uri
from daemon.verify import TokenBucket
from tests.conftest import wait_for
from tests.oracle import cli, ls_json

PAST_NS = 1_600_000_000 * 10**9  # far from "now": no entry is racily clean


def write(path: Path, data: bytes, mtime_ns: int = PAST_NS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def rot(path: Path) -> bytes:
    """Flip bytes in place and put the mtime back, as bit rot or a careless tool would."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    return bytes(data)


def verify_json(db: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli(db, "verify", "--json", *args, check=False)
    assert result.returncode in (0, 1), result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, data


def corrupt_flags(db: Path) -> dict[str, bool]:
    return {r["path"]: r["corrupt"] for r in ls_json(db) if r["kind"] == "file"}


def status_corrupt(db: Path) -> int:
    count: int = json.loads(cli(db, "status", "--json").stdout)["roots"][0]["corrupt"]
    return count


def test_rot_under_unchanged_stat_is_found_marked_and_accepted(library: Path, db: Path) -> None:
    victim, healthy = library / "a" / "victim.raw", library / "healthy.raw"
    write(victim, os.urandom(300_000))
    write(healthy, os.urandom(200_000))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    old = blake3.blake3(victim.read_bytes()).hexdigest()
    assert verify_json(db)[0] == 0

    new_content = rot(victim)
    new = blake3.blake3(new_content).hexdigest()
    code, report = verify_json(db)
    assert code == 1
    assert report["checked"] == 2
    finding = {"path": str(victim), "old_blake3": old, "new_blake3": new, "size": 300_000, "mtime_ns": PAST_NS}
    assert report["found"] == [finding]
    assert report["corrupt"] == [finding]
    # Marked, not fixed: the index keeps the old hash; status and ls show the mark.
    assert corrupt_flags(db) == {str(victim): True, str(healthy): False}
    assert status_corrupt(db) == 1
    assert next(r for r in ls_json(db) if r["path"] == str(victim))["blake3"] == old
    text = cli(db, "verify", str(library / "a"), check=False)
    assert text.returncode == 1
    assert f"CORRUPT {victim}" in text.stdout and new in text.stdout

    seq = json.loads(cli(db, "status", "--json").stdout)["seq"]
    accepted = cli(db, "verify", "--accept", str(victim), "--json")
    assert json.loads(accepted.stdout)["accepted"] == [
        {"path": str(victim), "old_blake3": old, "new_blake3": new, "seq": seq + 1}
    ]
    assert corrupt_flags(db)[str(victim)] is False
    assert next(r for r in ls_json(db) if r["path"] == str(victim))["blake3"] == new
    feed = [json.loads(line) for line in cli(db, "changes", "--since", str(seq), "--json").stdout.splitlines()]
    assert [(c["op"], c["path"]) for c in feed] == [("modified", str(victim))]
    assert verify_json(db)[0] == 0
    # Nothing left to accept.
    again = cli(db, "verify", "--accept", str(victim), check=False)
    assert again.returncode == 1 and "nothing there is marked corrupt" in again.stderr


def test_the_mark_stays_until_the_file_changes_again(library: Path, db: Path) -> None:
    victim = library / "victim.raw"
    write(victim, os.urandom(100_000))
    write(library / "other.raw", os.urandom(1000))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    rot(victim)
    assert verify_json(db)[0] == 1
    # A chmod is a metadata change: the content is still not what was indexed.
    victim.chmod(0o600)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert status_corrupt(db) == 1
    # Rewritten with a new mtime: the scanner re-hashes it and the mark goes.
    write(victim, os.urandom(100_000), mtime_ns=PAST_NS + 10**9)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert status_corrupt(db) == 0
    assert corrupt_flags(db)[str(victim)] is False
    assert verify_json(db)[0] == 0


def test_changed_files_are_the_scanners_not_reported(library: Path, db: Path) -> None:
    edited, restored = library / "edited.txt", library / "restored.raw"
    write(edited, b"first version")
    write(restored, b"r" * 5000)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    write(edited, b"second version, longer", mtime_ns=PAST_NS + 5 * 10**9)  # an ordinary edit
    rot(restored)
    rot(restored)  # flipped back: the content is what was indexed
    code, report = verify_json(db)
    assert code == 0
    assert report["checked"] == 1 and report["skipped"] == 1 and report["corrupt"] == []


def test_a_restored_file_loses_its_mark(library: Path, db: Path) -> None:
    victim = library / "victim.raw"
    write(victim, b"v" * 4096)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    rot(victim)
    assert verify_json(db)[0] == 1
    rot(victim)  # restored from a backup with its mtime
    code, report = verify_json(db)
    assert code == 0 and report["cleared"] == 1 and status_corrupt(db) == 0


@pytest.mark.parametrize(
    ("steps", "waits"),
    [
        # rate 100 B/s, burst 100 B: within the burst no wait; beyond it the debt is waited off.
        ([(0.0, 50), (0.0, 50)], [0.0, 0.0]),
        ([(0.0, 100), (0.0, 50)], [0.0, 0.5]),
        ([(0.0, 100), (1.0, 100)], [0.0, 0.0]),  # a second later the bucket is full again
        ([(0.0, 300)], [2.0]),  # a file bigger than the burst waits for its excess
        ([(0.0, 100), (10.0, 150)], [0.0, 0.5]),  # idle time refills only up to the burst
    ],
    ids=["within burst", "over burst", "refilled", "big file", "refill capped"],
)
def test_token_bucket(steps: list[tuple[float, int]], waits: list[float]) -> None:
    bucket = TokenBucket(rate=100.0, burst=100.0, now=0.0)
    assert [bucket.take(n, now) for now, n in steps] == pytest.approx(waits)


def counters(db: Path) -> dict[str, int]:
    with sqlite3.connect(sqlite_uri(db, "mode=ro"), uri=True) as conn:
        return dict(conn.execute("SELECT name, value FROM counters").fetchall())


def verify_cursor(db: Path) -> object:
    with sqlite3.connect(sqlite_uri(db, "mode=ro"), uri=True) as conn:
        return conn.execute("SELECT cursor FROM jobs WHERE name = 'verify'").fetchone()


@pytest.mark.slow
def test_rate_limited_verify_killed_resumes_after_its_cursor(library: Path, db: Path) -> None:
    files = 12
    for i in range(files):
        write(library / f"f{i:02}.raw", os.urandom(500_000))
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    # 1 MB/s over 6 MB: the cursor is saved every 2 s, long before the end.
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--db", str(db), "verify", "--max-rate", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: verify_cursor(db), timeout=30, what="a saved verify cursor")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    elapsed = time.monotonic() - started
    done_before = counters(db).get("verified_files", 0)
    assert 0 < done_before < files
    assert elapsed >= done_before * 0.5 - 1.0  # the rate limit held: 0.5 s per 500 kB file at 1 MB/s
    code, report = verify_json(db)
    assert code == 0 and report["resumed"] is True
    # The rerun continued after the cursor: every file verified once, counted once.
    assert report["checked"] == files - done_before
    assert counters(db)["verified_files"] == files
    assert verify_cursor(db) is None  # a completed pass resets it
    assert verify_json(db)[1]["checked"] == files  # and the next pass starts from the top
