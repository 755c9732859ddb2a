"""Watchdog's inotify observer → the asyncio loop; overflow, watch-limit and dead-thread detection.

One :class:`RootWatcher` per root. Its observer threads map watchdog's events to
:class:`WatchEvent`\\ s and hand each one to the loop with ``call_soon_threadsafe``; the sink
always runs on the loop thread. Nothing that goes wrong with the watches is silent: a queue
overflow, a folder that could not be watched, a root that disappears and a watchdog thread
that dies each become an event, and the watcher falls back to polling (the scheduler's own
no-change sync; no watchdog ``PollingObserver``, watchdog #878) and retries inotify with
backoff. Why and how: ``docs/overflow.md``.

watchdog hides two of these from event handlers, so this module reaches into its inotify
internals: small subclasses of ``InotifyWatchGroup``, ``InotifyEmitter``, ``InotifyFD`` and
the observer, checked against watchdog 7.1 (see ``_check_watchdog``). The line numbers in the
comments are those of watchdog 7.1.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import watchdog.version
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver, EventQueue, ObservedWatch
from watchdog.observers.inotify import InotifyEmitter, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent, InotifyFD, Mask, WatchDescriptor
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent

from daemon.config import RootConfig, WatchConfig
from daemon.events import EventKind, RootPaths, WatchEvent, map_event
from daemon.filters import Excluder
from daemon.fs import fs_type
from daemon.rules import uses_polling

# The watchdog releases whose internals this module was read against and tested with. A patch
# release may rewrite them: 7.1.1 replaced the path maps by a tree of nodes, and with this
# module's overrides on it the daemon placed its watches and then never saw an event.
CHECKED_WATCHDOG = ((7, 1, 0),)
RETRY_BASE_S = 60.0  # first inotify retry after a fallback to polling...
RETRY_MAX_S = 3600.0  # ...doubling up to this (syncthing #5731, #6228: never spin on retries)
# A folder that vanished or that we may not read between listing and watching is not a folder
# we meant to watch (the scanner reports unreadable ones); any other failure is a shortfall.
_NOT_MEANT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ESTALE})
_ROOT_GONE_MASK = InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_MOVE_SELF | InotifyConstants.IN_UNMOUNT
PROC_INOTIFY = "/proc/sys/fs/inotify/"
PROC_USERNS_WATCHES = "/proc/sys/user/max_inotify_watches"


def _check_watchdog() -> None:
    """Refuse to run on a watchdog whose inotify internals were not read and tested here.

    Overflow (IN_Q_OVERFLOW) never reaches an event handler: watchdog up to 6.x dropped every
    wd == -1 event in ``read_events`` (watchdog #654); 7.1 passes it to
    ``InotifyWatchGroup.on_queue_overflow`` only, which re-adds the watches and logs a warning
    (inotify_c.py:336-348, inotify.py:212-225). And a watch that fails below the root is
    swallowed (inotify.py:357-372). Both are caught by overriding those private methods, so a
    new release, even a patch release, must be read again before it is trusted with a NAS's index.
    """
    found = (watchdog.version.VERSION_MAJOR, watchdog.version.VERSION_MINOR, watchdog.version.VERSION_BUILD)
    needed = ("on_queue_overflow", "on_event", "on_watch_deleted", "_add_callback", "_add_all_callbacks")
    missing = [name for name in needed if not hasattr(InotifyWatchGroup, name)]
    if found not in CHECKED_WATCHDOG or missing:
        raise ImportError(
            f"daemon.watch was checked against watchdog {CHECKED_WATCHDOG} and found "
            f"{watchdog.version.VERSION_STRING}{f' without {missing}' if missing else ''}: its inotify internals "
            "(overflow callback, silent watch failures below the root) must be re-read before use; "
            "see docs/overflow.md. Install watchdog==7.1.0."
        )


_check_watchdog()


def read_sysctl(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# What the emitter reports. Filtering also narrows the inotify mask (inotify.py:542-580): no
# IN_OPEN / IN_CLOSE_NOWRITE, so the hasher reading every file does not flood the queue.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirAttribEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class _Trouble:
    kind: EventKind  # WATCH_LIMIT, ROOT_GONE or OBSERVER_DIED
    errno: int = 0
    detail: str = ""


class _Session:
    """One inotify attempt: an observer, its watch group's counts, and what went wrong first."""

    def __init__(self, watcher: RootWatcher, paths: RootPaths) -> None:
        self.watcher = watcher
        self.paths = paths
        self.cancelled = threading.Event()
        self.observer: _Observer | None = None
        self.group: _WatchGroup | None = None
        self.root_wd: WatchDescriptor | None = None
        self.failed: dict[bytes, int] = {}  # folder -> errno, for folders we meant to watch

    @property
    def watched(self) -> int:
        group = self.group
        return len(group.active_paths()) if group is not None else 0

    @property
    def expected(self) -> int:
        return self.watched + len(self.failed)

    def could_not_watch(self, path: bytes, err: int) -> None:
        self.failed[path] = err
        self.watcher.post(self, _Trouble(EventKind.WATCH_LIMIT, err))

    def died(self, thread: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        detail = f"watchdog's {thread} thread died: {exc!r}{where}"
        self.watcher.post(self, _Trouble(EventKind.OBSERVER_DIED, detail=detail))


@dataclass(eq=False)
class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch group, counting the folders it meant to watch and did.

    Runs on watchdog's threads: the first activation in ``RootWatcher.start``'s thread,
    later additions (IN_CREATE of a folder, a folder moved in, the rebuild after an overflow)
    on the InotifyFD reader thread.
    """

    session: _Session | None = field(default=None, kw_only=True)

    def active_paths(self) -> dict[bytes, WatchDescriptor]:
        return self._active_callbacks_by_path

    def _s(self) -> _Session:
        assert self.session is not None
        return self.session

    def _add_all_callbacks(self, path: bytes) -> None:
        # watchdog's own (inotify.py:340-355), plus: excluded folders are neither walked nor
        # watched (a .stversions tree must not use up the watch limit), and a stop() cancels a
        # long placement instead of waiting for it.
        s = self._s()
        rel = s.paths.rel(path)
        if rel is None or s.paths.excluded(rel):
            return
        is_dir = os.path.isdir(path)
        self._add_callback(path)
        if not (is_dir and self.is_recursive):
            return
        for top, dirnames, _ in os.walk(path, followlinks=False):
            if s.cancelled.is_set():
                return
            kept = []
            for name in dirnames:
                full = os.path.join(top, name)
                sub = s.paths.rel(full)
                if sub is None or s.paths.excluder(sub) or os.path.islink(full):
                    continue
                kept.append(name)
                self._add_callback(full)
            dirnames[:] = kept

    def _add_callback(self, path: bytes) -> None:
        # watchdog's own (inotify.py:357-372) swallows every OSError below the root: an ENOSPC
        # there leaves that subtree silently unwatched. Same steps, but the failure is counted.
        s = self._s()
        try:
            wd = self._inotify_fd.add_callback(path, self.event_mask, self._callback, self._id)
        except OSError as e:
            if path == self.path:
                raise
            if e.errno not in _NOT_MEANT:
                s.could_not_watch(path, e.errno or 0)
            return
        if wd == -1:
            # InotifyFD._raise_error returns without raising on EACCES (inotify_c.py:521), so
            # _get_or_create_watch records a watch with wd -1 (inotify_c.py:464-471): undo it.
            self._inotify_fd.remove_callbacks([(wd, self._id)])
            if path == self.path:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            return
        s.failed.pop(path, None)
        if path == self.path:
            s.root_wd = wd
        stale = self._active_callbacks_by_watch.get(wd)
        if stale is not None and stale != path and self._active_callbacks_by_path.get(stale) == wd:
            # The same folder (inotify returns its existing wd) seen under a new name, when a
            # move's IN_MOVED_FROM/IN_MOVED_TO did not pair up (e.g. moved into a folder not
            # watched yet). watchdog leaves the old name in its path map; a later move of an
            # ancestor of that old name rewrites it by prefix (inotify.py:322-338) and the
            # folder's events are then reported under a path that does not exist, forever.
            # (torture seed 2: `mv A/d/b X/n; mv A X/n/m` put b's events under X/n/m/d/b.)
            del self._active_callbacks_by_path[stale]
        self._active_callbacks_by_path[path] = wd
        self._active_callbacks_by_watch[wd] = path

    def forget(self, path: bytes) -> None:
        """A folder moved out of the root: drop the watches on it and below.

        watchdog keeps them (inotify.py:238-250, a TODO), so they would hold on to watches
        and report changes made outside the root under the folder's old path. If a new folder
        took the old name meanwhile, it is watched afresh.
        """
        with self._lock:
            if not self.is_active:
                return
            prefix = path + b"/"
            wds = [wd for wd, p in self._active_callbacks_by_watch.items() if p == path or p.startswith(prefix)]
            if wds:
                self._remove_callbacks(wds)
            if os.path.isdir(path) and not os.path.islink(path):
                self._add_all_callbacks(path)

    def on_queue_overflow(self) -> None:
        # The only place watchdog 7.1 reports IN_Q_OVERFLOW (inotify_c.py:336-348); no event
        # reaches a handler (watchdog #654 for <= 6.x). Report it, then let watchdog re-add
        # the watches (counted afresh: a rebuild that falls short is a watch-limit failure).
        s = self._s()
        if not self.is_active or s.cancelled.is_set():
            return
        s.watcher.overflowed()
        s.failed.clear()
        super().on_queue_overflow()

    def on_event(self, event: InotifyEvent) -> None:
        s = self._s()
        if self.is_active and event.wd == s.root_wd and event.mask & _ROOT_GONE_MASK:
            # IN_UNMOUNT and IN_MOVE_SELF are dropped by the emitter (inotify.py:525-536).
            s.watcher.post(s, _Trouble(EventKind.ROOT_GONE, detail=_mask_names(event.mask)))
        super().on_event(event)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        s = self._s()
        if self.is_active and wd == s.root_wd and not s.cancelled.is_set():
            s.watcher.post(s, _Trouble(EventKind.ROOT_GONE, detail="IN_IGNORED"))
        super().on_watch_deleted(wd)


def _mask_names(mask: int) -> str:
    names = ("IN_DELETE_SELF", "IN_MOVE_SELF", "IN_UNMOUNT")
    return "|".join(n for n in names if mask & getattr(InotifyConstants, n))


class _Emitter(InotifyEmitter):
    """watchdog's emitter, building our watch group (inotify.py:437-446) and reporting death."""

    def __init__(self, event_queue: EventQueue, watch: ObservedWatch, *, session: _Session, **kwargs: Any) -> None:
        super().__init__(event_queue, watch, **kwargs)
        self._session = session
        self.name = f"treewatch-emitter {os.fsdecode(session.paths.top)}"

    def on_thread_start(self) -> None:
        mask = Mask(self.get_event_mask_from_filter() | InotifyConstants.IN_MOVE_SELF | InotifyConstants.IN_ONLYDIR)
        group = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=mask,
            follow_symlink=False,
            session=self._session,
        )
        self._session.group = group
        self._inotify = group

    def build_and_queue_event(self, event: GroupedInotifyEvent, *, full_events: bool = False) -> None:
        super().build_and_queue_event(event, full_events=full_events)
        # An IN_MOVED_FROM still unpaired after the grouper's delay is a move out of the root
        # (reported as deleted, inotify.py:513-516).
        if isinstance(event, PathedInotifyEvent) and event.ev.is_moved_from and event.ev.is_directory:
            group = self._session.group
            if group is not None:
                group.forget(event.path)

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # reported with its location; the supervisor restarts inotify
            self._session.died("emitter", e)


class _InotifyFD(InotifyFD):
    """One inotify instance per root (so a per-instance queue limit applies to it alone)."""

    def __init__(self, session: _Session) -> None:
        super().__init__()
        self._session = session
        self.name = f"treewatch-inotify {os.fsdecode(session.paths.top)}"

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # reported with its location; the supervisor restarts inotify
            self._session.died("inotify reader", e)


class _Observer(BaseObserver):
    """``InotifyObserver`` (inotify.py:592-606), which hard-codes watchdog's emitter class."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self._inotify_fd = _InotifyFD(session)  # inotify_init: EMFILE at max_user_instances
        self._inotify_fd.start()
        super().__init__(_Emitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd, session=session)
        self.name = f"treewatch-dispatch {os.fsdecode(session.paths.top)}"

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self._inotify_fd.stop()
        self._inotify_fd.join()

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # reported with its location; the supervisor restarts inotify
            self._session.died("dispatcher", e)


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: map, then hand off to the loop. No I/O."""

    def __init__(self, session: _Session) -> None:
        self._session = session

    def dispatch(self, event: FileSystemEvent) -> None:
        mapped = map_event(event, self._session.paths)
        if mapped is not None:
            self._session.watcher.emit(mapped)


class RootWatcher:
    """Keeps one root watched by inotify, or says why not and polls until it can again.

    Threads: watchdog's three per inotify attempt (reader, emitter, dispatcher) and one
    supervisor of ours that sleeps on a condition until something goes wrong or a retry is
    due. ``start``/``stop`` block (placing or removing watches): call them via
    ``asyncio.to_thread``. ``expected_dirs``/``watched_dirs`` are the folders the latest
    inotify attempt meant to watch and did.
    """

    def __init__(
        self,
        root: RootConfig,
        watch: WatchConfig,
        loop: asyncio.AbstractEventLoop,
        sink: Callable[[WatchEvent], None],
        *,
        retry_base_s: float = RETRY_BASE_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.root = root
        self.excluder = Excluder(root.exclude)
        self._root = os.fsencode(str(root.path))
        self._poll_interval_s = watch.poll_interval_s
        self._loop = loop
        self._sink = sink
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s

        self._ctl = threading.Lock()  # one thread at a time starts, tears down or retries
        self._cond = threading.Condition()  # guards the fields below
        self._mode = "stopped"
        self._open = False  # the sink may be called
        self._stopping = threading.Event()  # stop() was called
        self._session: _Session | None = None
        self._trouble: tuple[_Session, _Trouble] | None = None
        self._retry_at: float | None = None
        self._retry_delay = retry_base_s
        self._restart_step = 0.0  # delay before restarting after a thread died; grows per death
        self._last_death = -float("inf")
        self._counts = (0, 0)  # (expected, watched) of the last finished attempt
        self._supervisor: threading.Thread | None = None

    # -- public -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def expected_dirs(self) -> int:
        s = self._session
        return s.expected if s is not None else self._counts[0]

    @property
    def watched_dirs(self) -> int:
        s = self._session
        return s.watched if s is not None else self._counts[1]

    def start(self) -> None:
        with self._ctl:
            if self._open:
                return
            with self._cond:
                self._open = True
                self._stopping.clear()
                self._retry_at, self._retry_delay, self._trouble = None, self._retry_base_s, None
            fstype = fs_type(self._root) if self.root.observer == "auto" else ""
            if uses_polling(self.root.observer, fstype):
                self._set_mode("polling")
                return
            trouble = self._attempt()
            if trouble is None:
                self._set_mode("inotify")
            else:
                self._fall_back(trouble)
            self._supervisor = threading.Thread(
                target=self._supervise, name=f"treewatch-watch {self.root.path}", daemon=True
            )
            self._supervisor.start()

    def stop(self) -> None:
        with self._cond:
            self._open = False
            self._stopping.set()
            if self._session is not None:
                self._session.cancelled.set()  # a placement in progress gives up
            self._cond.notify_all()
        with self._ctl:
            if self._session is not None:
                self._teardown(self._session)
            self._set_mode("stopped")
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()

    # -- called from watchdog's threads ---------------------------------------------------

    def emit(self, event: WatchEvent) -> None:
        """Hand ``event`` to the loop; the sink runs there. Cheap and non-blocking."""
        if not self._open:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is shutting down
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: WatchEvent) -> None:
        if self._open:  # nothing reaches the sink after stop()
            self._sink(event)

    def post(self, session: _Session, trouble: _Trouble) -> None:
        """Report a problem of ``session``; the first one per session counts."""
        with self._cond:
            if session is self._session and self._trouble is None and not self._stopping.is_set():
                self._trouble = (session, trouble)
                self._cond.notify_all()

    def overflowed(self) -> None:
        current = read_sysctl(PROC_INOTIFY + "max_queued_events") or 16384
        self.emit(
            WatchEvent(
                EventKind.OVERFLOW,
                detail=f"{self.root.path}: the inotify event queue overflowed (IN_Q_OVERFLOW), events were lost; "
                f"a full sync follows. Raise fs.inotify.max_queued_events from {current} to {current * 4} "
                f"(sysctl -w fs.inotify.max_queued_events={current * 4}; persist it in /etc/sysctl.d/)",
            )
        )

    # -- the supervisor -----------------------------------------------------------------

    def _supervise(self) -> None:
        session: _Session | None
        trouble: _Trouble | None
        while True:
            with self._cond:
                while True:
                    if self._stopping.is_set():
                        return
                    if self._trouble is not None:
                        (session, trouble), self._trouble = self._trouble, None
                        break
                    if self._retry_at is not None and self._retry_at <= time.monotonic():
                        session, trouble, self._retry_at = None, None, None
                        break
                    self._cond.wait(None if self._retry_at is None else self._retry_at - time.monotonic())
            with self._ctl:
                if self._stopping.is_set():
                    return
                if trouble is None:
                    self._retry()
                elif session is self._session:
                    assert session is not None
                    self._teardown(session)
                    self._fall_back(trouble)

    def _retry(self) -> None:
        trouble = self._attempt()
        if trouble is None:
            with self._cond:
                self._retry_delay = self._retry_base_s
            self._set_mode("inotify")
            self.emit(
                WatchEvent(
                    EventKind.INOTIFY_RESTORED,
                    detail=f"{self.root.path}: inotify watches placed on all {self.expected_dirs} folders; "
                    "a full sync follows",
                )
            )
        else:
            self._schedule_retry(self._retry_delay)  # quietly: the fallback was reported once

    def _schedule_retry(self, delay: float) -> None:
        with self._cond:
            self._retry_at = time.monotonic() + delay
            self._retry_delay = min(max(self._retry_delay, self._retry_base_s) * 2, self._retry_max_s)
            self._cond.notify_all()

    def _fall_back(self, trouble: _Trouble) -> None:
        """inotify is down for this root (already torn down): poll, say why once, retry later."""
        self._set_mode("polling")
        if trouble.kind is EventKind.OBSERVER_DIED:
            now = time.monotonic()
            if now - self._last_death > self._retry_max_s:
                self._restart_step = 0.0  # healthy for a long while: restart at once again
            self._last_death = now
            delay = self._restart_step
            self._restart_step = min(max(self._restart_step * 2, self._retry_base_s), self._retry_max_s)
            with self._cond:
                self._retry_at = now + delay
                self._cond.notify_all()
            when = "now" if delay == 0 else f"in {delay:g} s"
            detail = f"{self.root.path}: {trouble.detail}; polling until inotify is restarted ({when})"
            self.emit(WatchEvent(EventKind.OBSERVER_DIED, detail=detail))
            return
        if trouble.kind is EventKind.ROOT_GONE:
            with self._cond:
                self._retry_delay = self._retry_base_s
            delay = self._retry_delay
            self._schedule_retry(delay)
            detail = (
                f"{self.root.path}: the root folder is gone ({trouble.detail or os.strerror(trouble.errno)}); "
                f"polling, and watching it again when it is back (next try in {delay:g} s)"
            )
            self.emit(WatchEvent(EventKind.ROOT_GONE, rel=b"", is_dir=True, detail=detail))
            return
        delay = self._retry_delay
        self._schedule_retry(delay)
        self.emit(WatchEvent(EventKind.WATCH_LIMIT, detail=self._limit_detail(trouble, delay)))

    def _limit_detail(self, trouble: _Trouble, delay: float) -> str:
        expected, watched = self._counts
        what = f"{expected - watched} of {expected} folders" if expected else "the root folder"
        reason = os.strerror(trouble.errno) if trouble.errno else trouble.detail
        if trouble.errno == errno.EMFILE:
            name, current = "fs.inotify.max_user_instances", read_sysctl(PROC_INOTIFY + "max_user_instances") or 128
            value = current * 2
            ns_note = ""
        else:
            name, current = "fs.inotify.max_user_watches", read_sysctl(PROC_INOTIFY + "max_user_watches") or 8192
            value = max(current * 2, expected * 2)
            # Inside a user namespace its own user.max_inotify_watches also applies (the lower wins).
            ns_limit = read_sysctl(PROC_USERNS_WATCHES)
            ns_note = (
                f" (this user namespace's user.max_inotify_watches is {ns_limit}: "
                f"raise it to {max(ns_limit * 2, expected * 2)} too)"
                if ns_limit is not None and ns_limit < current
                else ""
            )
        return (
            f"{self.root.path}: {what} could not be watched ({reason}); "
            f"raise {name} from {current} to {value} (sysctl -w {name}={value}; persist it in /etc/sysctl.d/)"
            f"{ns_note}. Polling every {self._poll_interval_s:g} s meanwhile; retrying inotify in {delay:g} s"
        )

    # -- one inotify attempt ------------------------------------------------------------

    def _attempt(self) -> _Trouble | None:
        """Place every watch (blocking). None when all are placed; else torn down and why."""
        # The real path: a root that is a symlink would otherwise be watched as the link
        # itself (watchdog adds IN_DONT_FOLLOW, inotify.py:169-175).
        session = _Session(self, RootPaths(os.path.realpath(self._root), self.excluder))
        with self._cond:
            if self._stopping.is_set():
                return None
            self._session, self._trouble = session, None
        try:
            session.observer = _Observer(session)
            # bytes, so names that are not UTF-8 round-trip: watchdog keeps bytes paths when the
            # watch path is bytes (inotify.py:538-540), despite its str annotation.
            session.observer.schedule(
                _Handler(session), cast(str, session.paths.top), recursive=True, event_filter=EVENT_FILTER
            )
            session.observer.start()  # places the watches in this thread (api.py:316-323)
        except OSError as e:
            self._teardown(session)
            root_missing = e.errno in {errno.ENOENT, errno.ENOTDIR}
            return _Trouble(EventKind.ROOT_GONE if root_missing else EventKind.WATCH_LIMIT, e.errno or 0, str(e))
        with self._cond:
            posted, self._trouble = self._trouble, None
        if posted is not None or session.cancelled.is_set():
            self._teardown(session)
            return posted[1] if posted is not None else None
        self._counts = (session.expected, session.watched)
        return None

    def _teardown(self, session: _Session) -> None:
        session.cancelled.set()
        with self._cond:
            if self._session is session:
                self._counts = (session.expected, session.watched)
                self._session = None
            if self._trouble is not None and self._trouble[0] is session:
                self._trouble = None
        observer = session.observer
        if observer is None:
            return
        observer.stop()  # stops the emitter (removing its watches) and the inotify reader
        if observer.ident is not None and observer is not threading.current_thread():
            observer.join()

    def _set_mode(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
