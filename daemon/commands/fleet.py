"""`replicate` and `fleet`: this box's index into a PostgreSQL catalogue shared by several boxes,
and the questions asked of all of them at once (docs/fleet.md). Parse, call, render.

The work is in replicator.py (with replica_source.py and catalogue.py) and fleet.py. These are
the only commands that import psycopg, and only in their handlers.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import dupes as box_dupes
from daemon.commands.shared import Fail, Parser, human_bytes, open_index, print_json_lines
from daemon.config import Config, box_problem
from daemon.model import ExitCode

if TYPE_CHECKING:
    import psycopg

    from daemon.commands.shared import Subcommands
    from daemon.replicator import Applied

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _box(text: str) -> str:
    problem = box_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _since(text: str) -> datetime:
    """A time: ISO 8601 (`2026-12-01`, `2026-12-01T08:00`, with or without an offset; without
    one, local time), or how long ago (`90m`, `12h`, `7d`, `2w`)."""
    now = datetime.now().astimezone()
    found = _DURATION.fullmatch(text.strip())
    if found:
        return now - timedelta(seconds=float(found.group(1)) * _UNITS[found.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a time (2026-12-01, 2026-12-01T08:00) nor a duration ago (90m, 12h, 7d, 2w)"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def register(sub: Subcommands) -> None:
    r = sub.add_parser("replicate", help="bring a fleet catalogue (PostgreSQL) up to date with this box's index")
    r.add_argument("--to", required=True, metavar="URL",
                   help="the catalogue: postgresql://user@host/db or 'host=/run/postgresql dbname=x'")  # fmt: skip
    r.add_argument(
        "--box", type=_box, metavar="NAME", help="this box's name there (default: [replicate] box, the host name)"
    )
    r.add_argument("--follow", action="store_true", help="then keep it up to date, until SIGINT or SIGTERM")
    r.set_defaults(handler=cmd_replicate)

    f = sub.add_parser("fleet", help="ask every box at once, through the catalogue")
    f.add_argument("--pg", metavar="URL", help="the catalogue (default: [replicate] url)")
    questions = f.add_subparsers(dest="question", required=True, parser_class=Parser)
    ls = questions.add_parser("ls", help="entries of every box")
    ls.add_argument("path", nargs="?", type=Path, metavar="PATH", help="only what lies at or below PATH")
    ls.add_argument("--box", type=_box, metavar="NAME", help="only this box")
    ls.add_argument("--json", action="store_true", help='JSON lines, as `ls --json` with "box"')
    ls.set_defaults(handler=cmd_fleet_ls)
    d = questions.add_parser("dupes", help="the same content on several inodes or boxes")
    d.add_argument("--min-size", type=int, default=box_dupes.DEFAULT_MIN_SIZE, metavar="BYTES",
                   help=f"ignore files smaller than this (default {box_dupes.DEFAULT_MIN_SIZE})")  # fmt: skip
    d.add_argument("--only-on-one-box", action="store_true",
                   help="instead: contents with no copy on another box (what nothing backs up)")  # fmt: skip
    d.add_argument("--box", type=_box, metavar="NAME", help="only groups with a copy on this box")
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=cmd_fleet_dupes)
    c = questions.add_parser("changes", help="what changed on any box since a time")
    c.add_argument("--since", type=_since, required=True, metavar="TIME",
                   help="2026-12-01, 2026-12-01T08:00+01:00, or a duration ago: 90m, 12h, 7d, 2w")  # fmt: skip
    c.add_argument("--box", type=_box, metavar="NAME", help="only this box")
    c.add_argument("--json", action="store_true", help='JSON lines, as `changes --json` with "box", "epoch", "at"')
    c.set_defaults(handler=cmd_fleet_changes)
    s = questions.add_parser("status", help="each box: its feed position in the catalogue, entries, bytes")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=cmd_fleet_status)


# --- replicate ---------------------------------------------------------------------------------


def cmd_replicate(args: argparse.Namespace, config: Config) -> int:
    import signal
    import threading

    from daemon.catalogue import CatalogueError, connect, migrate, redact
    from daemon.index import IndexError_
    from daemon.replicator import Replicator

    box = args.box or config.replicate.box_name()
    if (problem := box_problem(box)) is not None:
        raise Fail(f"the host name cannot name this box: {problem}; give one with --box", ExitCode.USAGE)
    shown = redact(args.to)
    open_index(config, readonly=True)  # a missing or foreign database is said before the catalogue is touched

    def say(applied: Applied) -> None:
        if applied.action != "none" or not args.follow:
            print(f"treewatch: box {box} -> {shown}: {_describe(applied)}", flush=True)

    # SIGTERM (systemd, kill) ends a follower as SIGINT does: what is in flight rolls back, exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    replicator = None
    try:
        conn = connect(args.to, application=f"treewatch replicate {box}")
        try:
            migrate(conn, args.to)
            replicator = Replicator(conn, args.to, box, config.database)
            say(replicator.catch_up())
            if args.follow:
                replicator.follow(threading.Event(), say, keep_s=config.feed.retention_s)
        finally:
            if replicator is not None:
                replicator.close()
            conn.close()
    except (CatalogueError, IndexError_) as e:
        raise Fail(str(e)) from None
    except KeyboardInterrupt:
        return ExitCode.OK if args.follow else 130
    return ExitCode.OK


def _describe(applied: Applied) -> str:
    at = f"epoch {applied.epoch}, seq {applied.seq}"
    why = {"new": "a new box", "epoch": "a new epoch: the box's database was rebuilt",
           "expired": "its feed no longer holds what the catalogue lacked",
           "ahead": "the catalogue was ahead of the box"}  # fmt: skip
    if applied.action == "snapshot":
        reason = why.get(applied.reason or "", applied.reason or "")
        return f"loaded a snapshot of {applied.rows} entries ({reason}) at {at} in {applied.seconds:.1f} s"
    if applied.action == "stream":
        return f"applied {applied.rows} changes up to {at} in {applied.seconds:.1f} s"
    return f"up to date at {at}"


# --- fleet -------------------------------------------------------------------------------------


class _Catalogue:
    """The catalogue a `fleet` question reads, opened and checked; failures become one line."""

    def __init__(self, args: argparse.Namespace, config: Config) -> None:
        url = args.pg if args.pg is not None else config.replicate.url
        if url is None:
            raise Fail("fleet: which catalogue? Give --pg URL (or set [replicate] url)", ExitCode.USAGE)
        self.url = url

    def __enter__(self) -> psycopg.Connection[Any]:
        from daemon.catalogue import CatalogueError, check, connect

        try:
            self.conn = connect(self.url, application="treewatch fleet")
            check(self.conn, self.url)
        except CatalogueError as e:
            raise Fail(str(e)) from None
        return self.conn

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        import psycopg

        from daemon.catalogue import reason, redact

        self.conn.close()
        if isinstance(error, psycopg.Error):
            raise Fail(f"catalogue {redact(self.url)}: {reason(error, self.url)}") from None


def cmd_fleet_ls(args: argparse.Namespace, config: Config) -> int:
    from daemon import fleet

    path = None if args.path is None else os.fsencode(os.path.normpath(os.path.abspath(args.path)))
    with _Catalogue(args, config) as conn:
        if path is not None and not fleet.scopes(conn, path, args.box):
            raise Fail(f"{args.path}: not inside any root of {'box ' + args.box if args.box else 'any box'}",
                       ExitCode.USAGE)  # fmt: skip
        rows = fleet.listing(conn, path, args.box)
        if args.json:
            print_json_lines(rows)
            return ExitCode.OK
        for row in rows:
            digest = (row["blake3"] or "-")[:16]
            print(f"{row['box']:<12} {row['kind']:<7} {row['size']:>12} {digest:<16} {row['path']}")
    return ExitCode.OK


def cmd_fleet_dupes(args: argparse.Namespace, config: Config) -> int:
    from daemon import fleet

    if args.min_size < 0:
        raise Fail("--min-size must be zero or more", ExitCode.USAGE)
    with _Catalogue(args, config) as conn:
        report = fleet.dupes(conn, args.min_size, only_on_one_box=args.only_on_one_box, box=args.box)
    if args.json:
        import json

        groups = [
            {"size": g.size, "blake3": g.blake3.hex(), "wasted_bytes": g.wasted, "boxes": g.boxes,
             "copies": [{"box": c.box, "dev": c.dev, "inode": c.inode, "paths": [os.fsdecode(p) for p in c.paths]}
                        for c in g.copies]}
            for g in report.groups
        ]  # fmt: skip
        print(json.dumps({"groups": groups, "reclaimable_bytes": report.reclaimable}))
        return ExitCode.OK
    out = sys.stdout
    for g in report.groups:
        where = ", ".join(g.boxes)
        out.write(f"{len(g.copies)} {'copy' if len(g.copies) == 1 else 'copies'} of {human_bytes(g.size)} on {where}"
                  f" (blake3 {g.blake3.hex()[:16]})\n")  # fmt: skip
        for c in g.copies:
            out.write(f"  {c.box}: {os.fsdecode(c.paths[0])}\n")
            for link in c.paths[1:]:
                out.write(f"  {c.box}:   = {os.fsdecode(link)} (hard link)\n")
    n = len(report.groups)
    if args.only_on_one_box:
        total = sum(g.size for g in report.groups)
        print(f"treewatch: {n} content{'s' if n != 1 else ''} on one box only, {human_bytes(total)}")
    else:
        print(f"treewatch: {n} duplicate group{'s' if n != 1 else ''}, "
              f"{human_bytes(report.reclaimable)} reclaimable with a copy kept on each box")  # fmt: skip
    return ExitCode.OK


def cmd_fleet_changes(args: argparse.Namespace, config: Config) -> int:
    from daemon import fleet

    with _Catalogue(args, config) as conn:
        rows = fleet.changes(conn, args.since, args.box)
        if args.json:
            print_json_lines(rows)
            return ExitCode.OK
        for row in rows:
            old = f" (from {row['old_path']})" if row["old_path"] else ""
            print(f"{row['at'][:19]} {row['box']:<12} {row['op']:<8} {row['path']}{old}")
    return ExitCode.OK


def cmd_fleet_status(args: argparse.Namespace, config: Config) -> int:
    from daemon import fleet

    with _Catalogue(args, config) as conn:
        boxes = fleet.status(conn)
    if args.json:
        import json

        print(json.dumps({"boxes": boxes}, indent=2))
        return ExitCode.OK
    for b in boxes:
        print(f"{b['box']}: {b['entries']} entries, {human_bytes(b['bytes'])}; epoch {b['epoch']}, seq {b['seq']},"
              f" applied {b['applied_at']}")  # fmt: skip
    if not boxes:
        print("treewatch: no box has replicated to this catalogue yet")
    return ExitCode.OK
