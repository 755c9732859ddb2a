"""`run` and `scan`: keep the index true to the disk, as the daemon or once. Parse, call, render.

The work is in scan.py and service.py, imported by the command that runs: the daemon's
imports (asyncio, aiosqlite, systemd) are not needed by a one-shot `scan`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import logs
from daemon.commands.shared import Fail, human_bytes, load_config, open_index, split_at_root
from daemon.config import Config
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.commands.shared import Subcommands
    from daemon.config import RootConfig
    from daemon.index import Index
    from daemon.model import ScanReport, ScanScope

# A file that keeps changing while it is hashed is tried again this many times by `scan`.
UNSTABLE_RETRIES = 3
UNSTABLE_PAUSE_S = 1.0


def register(sub: Subcommands) -> None:
    run = sub.add_parser("run", help="the daemon, in the foreground")
    run.add_argument("--root", type=Path, action="append", default=[], help="a root to watch (repeatable)")
    run.set_defaults(handler=cmd_run)
    s = sub.add_parser("scan", help="one-shot sync of all roots, or of the given subtrees")
    s.add_argument("--root", type=Path, action="append", default=[], help="a root to sync (repeatable)")
    s.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    s.set_defaults(handler=cmd_scan)


def check_roots(config: Config, index: Index) -> None:
    """A root that does not exist and was never indexed is a typo, not an unmounted disk."""
    if not config.roots:
        raise Fail(f"{config.source}: no roots: pass --root DIR or add a [[roots]] table", ExitCode.CONFIG)
    for root in config.roots:
        if not root.path.exists() and index.root(os.fsencode(root.path), create=False) is None:
            raise Fail(f"{config.source}: root {root.path} does not exist (and was never indexed)", ExitCode.CONFIG)


def scopes_for(config: Config, paths: Sequence[Path]) -> dict[RootConfig, list[ScanScope]]:
    from daemon.model import ScanScope

    if not paths:
        return {r: [ScanScope(os.fsencode(r.path))] for r in config.roots}
    by_path = {os.fsencode(r.path): r for r in config.roots}
    chosen: dict[RootConfig, list[ScanScope]] = {}
    for path in paths:
        found = split_at_root(path, by_path)
        if found is None:
            raise Fail(f"{path}: not inside any root ({', '.join(str(r.path) for r in config.roots)})", ExitCode.USAGE)
        root, rel = found
        chosen.setdefault(root, []).append(ScanScope(os.fsencode(root.path), rel, True))
    return chosen


def summary(reports: Sequence[ScanReport], seconds: float) -> str:
    from daemon.model import Op

    ops = {op: sum(r.ops[op] for r in reports) for op in Op}
    files = sum(r.files_hashed for r in reports)
    nbytes = sum(r.bytes_hashed for r in reports)
    rate = f" at {human_bytes(int(nbytes / seconds))}/s" if seconds > 0 and nbytes else ""
    errors = sum(r.error_count for r in reports)
    parts = [
        f"scanned {len(reports)} root{'s' if len(reports) != 1 else ''} in {seconds:.1f} s",
        f"{sum(r.walked for r in reports)} entries walked",
        ", ".join(f"{n} {op.value}" for op, n in ops.items()),
        f"hashed {files} files, {human_bytes(nbytes)}{rate}",
        f"{errors} error{'s' if errors != 1 else ''}",
    ]
    return "; ".join(parts)


def cmd_scan(args: argparse.Namespace, config: Config) -> int:
    from daemon.model import Op, ScanScope
    from daemon.progress import ScanProgress
    from daemon.scan import scan

    log = logs.get()
    index = open_index(config)
    check_roots(config, index)
    plan = scopes_for(config, args.paths)
    started = time.monotonic()
    reports: list[ScanReport] = []
    with ScanProgress(enabled=sys.stderr.isatty()) as progress:
        for root, scopes in plan.items():
            report = scan(index, root, scopes, config.sync, progress=progress)
            for _ in range(UNSTABLE_RETRIES):
                if not report.unstable or report.offline:
                    break
                time.sleep(UNSTABLE_PAUSE_S)
                retry = [ScanScope(os.fsencode(root.path), p, False) for p in report.unstable]
                again = scan(index, root, retry, config.sync, progress=progress)
                report.ops = {op: report.ops[op] + again.ops[op] for op in Op}
                report.files_hashed += again.files_hashed
                report.bytes_hashed += again.bytes_hashed
                report.unstable = again.unstable
                report.error_count += again.error_count
                report.errors.update(again.errors)
            reports.append(report)
    from daemon.feed import catalogue_hold, prune

    # The feed's retention: a box with no daemon keeps it bounded too, and keeps what the fleet
    # catalogue has not taken yet.
    prune(index, config.feed, hold=catalogue_hold(index) if config.replicate.url else None)
    for r in reports:
        where = os.fsdecode(r.root)
        if r.busy_pid:
            log.error("root is being scanned by another process", root=where, pid=r.busy_pid)
        if r.offline:
            log.error("root is offline: nothing was deleted", root=where, reason=r.offline)
        for rel in r.volumes_back:
            log.info("volume is back online", root=where, path=os.fsdecode(r.root + b"/" + rel))
        for rel, reason in sorted(r.volumes_offline.items()):
            log.error("volume is offline: nothing below it was deleted", root=where,
                      path=os.fsdecode(r.root + b"/" + rel), reason=reason)  # fmt: skip
        if r.device_moved:
            log.warning("root came back with a new device number; same filesystem, adopted", root=where)
        for path, error in sorted(r.errors.items())[:20]:
            log.warning("cannot index", path=os.fsdecode(r.root + b"/" + path), error=error)
        if len(r.errors) > 20:
            log.warning("more entries could not be indexed", root=where, count=len(r.errors) - 20)
        if r.unstable:
            log.warning("files kept changing while hashed", root=where, count=len(r.unstable))
        if r.listers_lost:
            log.warning("lister processes ended early; the walk listed their folders itself (slower, nothing missed)",
                        root=where, reasons="; ".join(r.listers_lost))  # fmt: skip
    print(f"treewatch: {summary(reports, time.monotonic() - started)}")
    return ExitCode.OK if all(r.clean for r in reports) else ExitCode.FAILURE


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from daemon.index import DamagedError, is_damage
    from daemon.service import run_daemon  # the daemon's imports are not needed by the queries

    try:
        index = open_index(config, damaged_ok=True)
    except DamagedError:
        index = None  # the daemon repairs it first, under its lock (docs/repair.md)
    if index is not None:
        try:
            check_roots(config, index)
        except Exception as e:
            if not is_damage(e):
                raise
        finally:
            index.close()
    return run_daemon(config, lambda: load_config(args))
