"""What the commands share: failures and their exit codes, the index they open, paths to roots, output.

Imported by the dispatcher and by every command module, and imports none of them. Every
command pays for its imports: SQLite, json and rich are imported by the functions that use them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from daemon.config import Config, load, locate
from daemon.model import ExitCode, is_within

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeAlias

    from daemon.index import Index, RootRow

    # What a subcommand runs: its parser's `handler` default, called by `cli.main`.
    Handler: TypeAlias = Callable[[argparse.Namespace, Config], int]

# Whatever a caller calls a root: its configuration, its row in the index.
Root = TypeVar("Root")


class Fail(Exception):
    """A command cannot go on: `main` prints the message as one line and exits with the code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise Fail(message, ExitCode.USAGE)


if TYPE_CHECKING:
    # What a command module's `register` adds its subcommands to.
    Subcommands: TypeAlias = argparse._SubParsersAction[Parser]


def load_config(args: argparse.Namespace) -> Config:
    path = locate(args.config, os.environ)
    config = load(path) if path is not None else Config()
    return config.with_overrides(args.db, getattr(args, "root", []))


# What open_index opened, closed by `close_opened` when the command ends.
_OPENED: list[Index] = []


def open_index(config: Config, *, readonly: bool = False, damaged_ok: bool = False) -> Index:
    """The index, or a Fail with its one line; with ``damaged_ok``, a damaged database raises
    DamagedError for the caller to handle (`run` repairs it)."""
    from daemon.index import DamagedError, Index, IndexError_

    try:
        index = Index(config.database, readonly=readonly)
    except DamagedError:
        if damaged_ok:
            raise
        raise Fail(str(sys.exc_info()[1])) from None
    except IndexError_ as e:
        raise Fail(str(e)) from None
    _OPENED.append(index)
    return index


def damaged_database(e: BaseException, database: Path) -> Fail | None:
    """The one line for a damaged database that a command met while reading it (a query that
    reached a broken page), or None when ``e`` is about something else."""
    if "sqlite3" not in sys.modules:
        return None  # nothing opened the index: the error cannot come from it
    from daemon.index import DamagedError, is_damage

    if not is_damage(e):
        return None
    return Fail(str(e if isinstance(e, DamagedError) else DamagedError(database, str(e))))


def close_opened() -> None:
    while _OPENED:
        _OPENED.pop().close()


def split_at_root(path: Path, roots: Mapping[bytes, Root]) -> tuple[Root, bytes] | None:
    """The first of ``roots`` (absolute path -> root) that holds PATH, and PATH relative to it."""
    target = os.fsencode(os.path.normpath(os.path.abspath(path)))
    for root_path, root in roots.items():
        if is_within(target, root_path) or root_path == b"/":
            return root, target[len(root_path) :].lstrip(b"/")
    return None


def indexed_scopes(index: Index, path: Path | None) -> list[tuple[RootRow, bytes]]:
    """(root, relative path) for PATH, or every indexed root."""
    roots = index.roots()
    if path is None:
        return [(r, b"") for r in roots]
    found = split_at_root(path, {r.path: r for r in roots})
    if found is None:
        raise Fail(f"{path}: not inside any indexed root", ExitCode.USAGE)
    return [found]


def human_bytes(size: int) -> str:
    from rich.filesize import decimal  # rich.filesize alone: 3 ms, not the 20 ms of rich's console

    return decimal(size)


def print_json_lines(rows: Iterable[object]) -> None:
    import json

    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row))
        out.write("\n")
