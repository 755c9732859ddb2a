"""watchdog's inotify observer, adapted so that nothing that goes wrong with the watches is silent.

One :class:`InotifySession` is one attempt to watch a root: its own inotify instance, its
three watchdog threads (reader, emitter, dispatcher) and the counts of the folders it meant
to watch and did. Events go through :func:`daemon.events.map_event` to a :class:`Watcher`
(the root's supervisor, ``daemon.watch``), and so does what watchdog keeps to itself: a
queue overflow (watchdog then re-adds the watches), and, as a :class:`Trouble` that ends the
attempt, a folder that could not be watched, a root that went away or a thread that died.
Why and how: ``docs/overflow.md``.

watchdog hides two of these from event handlers, so this module reaches into its inotify
internals: small subclasses of ``InotifyWatchGroup``, ``InotifyEmitter``, ``InotifyFD`` and
the observer, checked against watchdog 7.1 (see ``_check_watchdog``). The line numbers in the
comments are those of watchdog 7.1.0 (``inotify.py`` is ``watchdog/observers/inotify.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

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
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    Watch,
    WatchCallback,
    WatchDescriptor,
    inotify_add_watch,
)
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent, PathedInotifyEvent

from daemon import logs
from daemon.events import EventKind, RootPaths, WatchEvent, map_event

# The watchdog releases whose internals this module was read against and tested with. A patch
# release may rewrite them: 7.1.1 replaced the path maps by a tree of nodes, and with this
# module's overrides on it the daemon placed its watches and then never saw an event.
CHECKED_WATCHDOG = ((7, 1, 0),)
# A folder that vanished or that we may not read between listing and watching is not a folder
# we meant to watch (the scanner reports unreadable ones); any other failure is a shortfall.
_NOT_MEANT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ESTALE})
# How many folders found gone as their watch was placed are remembered, in case an ancestor's
# move explains it (`_WatchGroup._move_watches`); a folder made and removed at once stays here.
_VANISHED_KEPT = 4096
_ROOT_GONE_MASK = InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_MOVE_SELF | InotifyConstants.IN_UNMOUNT


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
    needed = (
        "on_queue_overflow",
        "on_event",
        "on_watch_deleted",
        "_add_callback",
        "_add_all_callbacks",
        "_move_watches",
    )
    missing = [name for name in needed if not hasattr(InotifyWatchGroup, name)]
    missing += [name for name in ("_get_or_create_watch",) if not hasattr(InotifyFD, name)]
    if found not in CHECKED_WATCHDOG or missing:
        raise ImportError(
            f"daemon.inotify was checked against watchdog {CHECKED_WATCHDOG} and found "
            f"{watchdog.version.VERSION_STRING}{f' without {missing}' if missing else ''}: its inotify internals "
            "(overflow callback, silent watch failures below the root) must be re-read before use; "
            "see docs/overflow.md. Install watchdog==7.1.0."
        )


_check_watchdog()


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


# Adding a watch on a folder that has one, with the same callback (the reconciling after an
# overflow; a folder met again while a move is followed), makes watchdog warn once per folder
# (inotify_c.py:447-449) that the callback "will be overwritten": by itself. Nothing is wrong,
# and on a tree of 100k folders it would be 100k lines in the journal.
warnings.filterwarnings("ignore", message=r"Callback with id .* already exists for watch", category=RuntimeWarning)


@dataclass(frozen=True, slots=True)
class Trouble:
    """Why an inotify session cannot go on."""

    kind: EventKind  # WATCH_LIMIT, ROOT_GONE or OBSERVER_DIED
    errno: int = 0
    detail: str = ""


class Watcher(Protocol):
    """What an :class:`InotifySession` reports to: its root's supervisor.

    All three are called from watchdog's threads, so none may block.
    """

    def emit(self, event: WatchEvent) -> None: ...

    def post(self, session: InotifySession, trouble: Trouble) -> None: ...

    def overflowed(self) -> None: ...

    def unmounted(self) -> None: ...


class InotifySession:
    """One inotify attempt: an observer, its watch group's counts, and what went wrong first."""

    def __init__(self, watcher: Watcher, paths: RootPaths) -> None:
        self.watcher = watcher
        self.paths = paths
        self.cancelled = threading.Event()
        self.observer: _Observer | None = None
        self.group: _WatchGroup | None = None
        self.root_wd: WatchDescriptor | None = None
        self.failed: dict[bytes, int] = {}  # folder -> errno, for folders we meant to watch
        self.met: set[WatchDescriptor] | None = None  # while watches are reconciled: those the walk met

    @property
    def watched(self) -> int:
        group = self.group
        return len(group.active_paths()) if group is not None else 0

    @property
    def expected(self) -> int:
        return self.watched + len(self.failed)

    def start(self) -> None:
        """Start watchdog's threads and place every watch, in this thread; OSError if the root fails."""
        self.observer = _Observer(self)
        # bytes, so names that are not UTF-8 round-trip: watchdog keeps bytes paths when the
        # watch path is bytes (inotify.py:538-540), despite its str annotation.
        self.observer.schedule(_Handler(self), cast(str, self.paths.top), recursive=True, event_filter=EVENT_FILTER)
        self.observer.start()  # places the watches in this thread (api.py:316-323)

    def stop(self) -> None:
        """Remove the watches and end watchdog's threads (joined, unless called from one of them)."""
        observer = self.observer
        if observer is None:
            return
        observer.stop()  # stops the emitter (removing its watches) and the inotify reader
        if observer.ident is not None and observer is not threading.current_thread():
            observer.join()

    def could_not_watch(self, path: bytes, err: int) -> None:
        self.failed[path] = err
        self.watcher.post(self, Trouble(EventKind.WATCH_LIMIT, err))

    def died(self, thread: str, exc: BaseException) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        detail = f"watchdog's {thread} thread died: {exc!r}{where}"
        self.watcher.post(self, Trouble(EventKind.OBSERVER_DIED, detail=detail))


