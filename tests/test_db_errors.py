"""Errors at the edge: a database that cannot be used is one clear line naming its path,
exit 1, no traceback, and the file left exactly as it was."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.as_user import as_user, needs_other_user
from tests.oracle import cli

REPO = Path(__file__).resolve().parent.parent


def one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("command", [["scan"], ["status"], ["ls"], ["changes", "--since", "0"]])
def test_corrupt_database_is_untouched(library: Path, db: Path, command: list[str]) -> None:
    garbage = os.urandom(64 * 1024)
    db.write_bytes(garbage)
    args = [*command, "--root", str(library)] if command == ["scan"] else command
    one_line(cli(db, *args, check=False), str(db))
    assert db.read_bytes() == garbage
    assert not Path(str(db) + "-wal").exists()


def test_foreign_sqlite_database_is_untouched(library: Path, db: Path) -> None:
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE photos(x)")
    con.commit()
    con.close()
    before = db.read_bytes()
    one_line(cli(db, "scan", "--root", str(library), check=False), str(db), "not a treewatch index")
    assert db.read_bytes() == before


def test_status_on_missing_database(db: Path) -> None:
    result = cli(db, "status", check=False)
    one_line(result, str(db), "no such database")
    assert not db.exists()


def test_database_folder_missing(library: Path, tmp_path: Path) -> None:
    db = tmp_path / "nope" / "index.db"
    one_line(cli(db, "scan", "--root", str(library), check=False), str(db))


@needs_other_user
def test_unwritable_and_unreachable_database_folder(tmp_path: Path) -> None:
    """As nobody (root writes anywhere): a folder it cannot write, and one it cannot even enter."""
    library = tmp_path / "lib"
    library.mkdir()
    (library / "f").write_bytes(b"f")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o755)  # root's, not writable by nobody
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    for folder in (ro, closed):
        db = folder / "index.db"
        result = subprocess.run(
            [*as_user("nobody", tmp_path), sys.executable, "-m", "daemon", "--db", str(db), "scan", "--root",
             str(library)],
            capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        one_line(result, str(db))
        assert list(folder.iterdir()) == []


def test_a_database_path_that_starts_with_two_slashes_is_that_file(library: Path, tmp_path: Path) -> None:
    """`//srv/index.db` is `/srv/index.db` on Linux; as `file://srv/…` SQLite read a host in it."""
    (library / "f").write_bytes(b"f")
    db = Path("/" + str(tmp_path / "index.db"))
    assert str(db).startswith("//")
    assert "1 added" in cli(db, "scan", "--root", str(library)).stdout
    assert "1 files" in cli(db, "status").stdout
    assert (tmp_path / "index.db").is_file()
