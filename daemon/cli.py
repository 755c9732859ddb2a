"""The command line: parse, call, render text or JSON, exit codes. No logic of its own.

Start-up time is part of every command (a one-shot `scan` is measured against `find`): this
module imports what parsing needs and no more; each command imports the modules it uses. rich
is imported only to show a progress bar, structlog (and asyncio) only when something is logged
or the daemon runs.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import __version__, logs, tools_cli
from daemon.commands.shared import (
    Fail,
    Parser,
    close_opened,
    human_bytes,
    indexed_scopes,
    load_config,
    open_index,
    print_json_lines,
    split_at_root,
)
from daemon.config import Config, ConfigError
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.config import RootConfig
    from daemon.index import Index
    from daemon.model import ScanScope
    from daemon.scan import ScanReport

# A file that keeps changing while it is hashed is tried again this many times by `scan`.
UNSTABLE_RETRIES = 3
UNSTABLE_PAUSE_S = 1.0


def build_parser() -> Parser:
    p = Parser(prog="treewatch", description="Keep a library index (SQLite) true to a directory tree.")
    p.add_argument(
        "--config", type=Path, help="configuration file (default: $TREEWATCH_CONFIG, /etc/treewatch/config.toml)"
    )
    p.add_argument("--db", type=Path, help="index database (overrides `database` in the configuration)")
    p.add_argument("--version", action="version", version=f"treewatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    run = sub.add_parser("run", help="the daemon, in the foreground")
    run.add_argument("--root", type=Path, action="append", default=[], help="a root to watch (repeatable)")
    s = sub.add_parser("scan", help="one-shot sync of all roots, or of the given subtrees")
    s.add_argument("--root", type=Path, action="append", default=[], help="a root to sync (repeatable)")
    s.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    st = sub.add_parser("status", help="roots, daemon activity and counters")
    st.add_argument("--json", action="store_true")
    st.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    ls = sub.add_parser("ls", help="indexed entries")
    ls.add_argument("path", nargs="?", type=Path, metavar="PATH")
    ls.add_argument("--json", action="store_true", help="JSON lines")
    ch = sub.add_parser("changes", help="the change feed")
    ch.add_argument("--since", type=int, required=True, metavar="SEQ")
    ch.add_argument("--json", action="store_true", help="JSON lines")
    sub.add_parser("check-config", help="validate the configuration and exit")
    tools_cli.add_parsers(sub)  # dupes, verify, rebuild (issue 6)
    return p


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
    for r in reports:
        where = os.fsdecode(r.root)
        if r.busy_pid:
            log.error("root is being scanned by another process", root=where, pid=r.busy_pid)
        if r.offline:
            log.error("root is offline: nothing was deleted", root=where, reason=r.offline)
        if r.device_moved:
            log.warning("root came back with a new device number; same filesystem, adopted", root=where)
        for path, error in sorted(r.errors.items())[:20]:
            log.warning("cannot index", path=os.fsdecode(r.root + b"/" + path), error=error)
        if len(r.errors) > 20:
            log.warning("more entries could not be indexed", root=where, count=len(r.errors) - 20)
        if r.unstable:
            log.warning("files kept changing while hashed", root=where, count=len(r.unstable))
    print(f"treewatch: {summary(reports, time.monotonic() - started)}")
    return ExitCode.OK if all(r.clean for r in reports) else ExitCode.FAILURE


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    index = open_index(config, readonly=True)
    if args.prometheus:
        from daemon import metrics

        sys.stdout.write(metrics.render(index, config))
        return ExitCode.OK
    from daemon import queries

    data = queries.status(index, config)
    if args.json:
        import json

        print(json.dumps(data, indent=2))
        return ExitCode.OK
    d = data["daemon"]
    print("daemon: not running" if d is None else f"daemon: pid {d['pid']}, {d['state']}: {d['activity']}")
    for r in data["roots"]:
        line = f"{r['path']}: {r['state']}"
        if r["offline_reason"]:
            line += f" ({r['offline_reason']})"
        line += f", {r['files']} files, {r['dirs']} folders, {human_bytes(r['bytes'])}"
        line += f", last full sync {r['last_full_sync'] or 'never'}, {r['pending']} pending, {r['overflows']} overflows"
        if r["corrupt"]:
            line += f", {r['corrupt']} corrupt (see `treewatch verify`)"
        print(line)
        if r["scan"]:
            s = r["scan"]
            print(f"  scanning ({s['kind']}, {s['step']}): {s['files_done']}/{s['files_queued']} files")
        for e in r["errors"][:10]:
            print(f"  error: {e['path']}: {e['error']}")
    c = data["counters"]
    scans = ", ".join(f"{n} {k}" for k, n in c["scans"].items())
    print(f"hashed {c['files_hashed']} files, {human_bytes(c['bytes_hashed'])}; scans: {scans}; seq {data['seq']}")
    return ExitCode.OK


def cmd_ls(args: argparse.Namespace, config: Config) -> int:
    from daemon import queries

    index = open_index(config, readonly=True)
    targets = [(root.path, rel) for root, rel in indexed_scopes(index, args.path)]
    rows = queries.listing(index, targets)
    if args.json:
        print_json_lines(rows)
        return ExitCode.OK
    for row in rows:
        digest = (row["blake3"] or "-")[:16]
        print(f"{row['kind']:<7} {row['size']:>12} {digest:<16} {row['path']}")
    return ExitCode.OK


def cmd_changes(args: argparse.Namespace, config: Config) -> int:
    from daemon import queries

    index = open_index(config, readonly=True)
    rows = queries.changes(index, args.since)
    if args.json:
        print_json_lines(rows)
        return ExitCode.OK
    for row in rows:
        old = f" (from {row['old_path']})" if row["old_path"] else ""
        print(f"{row['seq']:>8} {row['op']:<8} {row['path']}{old}")
    return ExitCode.OK


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    roots = ", ".join(str(r.path) for r in config.roots)
    print(f"{config.source}: ok; database {config.database}; roots: {roots or 'none'}")
    return ExitCode.OK


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from daemon.service import run_daemon  # the daemon's imports are not needed by the queries

    index = open_index(config)
    check_roots(config, index)
    index.close()
    return run_daemon(config, lambda: load_config(args))


COMMANDS: dict[str, Any] = {
    "run": cmd_run,
    "scan": cmd_scan,
    "status": cmd_status,
    "ls": cmd_ls,
    "changes": cmd_changes,
    "check-config": cmd_check_config,
}

COMMANDS.update(tools_cli.COMMANDS)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        config = load_config(args)
        logs.configure(config.log.level, lazy=True)  # structlog is imported if something is logged
        code: int = COMMANDS[args.command](args, config)
        return code
    except ConfigError as e:
        print(f"treewatch: {e}", file=sys.stderr)
        return ExitCode.CONFIG
    except Fail as e:
        print(f"treewatch: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # `treewatch ls | head`: the reader left; not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.OK
    except KeyboardInterrupt:
        return 130
    finally:
        # The process exits next. The interpreter's exit runs full garbage collections over
        # every object the imports made (~6 ms, a tenth of a `scan` of a small tree); frozen,
        # they are skipped. Close the indexes first: a connection left in a reference cycle
        # would only have been closed (and its WAL checkpointed) by those collections.
        close_opened()
        gc.freeze()
