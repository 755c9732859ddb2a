"""The CLI's start-up: a one-shot command imports what it uses and no more.

`treewatch scan` is benchmarked against `find` and `b3sum`, whose start costs nothing. Rich's
console (~20 ms) is for the progress bar on a TTY (its size formatter alone costs 3 ms),
structlog (~60 ms, with asyncio) for a command that logs something, aiosqlite, asyncio and
systemd for the daemon.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Runs one command in a fresh interpreter (stderr is a pipe, not a TTY) and reports which of
# the watched modules it imported.
PROGRAM = """
import sys
from daemon.cli import main
code = main(sys.argv[2:])
watched = sys.argv[1].split(",")
print("IMPORTED " + ",".join(m for m in watched if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""
DAEMON_ONLY = ["rich.console", "structlog", "asyncio", "aiosqlite", "systemd", "psycopg"]


def run(watched: list[str], *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, ",".join(watched), *args], capture_output=True, text=True, timeout=120
    )
    line = next(x for x in result.stderr.splitlines() if x.startswith("IMPORTED "))
    return result, set(filter(None, line.removeprefix("IMPORTED ").split(",")))


@pytest.fixture
def indexed_db(library: Path, db: Path) -> Path:
    (library / "a").mkdir()
    (library / "a" / "f.txt").write_text("hello")
    result, _ = run([], "--db", str(db), "scan", "--root", str(library))
    assert result.returncode == 0, result.stderr
    return db


@pytest.mark.parametrize(
    ("args", "also_not"),
    [
        (["scan"], []),
        (["status"], ["daemon.scan", "concurrent.futures"]),
        (["status", "--json"], ["daemon.scan", "concurrent.futures"]),
        (["ls"], ["daemon.scan", "daemon.rebuild", "daemon.hasher"]),
        (["changes", "--since", "0"], ["daemon.scan", "daemon.rebuild", "daemon.hasher"]),
        (["check-config"], ["daemon.index", "sqlite3"]),
        (["dupes"], ["daemon.scan", "daemon.hasher", "daemon.verify", "daemon.rebuild", "daemon.queries"]),
        (["verify"], ["daemon.rebuild", "daemon.queries", "daemon.metrics"]),
        (["rebuild"], ["daemon.verify", "daemon.queries", "daemon.metrics"]),
    ],
)
def test_cli_commands_import_only_what_they_use(
    indexed_db: Path, library: Path, args: list[str], also_not: list[str]
) -> None:
    roots = ["--root", str(library)] if args[0] == "scan" else []
    result, imported = run(DAEMON_ONLY + also_not, "--db", str(indexed_db), args[0], *roots, *args[1:])
    assert result.returncode == 0, result.stderr
    assert imported == set()


@pytest.mark.parametrize(
    "args", [["fleet", "--pg", "host=/nonexistent dbname=x", "status"], ["replicate", "--to", "host=/nonexistent"]]
)
def test_fleet_commands_import_psycopg_and_fail_in_one_line(indexed_db: Path, args: list[str]) -> None:
    """The fleet's commands are the ones that import psycopg; a catalogue not there is one line."""
    result, imported = run(["psycopg", "structlog"], "--db", str(indexed_db), *args)
    assert result.returncode == 1
    assert imported == {"psycopg"}
    lines = [x for x in result.stderr.splitlines() if not x.startswith("IMPORTED ")]
    assert len(lines) == 1 and lines[0].startswith("treewatch: catalogue host=/nonexistent"), lines


def test_without_psycopg_replicate_says_why_in_one_line(indexed_db: Path) -> None:
    """A box without the fleet extra replicates nothing, and says which package it lacks."""
    program = "import sys\nsys.modules['psycopg'] = None\nfrom daemon.cli import main\nsys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", program, "--db", str(indexed_db), "replicate", "--to", "host=/nonexistent"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "treewatch: the fleet catalogue needs psycopg 3, which is not installed (pip install 'treewatch[fleet]')"
    ]


def test_cli_scan_that_logs_configures_logging_then(indexed_db: Path, library: Path) -> None:
    """The logger is set up by the first log call, as `configure` did it before: key=value lines."""
    (library / "a" / "f.txt").unlink()
    (library / "a").rmdir()
    library.rmdir()
    result, imported = run(["structlog"], "--db", str(indexed_db), "scan", "--root", str(library))
    assert result.returncode == 1
    assert "structlog" in imported
    line = next(x for x in result.stderr.splitlines() if "offline" in x)
    assert line.startswith("timestamp=") and "level='error' event='root is offline: nothing was deleted'" in line


# What building the parser may import of the package: the command modules register their
# parsers, so anything more they import at module level every command pays for.
PARSER_MODULES = {"daemon", "daemon.cli", "daemon.config", "daemon.logs", "daemon.model", "daemon.dupes"}


def test_cli_parser_imports_no_command_work() -> None:
    """`dupes` is there for its default; the work of every command is imported by its handler."""
    program = (
        "import sys\n"
        "from daemon.cli import build_parser\n"
        "build_parser()\n"
        "print(' '.join(sorted(m for m in sys.modules if m == 'daemon' or m.startswith('daemon.'))))\n"
        "print(' '.join(m for m in sys.argv[1:] if m in sys.modules))\n"
    )
    heavy = [*DAEMON_ONLY, "rich", "sqlite3", "json", "concurrent.futures", "threading"]
    result = subprocess.run([sys.executable, "-c", program, *heavy], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    package, imported = result.stdout.splitlines()
    commands = {m for m in package.split() if m.startswith("daemon.commands")}
    assert "daemon.commands.shared" in commands
    assert set(package.split()) - commands == PARSER_MODULES
    assert imported == ""
