"""The command line's dispatcher: the parser the command modules register into, and `main`.

`main` parses, loads the configuration, runs the chosen command's handler and turns what goes
wrong into one line on stderr and an exit code. The commands live in daemon/commands/, one
module per command or small family; a new command is a new module there, imported below and
added to REGISTER.

Start-up time is part of every command (a one-shot `scan` is measured against `find`): the
command modules import at module level what their parsers need and no more; each handler
imports the modules it uses. rich is imported only to show a progress bar, structlog (and
asyncio) only when something is logged or the daemon runs.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import __version__, logs
from daemon.commands import feed, fleet, query, repair, sync, tools
from daemon.commands.shared import Fail, Parser, close_opened, damaged_database, load_config
from daemon.config import Config, ConfigError
from daemon.model import ExitCode

if TYPE_CHECKING:
    from collections.abc import Callable

    from daemon.commands.shared import Handler, Subcommands

# Each adds its subcommands and their handlers; `treewatch --help` lists them in this order.
REGISTER: tuple[Callable[[Subcommands], None], ...] = (
    sync.register,  # run, scan
    query.register,  # status, ls, check-config
    feed.register,  # changes, snapshot
    tools.register,  # dupes, verify, rebuild
    repair.register,  # repair
    fleet.register,  # replicate, fleet
)


def build_parser() -> Parser:
    p = Parser(prog="treewatch", description="Keep a library index (SQLite) true to a directory tree.")
    p.add_argument(
        "--config", type=Path, help="configuration file (default: $TREEWATCH_CONFIG, /etc/treewatch/config.toml)"
    )
    p.add_argument("--db", type=Path, help="index database (overrides `database` in the configuration)")
    p.add_argument("--version", action="version", version=f"treewatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for register in REGISTER:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    config: Config | None = None
    try:
        args = build_parser().parse_args(argv)
        config = load_config(args)
        logs.configure(config.log.level, lazy=True)  # structlog is imported if something is logged
        handler: Handler = args.handler
        return handler(args, config)
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
    except Exception as e:
        # A query that reached a broken page of the database: one line saying what to do, as
        # at open (Index), never a traceback. Anything else is a bug, and its traceback helps.
        failure = damaged_database(e, config.database) if config is not None else None
        if failure is None:
            raise
        print(f"treewatch: {failure}", file=sys.stderr)
        return failure.code
    finally:
        # The process exits next. The interpreter's exit runs full garbage collections over
        # every object the imports made (~6 ms, a tenth of a `scan` of a small tree); frozen,
        # they are skipped. Close the indexes first: a connection left in a reference cycle
        # would only have been closed (and its WAL checkpointed) by those collections.
        close_opened()
        gc.freeze()
