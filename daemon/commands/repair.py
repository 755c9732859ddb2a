"""`repair`: check the index and, when it is damaged, set it aside and rebuild it from what can
be salvaged, then sync the configured roots. Parse, call, render: the work is in repair.py.

It takes the daemon's lock, as the daemon does: a daemon that runs on the database repairs it
itself, and a repair beside it would rename files under its open connections.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.commands.shared import Fail, human_bytes
from daemon.config import Config
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.commands.shared import Subcommands


def register(sub: Subcommands) -> None:
    r = sub.add_parser("repair", help="check the index; if damaged, set it aside, salvage it and sync the roots")
    r.add_argument("--root", type=Path, action="append", default=[], help="a root to sync afterwards (repeatable)")
    r.set_defaults(handler=cmd_repair)


def cmd_repair(args: argparse.Namespace, config: Config) -> int:
    from daemon.fs import DaemonLock
    from daemon.index import check_file

    database = config.database
    daemon_runs = (
        f"{database}: a treewatch daemon runs on this database and repairs it itself when it finds it damaged"
        " (`systemctl restart treewatch` makes it check at once); stop it to run `treewatch repair`"
    )
    if DaemonLock.held(database):
        raise Fail(daemon_runs)
    if not database.exists():
        raise Fail(f"{database}: no such database")
    if database.is_dir():
        raise Fail(f"{database}: is a folder, not a database")
    try:
        problem = check_file(database, thorough=True)
    except Exception as e:  # not damage: permission denied, locked, unreadable
        raise Fail(f"{database}: cannot be checked: {e}") from None
    if problem is None:
        print(f"treewatch: {database}: the database is sound (SQLite's integrity_check: ok); nothing to repair")
        return ExitCode.OK
    lock = DaemonLock(database)
    try:
        held = lock.acquire()
    except OSError as e:
        raise Fail(f"{database}: cannot take the daemon's lock {lock.path}: {e.strerror or e}") from None
    if not held:
        raise Fail(daemon_runs)
    from daemon.repair import RepairError, repair

    print(f"treewatch: {database}: damaged (SQLite: {problem}); repairing", file=sys.stderr)
    try:
        report = repair(database, problem)
    except RepairError as e:
        raise Fail(str(e)) from None
    print(f"treewatch: {database}: repaired in {report.seconds:.1f} s; the damaged file is kept as {report.damaged}"
          + "".join(f", {p}" for p in report.moved))  # fmt: skip
    print(f"treewatch: salvaged {report.roots} roots, {report.entries} entries ({report.hashed} files with their"
          f" content hash; {report.unvouched} hashes not vouched for by the index, {report.folders_made} folders"
          f" made again, {report.dropped} unsound rows dropped; read by {report.method}); the feed starts a new"
          " epoch")  # fmt: skip
    return _sync(config)


def _sync(config: Config) -> int:
    """A full sync of every configured root: it re-reads only what no salvaged row matches."""
    if not config.roots:
        print("treewatch: no roots configured: `treewatch scan --root DIR` (or the daemon) syncs the index")
        return ExitCode.OK
    from daemon.commands.shared import open_index
    from daemon.model import ScanScope
    from daemon.progress import ScanProgress
    from daemon.scan import scan

    index = open_index(config)
    started = time.monotonic()
    clean = True
    hashed = nbytes = 0
    with ScanProgress(enabled=sys.stderr.isatty()) as progress:
        for root in config.roots:
            report = scan(index, root, [ScanScope(os.fsencode(root.path))], config.sync, progress=progress)
            clean = clean and report.clean
            hashed += report.files_hashed
            nbytes += report.bytes_hashed
            if report.offline:
                print(f"treewatch: {root.path}: offline ({report.offline}); it is synced when it is back",
                      file=sys.stderr)  # fmt: skip
    print(f"treewatch: synced {len(config.roots)} roots in {time.monotonic() - started:.1f} s;"
          f" re-read {hashed} files, {human_bytes(nbytes)}")  # fmt: skip
    return ExitCode.OK if clean else ExitCode.FAILURE