@dataclass(eq=False, repr=False)
class _WatchGroup(InotifyWatchGroup):
    """watchdog's recursive watch group, counting the folders it meant to watch and did.

    Runs on watchdog's threads: the first activation in ``InotifySession.start``'s thread,
    later additions (IN_CREATE of a folder, a folder moved in, the rebuild after an overflow)
    on the InotifyFD reader thread.
    """

    session: InotifySession | None = field(default=None, kw_only=True)
    # Folders that were gone when their watch was to be placed, oldest first (see _move_watches).
    _vanished: dict[bytes, None] = field(default_factory=dict, init=False)

    def __repr__(self) -> str:
        # Short on purpose: watchdog puts this repr into a warning it builds whenever a watch is
        # added again (inotify_c.py:447-449), and the dataclass's own listed every watched path:
        # O(n) per watch, O(n^2) to reconcile n folders after an overflow (30 s for 3,000).
        return f"<watch group of {os.fsdecode(self.path)}: {len(self._active_callbacks_by_watch)} watches>"

    def active_paths(self) -> dict[bytes, WatchDescriptor]:
        return self._active_callbacks_by_path

    def _s(self) -> InotifySession:
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
                if sub is None or s.paths.excluder(sub) or sub in s.paths.left_out.points or os.path.islink(full):
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
            if e.errno == errno.ENOENT:
                self._vanished[path] = None
                while len(self._vanished) > _VANISHED_KEPT:
                    del self._vanished[next(iter(self._vanished))]
            elif e.errno not in _NOT_MEANT:
                s.could_not_watch(path, e.errno or 0)
            return
        self._vanished.pop(path, None)
        if wd == -1:
            # InotifyFD._raise_error returns without raising on EACCES (inotify_c.py:521), so
            # _get_or_create_watch records a watch with wd -1 (inotify_c.py:464-471): undo it.
            self._inotify_fd.remove_callbacks([(wd, self._id)])
            if path == self.path:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), path)
            return
        s.failed.pop(path, None)
        if s.met is not None:
            s.met.add(wd)
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

    def _move_watches(self, move_src_path: bytes, move_dst_path: bytes) -> bool:
        # watchdog's own (inotify.py:322-338) renames the watches it has below the source. A
        # folder it could not watch there is not among them: moved in from outside (or made)
        # and its parent moved away before its event was read, it was gone from the path the
        # event named (torture seed 13074143: a file made in it later was never seen). Watch it
        # at its new place; the scan of the move's destination covers what came in between.
        moved = super()._move_watches(move_src_path, move_dst_path)
        prefix = move_src_path + b"/"
        for path in [p for p in self._vanished if p == move_src_path or p.startswith(prefix)]:
            del self._vanished[path]
            self._add_all_callbacks(move_dst_path + path[len(move_src_path) :])
        return moved

    def forget(self, path: bytes) -> None:
        """A folder moved out of the root, or a filesystem mounted or unmounted there: drop the
        watches on it and below, and watch what is at the path now.

        watchdog keeps them (inotify.py:238-250, a TODO), so they would hold on to watches
        and report changes made outside the root under the folder's old path. If a new folder
        took the old name meanwhile, it is watched afresh. So is a disk mounted there (its
        folders were never watched), or the bare mount point a bind mount left (the watches
        on the bound folder stay on its inodes, which are no longer in the root).
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
        # reaches a handler (watchdog #654 for <= 6.x). Its own handling (inotify.py:212-225)
        # removes every watch, then adds them again: each removal queues an IN_IGNORED, so on a
        # tree with more folders than the queue holds (16,384 by default) the removal itself
        # overflowed the queue again, and again, for good. Adding a watch on a folder that has
        # one returns its descriptor and queues nothing: so walk, adding what the lost events
        # would have added, and drop only the watches the walk did not meet (folders deleted
        # or moved out meanwhile). The overflow is reported after that: reported first, the full
        # sync it brings could list a folder before its watch was back, and a change made there
        # in between was seen by neither.
        s = self._s()
        if s.cancelled.is_set():
            return
        with self._lock:
            if not self.is_active:
                return
            try:
                self._move_event_grouper.discard_pending_events()
                before = list(self._active_callbacks_by_watch)
                s.failed.clear()  # counted afresh: a rebuild that falls short is a watch-limit failure
                s.met = set()
                try:
                    self._add_all_callbacks(self.path)
                except OSError as e:  # the root itself: gone or unreadable now
                    s.watcher.post(s, Trouble(EventKind.ROOT_GONE, e.errno or 0, str(e)))
                met, s.met = s.met, None
                gone = [wd for wd in before if wd not in met and wd in self._active_callbacks_by_watch]
                if gone:
                    self._remove_callbacks(gone)
            finally:
                s.watcher.overflowed()

    def on_event(self, event: InotifyEvent) -> None:
        s = self._s()
        if self.is_active and event.wd == s.root_wd and event.mask & _ROOT_GONE_MASK:
            # IN_UNMOUNT and IN_MOVE_SELF are dropped by the emitter (inotify.py:525-536).
            s.watcher.post(s, Trouble(EventKind.ROOT_GONE, detail=_mask_names(event.mask)))
        elif self.is_active and event.mask & InotifyConstants.IN_UNMOUNT:
            # A filesystem below the root is gone: every watch on it gets IN_UNMOUNT, then
            # IN_IGNORED (watchdog drops the watch and says nothing, inotify_c.py:351-367). Not a
            # deletion of what was there: the scheduler looks at the mount table (its volume is
            # offline, and nothing below it is deleted).
            s.watcher.unmounted()
        super().on_event(event)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        s = self._s()
        if self.is_active and wd == s.root_wd and not s.cancelled.is_set():
            s.watcher.post(s, Trouble(EventKind.ROOT_GONE, detail="IN_IGNORED"))
        super().on_watch_deleted(wd)


def _mask_names(mask: int) -> str:
    names = ("IN_DELETE_SELF", "IN_MOVE_SELF", "IN_UNMOUNT")
    return "|".join(n for n in names if mask & getattr(InotifyConstants, n))


class _Emitter(InotifyEmitter):
    """watchdog's emitter, building our watch group (inotify.py:437-446) and reporting death."""

    def __init__(
        self, event_queue: EventQueue, watch: ObservedWatch, *, session: InotifySession, **kwargs: Any
    ) -> None:
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


