"""The library tools' commands (`dupes`, `verify`, `rebuild`): parse, call, render. No logic.

The work is in dupes.py, verify.py and rebuild.py. daemon.dupes is imported here for its
default (it imports no SQLite); the others by the command that uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon import dupes
from daemon.commands.shared import Fail, human_bytes, indexed_scopes, open_index
from daemon.config import Config
from daemon.model import ExitCode

if TYPE_CHECKING:
    import threading

    from daemon import verify
    from daemon.commands.shared import Subcommands
    from daemon.index import Index

MB = 1_000_000  # --max-rate is in MB/s, decimal like the progress display


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero")
    return value


def _size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bytes") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more")
    return value


def register(sub: Subcommands) -> None:
    d = sub.add_parser("dupes", help="groups of files with the same content (hard links count once)")
    d.add_argument("path", nargs="?", type=Path, metavar="PATH", help="only what lies under PATH")
    d.add_argument("--min-size", type=_size, default=dupes.DEFAULT_MIN_SIZE, metavar="BYTES",
                   help=f"ignore files smaller than this (default {dupes.DEFAULT_MIN_SIZE})")  # fmt: skip
    d.add_argument("--json", action="store_true")
    d.set_defaults(handler=cmd_dupes)
    v = sub.add_parser("verify", help="re-hash unchanged files and report silent corruption (exit 1 when found)")
    v.add_argument("path", nargs="?", type=Path, metavar="PATH", help="only what lies under PATH")
    v.add_argument("--max-rate", type=_positive_number, metavar="MB/s", help="read at most this many MB per second")
    v.add_argument("--json", action="store_true")
    v.add_argument("--accept", type=Path, metavar="PATH",
                   help="accept the current content of the corrupt-marked file(s) at or below PATH")  # fmt: skip
    v.set_defaults(handler=cmd_verify)
    r = sub.add_parser("rebuild", help="re-derive what an upgrade changed (a new hash scheme), resumable")
    r.add_argument("--json", action="store_true")
    r.set_defaults(handler=cmd_rebuild)


@contextlib.contextmanager
def stopping() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM stop the work at the next file, so its progress is saved."""
    import signal
    import threading

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _when(ns: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds")


def cmd_dupes(args: argparse.Namespace, config: Config) -> int:
    index = open_index(config, readonly=True)
    chosen = [] if args.path is None else [(r.id, rel) for r, rel in indexed_scopes(index, args.path)]
    report = dupes.find(index, args.min_size, chosen)
    if args.json:
        import json

        groups = [
            {"size": g.size, "blake3": g.blake3.hex(), "wasted_bytes": g.wasted,
             "copies": [{"dev": c.dev, "inode": c.inode, "paths": [os.fsdecode(p) for p in c.paths]}
                        for c in g.copies]}
            for g in report.groups
        ]  # fmt: skip
        print(json.dumps({"groups": groups, "reclaimable_bytes": report.reclaimable}))
        return ExitCode.OK
    out = sys.stdout
    for g in report.groups:
        out.write(f"{len(g.copies)} copies of {human_bytes(g.size)}, {human_bytes(g.wasted)} wasted"
                  f" (blake3 {g.blake3.hex()[:16]})\n")  # fmt: skip
        for c in g.copies:
            out.write(f"  {os.fsdecode(c.paths[0])}\n")
            for link in c.paths[1:]:
                out.write(f"    = {os.fsdecode(link)} (hard link)\n")
    n = len(report.groups)
    print(f"treewatch: {n} duplicate group{'s' if n != 1 else ''}, {human_bytes(report.reclaimable)} reclaimable")
    return ExitCode.OK


def _finding(f: verify.Finding) -> dict[str, Any]:
    return {"path": os.fsdecode(f.path), "old_blake3": f.old_blake3.hex(), "new_blake3": f.new_blake3.hex(),
            "size": f.size, "mtime_ns": f.mtime_ns}  # fmt: skip


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    from daemon import verify
    from daemon.progress import ScanProgress

    index = open_index(config)
    if args.accept is not None:
        if args.path is not None:
            raise Fail("give either PATH (to verify) or --accept PATH, not both", ExitCode.USAGE)
        return _accept(args, index)
    with stopping() as stop, ScanProgress(enabled=sys.stderr.isatty() and not args.json) as progress:
        rate = args.max_rate * MB if args.max_rate else None
        report = verify.verify(index, indexed_scopes(index, args.path), max_rate=rate, progress=progress, stop=stop)
    code = ExitCode.FAILURE if report.corrupt or report.errors or report.interrupted else ExitCode.OK
    if args.json:
        import json

        print(json.dumps({
            "checked": report.checked, "checked_bytes": report.checked_bytes, "skipped": report.skipped,
            "cleared": report.cleared, "resumed": report.resumed, "interrupted": report.interrupted,
            "seconds": round(report.seconds, 3), "found": [_finding(f) for f in report.found],
            "corrupt": [_finding(f) for f in report.corrupt],
            "errors": [{"path": os.fsdecode(p), "error": e} for p, e in sorted(report.errors.items())],
            "offline": [os.fsdecode(p) for p in report.offline],
        }))  # fmt: skip
        return code
    for f in report.corrupt:
        print(f"CORRUPT {os.fsdecode(f.path)}: {f.size} bytes, mtime {_when(f.mtime_ns)},"
              f" indexed blake3 {f.old_blake3.hex()}, now {f.new_blake3.hex()}")  # fmt: skip
    for p, e in sorted(report.errors.items()):
        print(f"error {os.fsdecode(p)}: {e}", file=sys.stderr)
    for p in report.offline:
        print(f"offline, not verified: {os.fsdecode(p)}", file=sys.stderr)
    rate = f" at {human_bytes(int(report.checked_bytes / report.seconds))}/s" if report.seconds > 0 else ""
    parts = [
        f"verified {report.checked} files, {human_bytes(report.checked_bytes)} in {report.seconds:.1f} s{rate}"
        + (" (resumed)" if report.resumed else ""),
        f"{report.skipped} skipped (changed since indexed: the next scan re-hashes them)",
        f"{len(report.corrupt)} corrupt" + (f" ({len(report.found)} new)" if report.found else ""),
    ]
    if report.interrupted:
        parts.append("interrupted: run it again to continue")
    print(f"treewatch: {'; '.join(parts)}")
    if report.corrupt:
        print("treewatch: `treewatch verify --accept PATH` accepts a file's new content", file=sys.stderr)
    return code


def _accept(args: argparse.Namespace, index: Index) -> int:
    from daemon import verify

    chosen = indexed_scopes(index, args.accept)
    try:
        accepted = [a for root, rel in chosen for a in verify.accept(index, root, rel)]
    except verify.VerifyError as e:
        raise Fail(str(e)) from None
    if args.json:
        import json

        print(json.dumps({"accepted": [
            {"path": os.fsdecode(a.path), "old_blake3": a.old_blake3.hex(), "new_blake3": a.new_blake3.hex(),
             "seq": a.seq} for a in accepted]}))  # fmt: skip
        return ExitCode.OK
    for a in accepted:
        print(f"accepted {os.fsdecode(a.path)}: blake3 {a.new_blake3.hex()} (was {a.old_blake3.hex()}), seq {a.seq}")
    return ExitCode.OK


def cmd_rebuild(args: argparse.Namespace, config: Config) -> int:
    from daemon import rebuild
    from daemon.progress import ScanProgress

    index = open_index(config)
    started = time.monotonic()
    with stopping() as stop, ScanProgress(enabled=sys.stderr.isatty() and not args.json) as progress:
        report = rebuild.rebuild(index, config.sync.batch_size, stop, progress, workers=config.sync.hash_workers)
    code = ExitCode.FAILURE if report.errors or report.corrupt or report.interrupted else ExitCode.OK
    if args.json:
        import json

        print(json.dumps({
            "needed": report.needed, "rebuilt": report.rebuilt, "rebuilt_bytes": report.rebuilt_bytes,
            "skipped": report.skipped, "corrupt": [os.fsdecode(p) for p in report.corrupt],
            "errors": [{"path": os.fsdecode(p), "error": e} for p, e in sorted(report.errors.items())],
            "resumed": report.resumed, "interrupted": report.interrupted, "seconds": round(report.seconds, 3),
        }))  # fmt: skip
        return code
    for p in report.corrupt:
        print(f"CORRUPT {os.fsdecode(p)}: content changed under an unchanged size and mtime (see `verify`)")
    for p, e in sorted(report.errors.items()):
        print(f"error {os.fsdecode(p)}: {e}", file=sys.stderr)
    parts = [
        f"rebuilt {report.rebuilt} of {report.needed} files, {human_bytes(report.rebuilt_bytes)}"
        f" in {time.monotonic() - started:.1f} s" + (" (resumed)" if report.resumed else ""),
        f"{report.skipped} skipped (changed, missing or offline: the next scan re-hashes them)",
    ]
    if report.interrupted:
        parts.append("interrupted: run it again to continue")
    print(f"treewatch: {'; '.join(parts)}")
    return code
