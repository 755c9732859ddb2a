"""Resume: a scan killed with SIGKILL after its first batches committed is finished by the next
one, and nothing committed is hashed twice (the persisted bytes_hashed equals the corpus)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.index import sqlite_uri
from tests.conftest import wait_for
from tests.oracle import cli, diff, expected, indexed
from tests.test_content_index import has_content_index

FILES = 12_000
SIZE = 8 * 1024  # per-file work dominates, so the scan takes seconds without a big corpus


def make_corpus(root: Path) -> int:
    total = 0
    old = time.time_ns() - 3600 * 1_000_000_000  # an hour old: no file is racily clean
    for i in range(FILES):
        folder = root / f"d{i % 60:02d}"
        folder.mkdir(exist_ok=True)
        path = folder / f"f{i:05d}.bin"
        data = i.to_bytes(4, "little") * (SIZE // 4 + i % 7)
        path.write_bytes(data)
        os.utime(path, ns=(old, old))
        total += len(data)
    return total


def counter(db: Path, name: str) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(sqlite_uri(db, "mode=ro"), uri=True, timeout=5)
        try:
            row = con.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0  # the schema is not created yet
    return int(row[0]) if row else 0


@pytest.mark.slow
def test_sigkill_then_resume_hashes_nothing_twice(library: Path, db: Path, tmp_path: Path) -> None:
    total = make_corpus(library)
    config = tmp_path / "config.toml"
    config.write_text(f'database = "{db}"\n[[roots]]\npath = "{library}"\n[sync]\nbatch_size = 50\nhash_workers = 1\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(config), "scan"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: counter(db, "files_hashed") > 0 or proc.poll() is not None, timeout=60, interval=0.005,
                 what="the first batch to commit")  # fmt: skip
        assert proc.poll() is None, "the scan finished before it could be killed: make the corpus larger"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = counter(db, "files_hashed")
    assert 0 < done_before < FILES, done_before
    assert not has_content_index(db), "killed in step 2 of a first index, before the index is built"

    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(config), "scan"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    status = json.loads(cli(db, "status", "--json").stdout)
    assert status["counters"]["files_hashed"] == FILES
    assert status["counters"]["bytes_hashed"] == total  # exactly: nothing committed was hashed again
    assert status["roots"][0]["files"] == FILES and status["roots"][0]["bytes"] == total
    assert status["roots"][0]["state"] == "online"
    assert diff(expected(library), indexed(db, library)) == []
    assert has_content_index(db)