class _Watch:
    """watchdog's ``Watch`` (inotify_c.py:178-209) in one small object, for a tree of a million folders.

    watchdog's is a dataclass with an instance dict, a dict of callbacks and the path it was
    made for (kept for debugging only): 330 of the ~600 bytes of Python that every watched
    folder cost (tracemalloc, 100,000 folders). Here one inotify instance serves one watch
    group, so a watch has at most one callback, and the watch is its own one-entry ``callbacks``
    mapping: watchdog only tests, sets, pops and lists it (inotify_c.py:342, 361, 448-451, 491, 505).
    """

    __slots__ = ("_callback", "_id", "mask", "wd")

    def __init__(self, wd: WatchDescriptor, mask: Mask) -> None:
        self.wd = wd
        self.mask = mask
        self._id: CallbackId | None = None
        self._callback: WatchCallback | None = None

    @property
    def callbacks(self) -> _Watch:
        return self

    @property
    def is_used(self) -> bool:
        return self._callback is not None

    def short_str(self) -> str:
        return f"<watch wd={self.wd}>"

    def __contains__(self, id_: object) -> bool:
        return self._callback is not None and id_ == self._id

    def __setitem__(self, id_: CallbackId, callback: WatchCallback) -> None:
        if self._callback is not None and id_ != self._id:
            raise RuntimeError(f"a second watch group on inotify watch {self.wd}")
        self._id, self._callback = id_, callback

    def pop(self, id_: CallbackId, default: WatchCallback | None = None) -> WatchCallback | None:
        if self._callback is None or id_ != self._id:
            return default
        callback, self._id, self._callback = self._callback, None, None
        return callback

    def values(self) -> tuple[WatchCallback, ...]:
        return () if self._callback is None else (self._callback,)


