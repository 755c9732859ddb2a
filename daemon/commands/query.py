"""`status`, `ls`, `check-config`: what the index and the configuration say, as text or JSON.

Read-only. The queries are in queries.py and metrics.py; rendering them is all that is done here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.commands.shared import human_bytes, indexed_scopes, open_index, print_json_lines
from daemon.config import Config
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.commands.shared import Subcommands


def register(sub: Subcommands) -> None:
    st = sub.add_parser("status", help="roots, daemon activity and counters")
    st.add_argument("--json", action="store_true")
    st.add_argument("--prometheus", action="store_true", help="Prometheus text exposition format")
    st.set_defaults(handler=cmd_status)
    ls = sub.add_parser("ls", help="indexed entries")
    ls.add_argument("path", nargs="?", type=Path, metavar="PATH")
    ls.add_argument("--json", action="store_true", help="JSON lines")
    ls.set_defaults(handler=cmd_ls)
    sub.add_parser("check-config", help="validate the configuration and exit").set_defaults(handler=cmd_check_config)


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
        for v in r["volumes"]:
            why = f" ({v['offline_reason']}; nothing below it is deleted)" if v["offline_reason"] else ""
            print(f"  volume {v['path']}: {v['state']}{why}, {v['fs_type']} {v['source']}, {v['entries']} entries")
        if r["scan"]:
            s = r["scan"]
            print(f"  scanning ({s['kind']}, {s['step']}): {s['files_done']}/{s['files_queued']} files")
        for e in r["errors"][:10]:
            print(f"  error: {e['path']}: {e['error']}")
    c = data["counters"]
    scans = ", ".join(f"{n} {k}" for k, n in c["scans"].items())
    print(f"hashed {c['files_hashed']} files, {human_bytes(c['bytes_hashed'])}; scans: {scans}; seq {data['seq']}")
    f = data["feed"]
    print(f"feed: epoch {f['epoch']}, seq {f['seq']}, oldest held {f['oldest_seq']}")
    r = data["replicate"]
    if r is not None:
        held = "nothing yet" if r["applied_seq"] is None else f"seq {r['applied_seq']}"
        line = f"replicate: box {r['box']} to {r['url']}: {held}, lag {r['lag']}"
        line += f", last ok {r['last_ok'] or 'never'}"
        if r["error"]:
            line += f"; failing: {r['error']}"
        print(line)
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


def cmd_check_config(args: argparse.Namespace, config: Config) -> int:
    roots = ", ".join(str(r.path) for r in config.roots)
    print(f"{config.source}: ok; database {config.database}; roots: {roots or 'none'}")
    return ExitCode.OK
