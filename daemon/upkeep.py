"""The daemon's jobs beside the scans: one check of every page of the database per start, the
metrics textfile, and the feed's retention. Each runs as a task of the scheduler with a
connection of its own; damage they meet goes to the scheduler's `note_damage` (a repair)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

from daemon import feed
from daemon.config import Config
from daemon.index import DamagedError, Index, check_file
from daemon.metrics import write_textfile

# Scheduler.note_damage: True when the error was damage and a repair is under way.
NoteDamage = Callable[[BaseException, str], bool]


async def check_database(config: Config, note_damage: NoteDamage, log: Any) -> None:
    """Read every page of the database once per start (SQLite's quick_check), beside the
    scans: damage in pages the daemon itself seldom reads (the feed's older rows, a folder
    never changed) is found and repaired now, not by a consumer's `changes` months later."""
    try:
        problem = await asyncio.to_thread(check_file, config.database)
        if problem is not None:
            raise DamagedError(config.database, problem)
    except Exception as e:
        if not note_damage(e, "start-up check"):
            log.warning("cannot check the database", reason=f"{type(e).__name__}: {e}")


async def write_metrics(config: Config, stop: threading.Event, note_damage: NoteDamage, log: Any) -> None:
    """node_exporter's textfile collector, rewritten atomically every interval."""
    textfile = config.metrics.textfile
    if textfile is None:
        return
    index = await asyncio.to_thread(Index, config.database)
    failing = False
    try:
        while not stop.is_set():
            try:
                await asyncio.to_thread(write_textfile, index, config, textfile)
                failing = False
            except Exception as e:
                if note_damage(e, "metrics"):
                    return
                if not isinstance(e, OSError):
                    raise
                if not failing:  # once per failure streak, not every interval
                    log.warning("cannot write the metrics file", path=str(textfile), reason=str(e))
                failing = True
            await asyncio.sleep(config.metrics.interval_s)
    finally:
        index.close()


async def prune_feed(config: Config, stop: threading.Event, note_damage: NoteDamage, log: Any,
                     hold: Callable[[], tuple[str, int] | None]) -> None:  # fmt: skip
    """The feed's retention ([feed]): what is older than its window, or beyond its row cap,
    goes, in small transactions on a connection of its own (feed.prune)."""
    index = await asyncio.to_thread(Index, config.database)
    try:
        while not stop.is_set():
            try:
                # Rows the catalogue has not taken yet stay past their age (docs/fleet.md).
                removed = await asyncio.to_thread(feed.prune, index, config.feed, hold=hold())
                if removed:
                    log.debug("feed pruned", rows=removed)
            except sqlite3.Error as e:  # busy past the timeout, disk full: next time
                if note_damage(e, "feed retention"):
                    return
                log.warning("cannot prune the change feed", reason=str(e))
            await asyncio.sleep(feed.prune_interval(config.feed))
    finally:
        index.close()