class _InotifyFD(InotifyFD):
    """One inotify instance per root (so a per-instance queue limit applies to it alone)."""

    def __init__(self, session: InotifySession) -> None:
        super().__init__()
        self._session = session
        self.name = f"treewatch-inotify {os.fsdecode(session.paths.top)}"

    def _get_or_create_watch(self, path: bytes, mask: Mask) -> Watch:
        # watchdog's own (inotify_c.py:454-471), making a _Watch.
        wd = inotify_add_watch(self._inotify_fd, path, mask)
        if wd == -1:
            InotifyFD._raise_error()
        watch = self._watch_for_wd.get(wd)
        if watch is None:
            watch = cast(Watch, _Watch(wd, mask))
            self._watch_for_wd[wd] = watch
        return watch

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # reported with its location; the supervisor restarts inotify
            self._session.died("inotify reader", e)


class _Observer(BaseObserver):
    """``InotifyObserver`` (inotify.py:592-606), which hard-codes watchdog's emitter class."""

    def __init__(self, session: InotifySession) -> None:
        logs.quiet_watchdog()
        self._session = session
        self._inotify_fd = _InotifyFD(session)  # inotify_init: EMFILE at max_user_instances
        self._inotify_fd.start()
        super().__init__(_Emitter, timeout=DEFAULT_OBSERVER_TIMEOUT, inotify_fd=self._inotify_fd, session=session)
        self.name = f"treewatch-dispatch {os.fsdecode(session.paths.top)}"

    def on_thread_stop(self) -> None:
        # watchdog's teardown removes watch by watch through its path maps, which can disagree
        # once a folder was seen under two names (KeyError in _remove_watch_internally): it
        # raised here, the supervisor thread died with it and the root went unwatched for good
        # (torture seed 13631969). The session is thrown away either way: closing the inotify
        # instance below removes every watch at once, and the supervisor starts a new session.
        try:
            with contextlib.suppress(Exception):
                super().on_thread_stop()
        finally:
            self._inotify_fd.stop()
            self._inotify_fd.join()

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # reported with its location; the supervisor restarts inotify
            self._session.died("dispatcher", e)


class _Handler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: map, then hand off to the loop. No I/O."""

    def __init__(self, session: InotifySession) -> None:
        self._session = session

    def dispatch(self, event: FileSystemEvent) -> None:
        mapped = map_event(event, self._session.paths)
        if mapped is not None:
            self._session.watcher.emit(mapped)
