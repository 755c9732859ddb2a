"""What the commands share: exit codes, failures, the index they open, paths, output.

Imported by the dispatcher and by every command module, and imports none of them. Every
command pays for its imports: SQLite, json and rich are imported by the functions that use them.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from daemon.config import Config, load, locate
from daemon.model import ExitCode

if TYPE_CHECKING:
    from daemon.index import Index


class Fail(Exception):
    """A command cannot go on: `main` prints the message as one line and exits with the code."""

    def __init__(self, message: str, code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise Fail(message, ExitCode.USAGE)


def load_config(args: argparse.Namespace) -> Config:
    path = locate(args.config, os.environ)
    config = load(path) if path is not None else Config()
    return config.with_overrides(args.db, getattr(args, "root", []))


# What open_index opened, closed by `close_opened` when the command ends.
_OPENED: list[Index] = []


def open_index(config: Config, *, readonly: bool = False) -> Index:
    from daemon.index import Index, IndexError_

    try:
        index = Index(config.database, readonly=readonly)
    except IndexError_ as e:
        raise Fail(str(e)) from None
    _OPENED.append(index)
    return index


def close_opened() -> None:
    while _OPENED:
        _OPENED.pop().close()


def absolute(path: Path) -> bytes:
    return os.fsencode(os.path.normpath(os.path.abspath(path)))


def human_bytes(size: int) -> str:
    from rich.filesize import decimal  # rich.filesize alone: 3 ms, not the 20 ms of rich's console

    return decimal(size)


def print_json_lines(rows: Iterable[object]) -> None:
    import json

    out = sys.stdout
    for row in rows:
        out.write(json.dumps(row))
        out.write("\n")
