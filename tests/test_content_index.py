"""The content-hash index during a first index: dropped while nothing is indexed, built once at
the end of step 2 (however the step ends), and built again by the next open after a kill."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.config import RootConfig, SyncConfig
from daemon.index import Index, sqlite_uri
from daemon.model import ScanScope
from daemon.progress import NoProgress
from daemon.scan import scan
from daemon.schema import CONTENT_INDEX
from tests.engine import many_small_files, run_scan


@pytest.fixture
def index(db: Path) -> Iterator[Index]:
    idx = Index(db)
    yield idx
    idx.close()


def has_content_index(db: Path) -> bool:
    """As another process sees the database."""
    con = sqlite3.connect(sqlite_uri(db, "mode=ro"), uri=True, timeout=10)
    try:
        row = con.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (CONTENT_INDEX,))
        return row.fetchone() is not None
    finally:
        con.close()


class _DuringStep2(NoProgress):
    """Runs ``look`` at the first file step 2 writes."""

    def __init__(self, look: Callable[[], object]) -> None:
        self.look = look
        self.seen: list[object] = []

    def advance(self, files: int, nbytes: int) -> None:
        if not self.seen:
            self.seen.append(self.look())


def first_index(index: Index, root: Path, progress: NoProgress, stop: threading.Event | None = None) -> bool:
    report = scan(index, RootConfig(path=root), [ScanScope(os.fsencode(root), b"")],
                  SyncConfig(hash_workers=1, batch_size=50), progress=progress, stop=stop)  # fmt: skip
    return report.interrupted


def test_a_first_index_builds_the_content_index_once_at_its_end(library: Path, db: Path, index: Index) -> None:
    many_small_files(library, 300)
    during = _DuringStep2(lambda: has_content_index(db))
    first_index(index, library, during)
    assert during.seen == [False], "step 2 of a first index inserts without the content-hash index"
    assert has_content_index(db)
    plan = index.db.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM entries WHERE size = 1 AND blake3 = x'00'"
        " AND kind = 'file' AND blake3 IS NOT NULL AND corrupt_blake3 IS NULL"
    ).fetchall()
    assert any(CONTENT_INDEX in str(row) for row in plan), plan


def test_with_rows_already_indexed_the_content_index_stays(library: Path, tmp_path: Path, db: Path,
                                                             index: Index) -> None:  # fmt: skip
    many_small_files(library, 50)
    run_scan(index, library)
    second = tmp_path / "second"
    second.mkdir()
    many_small_files(second, 300)
    during = _DuringStep2(lambda: has_content_index(db))
    first_index(index, second, during)
    assert during.seen == [True], "another root's rows: building the index again would cost more than it saves"


def test_an_interrupted_first_index_still_builds_it(library: Path, db: Path, index: Index) -> None:
    many_small_files(library, 300)
    stop = threading.Event()
    assert first_index(index, library, _DuringStep2(stop.set), stop)
    assert has_content_index(db)


def test_the_next_open_after_a_killed_first_index_builds_it_unless_that_scan_runs(db: Path, index: Index) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    index.db.execute(f"DROP INDEX {CONTENT_INDEX}")
    # As a first index leaves the database while it runs: its scan row, its pid alive.
    index.db.execute("INSERT INTO roots(path) VALUES (x'2f')")
    index.db.execute("INSERT INTO scans(root_id, kind, scopes, state, started_at, pid)"
                     " VALUES (1, 'full', '[]', 'hashing', 0, ?)", (os.getpid(),))  # fmt: skip
    Index(db).close()
    assert not has_content_index(db), "built under a running first index, which builds it at its end"
    index.db.execute("UPDATE scans SET pid = ?", (dead_pid,))  # killed: nothing will build it
    Index(db).close()
    assert has_content_index(db)
