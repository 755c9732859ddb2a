"""Keeps each root watched by inotify, or says why not, polls, and retries: the supervisor.

One :class:`RootWatcher` per root. Each inotify attempt is a
:class:`daemon.inotify.InotifySession`, whose watchdog threads map events to
:class:`~daemon.events.WatchEvent`\\ s; the watcher hands each one to the loop with
``call_soon_threadsafe``, and the sink always runs on the loop thread. Nothing that goes wrong
with the watches is silent: a queue overflow, a folder that could not be watched, a root that
disappears and a watchdog thread that dies each become an event, and the watcher falls back to
polling (the scheduler's own no-change sync; no watchdog ``PollingObserver``, watchdog #878)
and retries inotify with backoff. Why and how: ``docs/overflow.md``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterable

from daemon.config import RootConfig, WatchConfig
from daemon.events import EventKind, LeftOut, RootPaths, WatchEvent
from daemon.filters import Excluder
from daemon.fs import fs_type
from daemon.inotify import InotifySession, Trouble
from daemon.model import join
from daemon.rules import uses_polling

RETRY_BASE_S = 60.0  # first inotify retry after a fallback to polling...
RETRY_MAX_S = 3600.0  # ...doubling up to this (syncthing #5731, #6228: never spin on retries)
PROC_INOTIFY = "/proc/sys/fs/inotify/"
PROC_USERNS_WATCHES = "/proc/sys/user/max_inotify_watches"


def read_sysctl(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


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
        left_out: frozenset[bytes] = frozenset(),
    ) -> None:
        self.root = root
        self.excluder = Excluder(root.exclude)
        self.left_out = LeftOut(left_out)  # one_filesystem: mount points not watched
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
        # Events on their way to the loop. One wake-up of the loop takes all that came since the
        # last: a call_soon_threadsafe per event cost a self-pipe write and a loop iteration per
        # inotify event, on the core a writer shares with the daemon (docs/benchmarks.md, E1).
        self._outbox: collections.deque[WatchEvent] = collections.deque()
        self._outbox_lock = threading.Lock()
        self._stopping = threading.Event()  # stop() was called
        self._session: InotifySession | None = None
        self._trouble: tuple[InotifySession, Trouble] | None = None
        self._retry_at: float | None = None
        self._retry_delay = retry_base_s
        self._restart_step = 0.0  # delay before restarting after a thread died; grows per death
        self._last_death = -float("inf")
        self._counts = (0, 0)  # (expected, watched) of the last finished attempt
        self._supervisor: threading.Thread | None = None
        self._unmount_told = False  # an UNMOUNTED event is on its way to the loop

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
                self._unmount_told = False
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
        """Hand ``event`` to the loop; the sink runs there, in order. Cheap and non-blocking."""
        if not self._open:
            return
        with self._outbox_lock:
            wake = not self._outbox  # else a delivery is on its way and takes this one too
            self._outbox.append(event)
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is shutting down
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._outbox_lock:
            batch = list(self._outbox)
            self._outbox.clear()
        for event in batch:
            if event.kind is EventKind.UNMOUNTED:
                with self._cond:
                    self._unmount_told = False
            if self._open:  # nothing reaches the sink after stop()
                self._sink(event)

    def post(self, session: InotifySession, trouble: Trouble) -> None:
        """Report a problem of ``session``; the first one per session counts."""
        with self._cond:
            if session is self._session and self._trouble is None and not self._stopping.is_set():
                self._trouble = (session, trouble)
                self._cond.notify_all()

    def unmounted(self) -> None:
        """IN_UNMOUNT on a watch below the root: one event for a burst (every watch on the
        filesystem gets one), the loop then reads the mount table."""
        with self._cond:
            if self._unmount_told or not self._open:
                return
            self._unmount_told = True
        self.emit(
            WatchEvent(EventKind.UNMOUNTED, detail=f"{self.root.path}: a filesystem below the root was unmounted")
        )

    def rewatch(self, mount_points: Iterable[bytes], left_out: frozenset[bytes]) -> None:
        """The mounts at these mount points (relative to the root) changed: watch what is there
        now, and leave out ``left_out`` (one_filesystem). Blocking: call via asyncio.to_thread."""
        self.left_out.points = left_out
        with self._ctl:
            session = self._session
            group = session.group if session is not None else None
            if session is None or group is None:
                return  # polling, or stopped: the scan looks at the tree itself
            for rel in mount_points:
                group.forget(join(session.paths.top, rel))

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
        session: InotifySession | None
        trouble: Trouble | None
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
            try:
                with self._ctl:
                    if self._stopping.is_set():
                        return
                    if trouble is None:
                        self._retry()
                    elif session is self._session:
                        assert session is not None
                        self._teardown(session)
                        self._fall_back(trouble)
            except Exception as e:
                # Whatever escapes here would end this thread and every later restart with it:
                # the root unwatched for good, nothing said (torture seed 13631969, a teardown
                # inside watchdog). Said once as a death; polled; retried with the backoff.
                self._set_mode("polling")
                self._schedule_retry(self._retry_delay)
                detail = f"{self.root.path}: restarting inotify failed: {e!r}; polling until it is restarted"
                self.emit(WatchEvent(EventKind.OBSERVER_DIED, detail=detail))

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

    def _fall_back(self, trouble: Trouble) -> None:
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

    def _limit_detail(self, trouble: Trouble, delay: float) -> str:
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

    def _attempt(self) -> Trouble | None:
        """Place every watch (blocking). None when all are placed; else torn down and why."""
        # The real path: a root that is a symlink would otherwise be watched as the link
        # itself (watchdog adds IN_DONT_FOLLOW, inotify.py:169-175).
        session = InotifySession(self, RootPaths(os.path.realpath(self._root), self.excluder, self.left_out))
        with self._cond:
            if self._stopping.is_set():
                return None
            self._session, self._trouble = session, None
        try:
            session.start()
        except OSError as e:
            self._teardown(session)
            root_missing = e.errno in {errno.ENOENT, errno.ENOTDIR}
            return Trouble(EventKind.ROOT_GONE if root_missing else EventKind.WATCH_LIMIT, e.errno or 0, str(e))
        with self._cond:
            posted, self._trouble = self._trouble, None
        if posted is not None or session.cancelled.is_set():
            self._teardown(session)
            return posted[1] if posted is not None else None
        self._counts = (session.expected, session.watched)
        return None

    def _teardown(self, session: InotifySession) -> None:
        session.cancelled.set()
        with self._cond:
            if self._session is session:
                self._counts = (session.expected, session.watched)
                self._session = None
            if self._trouble is not None and self._trouble[0] is session:
                self._trouble = None
        session.stop()

    def _set_mode(self, mode: str) -> None:
        with self._cond:
            self._mode = mode
