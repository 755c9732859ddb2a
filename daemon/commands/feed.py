"""`changes` and `snapshot`: the change feed, as a contract a program can follow for years.

A consumer stores (epoch, seq). `changes --since SEQ --epoch E` gives it what came after, or,
when its cursor means nothing here any more (another database, pruned past it, ahead of this
one), one line saying so and exit 3: it then loads `snapshot` and follows from there.
docs/feed.md is the contract; daemon/feed.py does the work.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Any

from daemon.commands.shared import Fail, open_index, print_json_lines
from daemon.config import Config
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.commands.shared import Subcommands
    from daemon.feed import FeedState


def _not_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more")
    return value


def register(sub: Subcommands) -> None:
    ch = sub.add_parser("changes", help="the change feed after SEQ (exit 3: the cursor means nothing here)")
    ch.add_argument("--since", type=_not_negative, required=True, metavar="SEQ")
    ch.add_argument("--epoch", metavar="E", help="the feed's epoch the cursor belongs to (status --json: feed.epoch)")
    ch.add_argument("--json", action="store_true", help="JSON lines")
    ch.add_argument("--follow", action="store_true", help="then print each change as it is committed")
    ch.add_argument("--null", action="store_true",
                    help="the files added, modified or renamed since SEQ, once each, NUL-terminated")  # fmt: skip
    ch.add_argument("--limit", type=_not_negative, metavar="N", help="at most N changes")
    ch.set_defaults(handler=cmd_changes)
    sn = sub.add_parser("snapshot", help="every entry, read at one position of the feed (epoch, seq)")
    sn.add_argument("--json", action="store_true", help="JSON lines: {epoch, seq}, then one line per entry")
    sn.set_defaults(handler=cmd_snapshot)


def cmd_changes(args: argparse.Namespace, config: Config) -> int:
    if args.null and (args.json or args.follow or args.limit is not None):
        raise Fail("--null lists each changed file once: it takes neither --json, --follow nor --limit", ExitCode.USAGE)
    if args.follow and args.limit is not None:
        raise Fail("--follow prints every change from SEQ on: it takes no --limit", ExitCode.USAGE)
    from daemon import feed, queries

    index = open_index(config, readonly=True)
    state = feed.state(index)
    reset = feed.cursor_reset(state, args.since, args.epoch)
    if reset is not None:
        return _reset(reset, state, args.json)
    if args.null:
        out = sys.stdout.buffer
        for path in feed.changed_files(index, args.since):
            out.write(path + b"\0")
        return ExitCode.OK
    if not args.follow:
        rows = queries.changes(index, args.since)
        if args.limit is not None:
            rows = (row for _, row in zip(range(args.limit), rows, strict=False))
        _print(rows, args.json)
        return ExitCode.OK

    def emit(batch: list[tuple[Any, ...]]) -> None:
        _print((queries.change_json(row) for row in batch), args.json)
        sys.stdout.flush()

    # SIGTERM (systemd, kill) ends a follower as SIGINT does: cleanly, exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import threading

    try:
        reset = feed.follow(index.path, args.since, state.epoch, emit, threading.Event())
    except KeyboardInterrupt:
        return ExitCode.OK
    if reset is not None:
        return _reset(reset, feed.state(open_index(config, readonly=True)), args.json)
    return ExitCode.OK


def _print(rows: Any, as_json: bool) -> None:
    if as_json:
        print_json_lines(rows)
        return
    for row in rows:
        old = f" (from {row['old_path']})" if row["old_path"] else ""
        print(f"{row['seq']:>8} {row['op']:<8} {row['path']}{old}")


_RESET_TEXT = {
    "epoch": "belongs to another database (epoch {cursor}); this one's epoch is {epoch}",
    "expired": "is older than what the feed still holds (from seq {oldest} on; retention pruned the rest)",
    "ahead": "is beyond this feed's last seq ({seq}): the database is older than the cursor (restored?)",
}


def _reset(reason: str, state: FeedState, as_json: bool) -> int:
    """The cursor means nothing here: say so, once, and exit 3; nothing of the feed is printed."""
    if as_json:
        print_json_lines([{"reset": reason, **state.as_json()}])
    else:
        what = _RESET_TEXT[reason].format(cursor="given", epoch=state.epoch, oldest=state.oldest_seq, seq=state.seq)
        print(f"treewatch: the cursor {what}. Load `treewatch snapshot --json` and follow from its "
              f"epoch and seq ({state.epoch}, {state.seq}).", file=sys.stderr)  # fmt: skip
    return ExitCode.RESET


def cmd_snapshot(args: argparse.Namespace, config: Config) -> int:
    from daemon import feed, queries

    index = open_index(config, readonly=True)
    lines = feed.snapshot(index, lambda i: queries.listing(i, [(r.path, b"") for r in i.roots()]))
    if args.json:
        print_json_lines(lines)
        return ExitCode.OK
    header = next(lines)
    print(f"# epoch {header['epoch']}, seq {header['seq']}")
    for row in lines:
        digest = (row["blake3"] or "-")[:16]
        print(f"{row['kind']:<7} {row['size']:>12} {digest:<16} {row['path']}")
    return ExitCode.OK
