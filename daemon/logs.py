"""structlog configuration: journald with structured fields under systemd, a readable console on a TTY.

Log calls name their subject with plain keys (``root=``, ``path=``, ``scope=``, ``reason=``);
the journald renderer turns them into ``TREEWATCH_ROOT``, ``TREEWATCH_PATH``... fields, so
`journalctl TREEWATCH_ROOT=/srv/photos` finds everything about one root. Events an admin
alerts on carry a stable ``MESSAGE_ID`` (sd-id128), as systemd's catalog does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

# structlog (and with it asyncio, logging and rich) takes ~60 ms to import: a CLI command that
# logs nothing must not pay for it. It is imported by `configure`, and `configure(lazy=True)`
# puts even that off until the first log call (see `get`).

# logging.DEBUG, INFO, WARNING, ERROR: the numbers, so that this module does not import logging.
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# syslog priorities, as journald expects them in PRIORITY=.
PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


class MessageId:
    """Stable ids (made once with `systemd-id128 new`) for the events an admin alerts on."""

    OVERFLOW = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b01"
    WATCH_LIMIT = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b02"
    ROOT_OFFLINE = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b03"
    ROOT_ONLINE = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b04"
    FULL_SYNC_FINISHED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b05"
    SCAN_ERROR = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b06"
    STARTED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b07"
    STOPPED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b08"
    ROUND_LATE = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b09"
    WORKER_ENDED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0a"
    DAMAGED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0b"
    REPAIRED = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0c"
    VOLUME_OFFLINE = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0d"
    VOLUME_ONLINE = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0e"
    CATALOGUE_DOWN = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0f"
    CATALOGUE_BACK = "5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b10"


class JournalRenderer:
    """The last processor: sends one journal entry per log call and returns nothing to print."""

    def __init__(self, identifier: str = "treewatch") -> None:
        from systemd import journal

        # sendv, not send: send() takes MESSAGE only as str (see _raw) and adds CODE_FILE/LINE,
        # which would always name this renderer.
        self.sendv = journal.sendv
        self.identifier = identifier

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        message = str(event.pop("event", ""))
        level = str(event.pop("level", method))
        event.pop("timestamp", None)
        fields: dict[str, str | bytes] = {
            "PRIORITY": str(PRIORITIES.get(level, 6)),
            "SYSLOG_IDENTIFIER": self.identifier,
        }
        message_id = event.pop("message_id", None)
        if message_id:
            fields["MESSAGE_ID"] = message_id
        details = []
        for key, value in event.items():
            text = os.fsdecode(value) if isinstance(value, bytes) else str(value)
            fields[f"TREEWATCH_{key.upper()}"] = _raw(text)
            details.append(f"{key}={text}")
        # The journal's MESSAGE is what `journalctl -u treewatch` shows: keep the facts in it too.
        fields["MESSAGE"] = _raw(f"{message}: {' '.join(details)}" if details else message)
        self.sendv(*(k.encode() + b"=" + (v if isinstance(v, bytes) else v.encode()) for k, v in fields.items()))
        return ""


def _raw(text: str) -> bytes:
    """The bytes journald stores. Paths reach here os.fsdecode'd: a name that is not UTF-8 holds
    lone surrogates, which journal.send cannot encode (it raised UnicodeEncodeError and the log
    call failed in the caller); os.fsencode gives back the exact bytes on disk."""
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate that no file name produced: keep it visible
        return text.encode("utf-8", "backslashreplace")


def _plain_values(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop empty values; paths arrive as bytes and are shown as os.fsdecode'd text."""
    return {k: os.fsdecode(v) if isinstance(v, bytes) else v for k, v in event.items() if v is not None}


# The settings of a `configure(lazy=True)` not applied yet (empty: none).
_pending: dict[str, Any] = {}


def configure(level: str = "info", *, journald: bool = False, stream: TextIO | None = None, lazy: bool = False) -> None:
    """Journald when asked (the daemon under systemd), else console on a TTY, else key=value lines.

    ``lazy``: only note the settings; the first call of a logger from `get` applies them (the
    CLI's one-shot commands, which mostly log nothing).
    """
    _pending.clear()
    if lazy:
        _pending.update(level=level, journald=journald, stream=stream)
        return
    import structlog

    out = stream or sys.stderr
    processors: list[Any] = [structlog.processors.add_log_level, _plain_values]
    # log.exception() leaves only exc_info=True in the event: without this the journal got
    # TREEWATCH_EXC_INFO=True and no traceback at all. (ConsoleRenderer formats it itself.)
    if journald or not out.isatty():
        processors.append(structlog.processors.format_exc_info)
    if journald:
        processors.append(JournalRenderer())
        factory: Any = structlog.ReturnLoggerFactory()
    else:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=False))
        if out.isatty():
            processors.append(structlog.dev.ConsoleRenderer(colors=True))
        else:
            processors.append(structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]))
        factory = structlog.PrintLoggerFactory(out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except OSError:
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class _Deferred:
    """What `get` returns while a lazy `configure` is pending: structlog's logger, configured
    (and imported) by its first call."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if _pending:
            configure(**_pending)
        if self._logger is None:
            self._logger = get(self._name)
        return getattr(self._logger, attr)


def get(name: str = "treewatch") -> Any:
    if _pending:
        return _Deferred(name)
    import structlog

    return structlog.get_logger(name)


# What watchdog 7.1.0 logs through the standard `logging` module, which nothing here configures:
# Python's last-resort handler prints such records bare on stderr, so they reached the journal as
# lines without priority or fields, and a `changes --follow` ended by its reader printed one.
# Each is either said better by treewatch itself or is no trouble at all:
_WATCHDOG_SAID_BETTER = {
    # inotify_c.py:345: the watcher logs the overflow itself, with MESSAGE_ID OVERFLOW and the
    # sysctl to raise (watch.py); a follower looks again within FOLLOW_SAFETY_S (feed.py).
    "Inotify queue overflowed; filesystem events were lost",
    # inotify.py:468 and :475: an emitter stopped while its read returned an event. The event
    # belongs to a session being thrown away: the daemon's next session starts with a scan, and
    # a follower that is stopping has nothing more to wake.
    "InotifyEmitter.queue_events() called when the thread is inactive",
}


def _not_said_better(record: Any) -> bool:
    return not (isinstance(record.msg, str) and record.msg in _WATCHDOG_SAID_BETTER)


def quiet_watchdog() -> None:
    """Drop watchdog's log records that treewatch says better itself or that mean nothing; any
    other record still reaches stderr. Called where watchdog is started; adding the same filter
    twice is a no-op (logging.Filterer.addFilter)."""
    import logging

    # A logger's filters see only the records logged on it, not those of its children.
    for name in ("watchdog.observers.inotify", "watchdog.observers.inotify_c"):
        logging.getLogger(name).addFilter(_not_said_better)


class Throttle:
    """One line per ``every_s`` for an event that can repeat every few seconds (an inotify
    queue overflowing through a storm of a million events): the first is logged, the rest are
    counted and the count goes with the next line logged. Takes the (monotonic) clock as a value."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.told_at: float | None = None
        self.untold = 0

    def tell(self, now: float) -> int | None:
        """How many went unlogged since the last line, when this one is to be logged; else None."""
        if self.told_at is not None and now - self.told_at < self.every_s:
            self.untold += 1
            return None
        untold, self.told_at, self.untold = self.untold, now, 0
        return untold
