"""watchdog's inotify observer, adapted so that nothing that goes wrong with the watches is silent.

One :class:`InotifySession` is one attempt to watch a root: its own inotify instance, its
three watchdog threads (reader, emitter, dispatcher) and the counts of the folders it meant
to watch and did. Events go through :func:`daemon.events.map_event` to a :class:`Watcher`
(the root's supervisor, ``daemon.watch``), and so does what watchdog keeps to itself: a
queue overflow (watchdog then re-adds the watches), and, as a :class:`Trouble` that ends the
attempt, a folder that could not be watched, a root that went away or a thread that died.
Why and how: ``docs/overflow.md``.

watchdog hides two of these from event handlers, and its watch group keeps ~340 bytes of
Python per watched folder, so this module reaches into its inotify internals: a watch group of
its own in place of ``InotifyWatchGroup`` (the folders kept by ``daemon.watchtree``), and small
subclasses of ``InotifyEmitter``, ``InotifyFD`` and the observer, checked against watchdog 7.1
(see ``_check_watchdog``). The line numbers in the
comments are those of watchdog 7.1.0 (``inotify.py`` is ``watchdog/observers/inotify.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading
import traceback
from dataclasses import dataclass
from os.path import join
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
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
    inotify_add_watch,
    inotify_rm_watch,
)
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)

from daemon import logs
from daemon.events import EventKind, RootPaths, WatchEvent, map_event
from daemon.watchtree import ROOT_PARENT, WatchTree

# The watchdog releases whose internals this module was read against and tested with. A patch
# release may rewrite them: 7.1.1 replaced the path maps by a tree of nodes, and with this
# module's overrides on it the daemon placed its watches and then never saw an event.
CHECKED_WATCHDOG = ((7, 1, 0),)
# A folder that vanished or that we may not read between listing and watching is not a folder
# we meant to watch (the scanner reports unreadable ones); any other failure is a shortfall.
_NOT_MEANT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ESTALE})
# How many folders found gone as their watch was placed are remembered, in case an ancestor's
# move explains it (`_WatchGroup._move_watch`); a folder made and removed at once stays here.
_VANISHED_KEPT = 4096
_ROOT_GONE_MASK = InotifyConstants.IN_DELETE_SELF | InotifyConstants.IN_MOVE_SELF | InotifyConstants.IN_UNMOUNT


def _check_watchdog() -> None:
    """Refuse to run on a watchdog whose inotify internals were not read and tested here.

    Overflow (IN_Q_OVERFLOW) never reaches an event handler: watchdog up to 6.x dropped every
    wd == -1 event in ``read_events`` (watchdog #654); 7.1 passes it to its watch group only
    (inotify_c.py:336-348). And a watch that fails below the root is swallowed there
    (inotify.py:357-372). So this module keeps its own watch group and reaches into the
    inotify reader (``InotifyFD``: its event dispatch, its close), the emitter (the group it
    builds) and the move grouper; a new release, even a patch release, must be read again
    before it is trusted with a NAS's index.
    """
    found = (watchdog.version.VERSION_MAJOR, watchdog.version.VERSION_MINOR, watchdog.version.VERSION_BUILD)
    needed = {
        InotifyFD: ("handle_event", "read_events", "close", "_close_resources", "_read_event_buffer"),
        InotifyEmitter: ("on_thread_start", "on_thread_stop", "queue_events", "build_and_queue_event"),
        InotifyMoveEventGrouper: (
            "read_event",
            "put_event",
            "get_queued_moved_from_event",
            "discard_pending_events",
            "close",
        ),
    }
    missing = [f"{cls.__name__}.{name}" for cls, names in needed.items() for name in names if not hasattr(cls, name)]
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

    @property
    def watched(self) -> int:
        group = self.group
        return group.tree.count if group is not None else 0

    @property
    def expected(self) -> int:
        return self.watched + len(self.failed)

    def start(self) -> None:
        """Start watchdog's threads and place every watch, in this thread; OSError if the root fails."""
        self.observer = _Observer(self)
        # bytes, so names that are not UTF-8 round-trip: watchdog keeps bytes paths when the
        # watch path is bytes (inotify.py:538-540), despite its str annotation.
        # recursive=False, though every folder is watched (_WatchGroup does not ask): the flag only
        # makes watchdog's emitter walk a folder moved or moved in on disk and queue a synthetic
        # event per entry below it (inotify.py:491-506), which map_event then drops: 0.5 s of
        # CPU and 101,000 events for a folder of 100,000 files renamed.
        top = cast(str, self.paths.top)
        self.observer.schedule(_Handler(self), top, recursive=False, event_filter=EVENT_FILTER)
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


class _WatchGroup:
    """Every folder of one root watched, with a path for each event.

    Stands in for watchdog's ``InotifyWatchGroup`` (inotify.py:139-400), whose two path maps
    and watch objects cost ~340 bytes of Python per folder (405 MiB for 1,000,000 folders):
    the folders are a :class:`WatchTree` here, and the kernel is asked which watch a folder
    has (``inotify_add_watch`` on a watched folder returns its wd and changes nothing) instead
    of keeping a map from paths. Same steps and the same move grouping as watchdog's; what it
    did not do (excluded folders, watches that fail below the root, the rebuild after an
    overflow, folders moved out) is said where it is done.

    Runs on watchdog's threads: the first placement in ``InotifySession.start``'s thread,
    events, overflows and removed watches on the inotify reader's, ``forget`` on the emitter's
    and the supervisor's. ``_lock`` is held around every use of the tree.
    """

    def __init__(self, inotify_fd: _InotifyFD, session: InotifySession, mask: Mask) -> None:
        self._fd = inotify_fd
        self._session = session
        self.path = session.paths.top
        self.event_mask = mask
        self.is_recursive = True
        self.tree = WatchTree(self.path)
        self._move_event_grouper = InotifyMoveEventGrouper()
        self._lock = threading.Lock()
        # Folders that were gone when their watch was to be placed, oldest first (see _move_watch).
        self._vanished: dict[bytes, None] = {}
        self.is_active = False
        # Before the first watch is placed: the reader hands this group every event from then on.
        session.group = self
        inotify_fd.group = self
        with self._lock:
            self._add_tree(self.path, ROOT_PARENT, b"", None)
            self.is_active = True

    def __repr__(self) -> str:
        return f"<watch group of {os.fsdecode(self.path)}: {self.tree.count} watches>"

    # What watchdog's emitter uses (inotify.py:447-474).

    def read_event(self) -> GroupedInotifyEvent | None:
        return self._move_event_grouper.read_event()

    def deactivate(self) -> None:
        # watchdog's removes watch by watch (one syscall and one IN_IGNORED each, a million on
        # a large share); the session is thrown away, and closing the inotify instance
        # (_InotifyFD.close) removes every watch at once.
        with self._lock:
            self.is_active = False
            self._move_event_grouper.close()

    # Called by _InotifyFD.handle_event.

    def on_event(self, event: InotifyEvent) -> None:
        s = self._session
        if self.is_active and event.wd == s.root_wd and event.mask & _ROOT_GONE_MASK:
            # IN_UNMOUNT and IN_MOVE_SELF are dropped by the emitter (inotify.py:525-536).
            s.watcher.post(s, Trouble(EventKind.ROOT_GONE, detail=_mask_names(event.mask)))
        elif self.is_active and event.mask & InotifyConstants.IN_UNMOUNT:
            # A filesystem below the root is gone: every watch on it gets IN_UNMOUNT, then
            # IN_IGNORED (the watch is dropped). Not a deletion of what was there: the
            # scheduler looks at the mount table (its volume is offline, and nothing below it
            # is deleted).
            s.watcher.unmounted()
        with self._lock:
            if not self.is_active:
                return
            folder = self.tree.path(event.wd)
            if folder is None:
                return
            src_path = os.path.join(folder, event.name) if event.name else folder
            put = self._move_event_grouper.put_event
            if event.is_moved_to and event.is_directory:
                moved_from = self._move_event_grouper.get_queued_moved_from_event(event.cookie)
                if not self._move_watch(moved_from, src_path, event.wd, event.name):
                    # Not watched where it came from (from outside the root, or seen before its
                    # watch was placed): watch it, and report what is in it if it came from
                    # inside, as watchdog does (inotify.py:247-256).
                    made: list[PathedInotifyEvent] | None = [] if moved_from is not None else None
                    self._add_tree(src_path, event.wd, event.name, made)
                    for sub_event in made or ():
                        put(sub_event)
                put(PathedInotifyEvent(event, src_path))
            elif event.is_create and event.is_directory:
                # mkdir -p a/b/c; touch a/b/c/f: what is made before the watch is placed is
                # reported from a listing, after the folder's own event (inotify.py:258-282).
                made = []
                self._add_tree(src_path, event.wd, event.name, made)
                put(PathedInotifyEvent(event, src_path))
                for sub_event in made:
                    put(sub_event)
            else:
                put(PathedInotifyEvent(event, src_path))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        s = self._session
        if self.is_active and wd == s.root_wd and not s.cancelled.is_set():
            s.watcher.post(s, Trouble(EventKind.ROOT_GONE, detail="IN_IGNORED"))
        with self._lock:
            if self.is_active:
                self.tree.remove(wd)

    def on_queue_overflow(self) -> None:
        # watchdog 7.1 reports IN_Q_OVERFLOW only here (inotify_c.py:336-348); no event reaches
        # a handler (watchdog #654 for <= 6.x). Its own handling (inotify.py:212-225) removes
        # every watch, then adds them again: each removal queues an IN_IGNORED, so on a tree
        # with more folders than the queue holds (16,384 by default) the removal itself
        # overflowed the queue again, and again, for good. Adding a watch on a folder that has
        # one returns its descriptor and queues nothing: so walk, adding what the lost events
        # would have added and putting every folder met at its place now, and drop only the
        # watches the walk did not meet (folders deleted or moved out meanwhile). The overflow
        # is reported after that: reported first, the full sync it brings could list a folder
        # before its watch was back, and a change made there in between was seen by neither.
        s = self._session
        if s.cancelled.is_set():
            return
        with self._lock:
            if not self.is_active:
                return
            try:
                self._move_event_grouper.discard_pending_events()
                s.failed.clear()  # counted afresh: a rebuild that falls short is a watch-limit failure
                self.tree.start_marking()
                try:
                    self._add_tree(self.path, ROOT_PARENT, b"", None)
                except OSError as e:  # the root itself: gone or unreadable now
                    s.watcher.post(s, Trouble(EventKind.ROOT_GONE, e.errno or 0, str(e)))
                self._drop(self.tree.unmarked())
            finally:
                s.watcher.overflowed()

    # Called by the emitter and the supervisor.

    def forget(self, path: bytes) -> None:
        """A folder moved out of the root, or a filesystem mounted or unmounted there: drop the
        watches on it and below, and watch what is at the path now.

        watchdog keeps them (inotify.py:238-250, a TODO), so they would hold on to watches
        and report changes made outside the root under the folder's old path. If a new folder
        took the old name meanwhile, it is watched afresh. So is a disk mounted there (its
        folders were never watched), or the bare mount point a bind mount left (the watches
        on the bound folder stay on its inodes, which are no longer in the root). One pass
        over every watch (WatchTree.below): ~1 s for a million.
        """
        path = path.rstrip(b"/") or b"/"
        with self._lock:
            if not self.is_active:
                return
            if path == self.path:  # the root itself: put back what is missing
                self._add_tree(self.path, ROOT_PARENT, b"", None)
                return
            found = self.tree.find(path)
            if found:
                self._drop(self.tree.below(found))
            if not os.path.isdir(path) or os.path.islink(path):
                return
            head, name = os.path.split(path)
            parent = self._watch_of(head)
            if parent is not None:
                self._add_tree(path, parent, name, None)

    # Non-synchronized: the caller holds _lock.

    def _add_tree(self, path: bytes, parent: int, name: bytes, made: list[PathedInotifyEvent] | None) -> None:
        """Watch ``path`` (the folder ``name`` in the watched folder ``parent``) and every folder
        below it, and, if ``made`` is a list, add to it a created event for everything found
        in them. OSError only if the root itself cannot be watched.

        watchdog's walk (inotify.py:340-355) plus: excluded folders are neither walked nor
        watched (a .stversions tree must not use up the watch limit), a stop() cancels a long
        placement instead of waiting for it, and nothing is walked below a folder that could
        not be watched (its events could not be named). Each folder is watched before it is
        listed, so an entry made in it is either in the listing or in an event of its own.
        """
        s = self._session
        rel = s.paths.rel(path)
        if rel is None or s.paths.excluded(rel):
            return
        wd = self._add_watch(path, parent, name)
        if wd is None or not os.path.isdir(path):
            return
        watched = {path: wd}
        for top, dirnames, filenames in os.walk(path, followlinks=False):
            top_wd = watched.pop(top, None)
            if s.cancelled.is_set():
                return
            if top_wd is None:
                dirnames[:] = []
                continue
            if made is not None:
                made.extend(_created(top_wd, top, entry, _DIR_CREATED) for entry in dirnames)
                made.extend(_created(top_wd, top, entry, _FILE_CREATED) for entry in filenames)
            kept = []
            for sub_name in dirnames:
                full = join(top, sub_name)
                sub = s.paths.rel(full)
                if sub is None or s.paths.excluder(sub) or sub in s.paths.left_out.points or os.path.islink(full):
                    continue
                sub_wd = self._add_watch(full, top_wd, sub_name)
                if sub_wd is not None:
                    watched[full] = sub_wd
                    kept.append(sub_name)
            dirnames[:] = kept

    def _add_watch(self, path: bytes, parent: int, name: bytes) -> int | None:
        """Watch one folder and record it; None if it could not be. watchdog's own
        (inotify.py:357-372) swallows every OSError below the root: an ENOSPC there leaves that
        subtree silently unwatched. Same steps, but the failure is counted."""
        s = self._session
        try:
            wd = self._fd.add_watch(path, self.event_mask)
        except OSError as e:
            if path == self.path:
                raise
            if e.errno == errno.ENOENT:
                self._vanished[path] = None
                while len(self._vanished) > _VANISHED_KEPT:
                    del self._vanished[next(iter(self._vanished))]
            elif e.errno not in _NOT_MEANT:
                s.could_not_watch(path, e.errno or 0)
            return None
        self._vanished.pop(path, None)
        s.failed.pop(path, None)
        if path == self.path:
            s.root_wd = WatchDescriptor(wd)
        # A folder that has a watch already (the rebuild after an overflow; a move whose
        # IN_MOVED_FROM and IN_MOVED_TO did not pair up) is put at its place now: it has one
        # entry, so no stale name is left behind (torture seed 2: `mv A/d/b X/n; mv A X/n/m`
        # once put b's events under X/n/m/d/b, forever).
        if not self.tree.place(wd, parent, name):
            return None  # the folder is watched above: met again below itself through a bind mount
        self.tree.mark(wd)
        return wd

    def _move_watch(self, moved_from: PathedInotifyEvent | None, dst: bytes, parent: int, name: bytes) -> bool:
        """A folder moved within the root (from ``moved_from``, if its half was seen) to ``dst``:
        put its entry at its new place, and so everything below it. False if it was not watched."""
        wd: int | None = None
        try:
            # The kernel knows which watch the folder at dst has; a new one means it had none.
            found = self._fd.add_watch(dst, self.event_mask)
            if found in self.tree:
                wd = found
            else:
                self._fd.remove_watch(found)
        except OSError:
            # Moved on or removed already: find it by where it was (a scan of every watch); its
            # next event (moved again: IN_MOVED_FROM here; removed: IN_IGNORED) says the rest.
            found_at_source = self.tree.find(moved_from.path) if moved_from is not None else []
            wd = found_at_source[0] if found_at_source else None
        if wd is not None:
            self.tree.place(wd, parent, name)
        if moved_from is not None:
            # watchdog renames the watches it has below the source (inotify.py:322-338). A
            # folder it could not watch there is not among them: moved in from outside (or
            # made) and its parent moved away before its event was read, it was gone from the
            # path the event named (torture seed 13074143: a file made in it later was never
            # seen). Watch it at its new place; the scan of the move's destination covers what
            # came in between.
            src = moved_from.path
            prefix = src + b"/"
            for path in [p for p in self._vanished if p == src or p.startswith(prefix)]:
                del self._vanished[path]
                head, sub_name = os.path.split(dst + path[len(src) :])
                sub_parent = self._watch_of(head)
                if sub_parent is not None:
                    self._add_tree(dst + path[len(src) :], sub_parent, sub_name, None)
        return wd is not None and moved_from is not None

    def _watch_of(self, path: bytes) -> int | None:
        """The wd of a watched folder, asked of the kernel; None if it is not watched."""
        try:
            wd = self._fd.add_watch(path, self.event_mask)
        except OSError:
            return None
        if wd in self.tree:
            return wd
        self._fd.remove_watch(wd)  # not ours to watch: placed by this question alone
        return None

    def _drop(self, wds: list[int]) -> None:
        for wd in wds:
            self._fd.remove_watch(wd)
            self.tree.remove(wd)


_DIR_CREATED = Mask(InotifyConstants.IN_CREATE | InotifyConstants.IN_ISDIR)
_FILE_CREATED = Mask(InotifyConstants.IN_CREATE)


def _created(wd: int, folder: bytes, name: bytes, mask: Mask) -> PathedInotifyEvent:
    """The event a name found in a folder just watched stands for (watchdog's _recursive_simulate)."""
    return PathedInotifyEvent(InotifyEvent(WatchDescriptor(wd), mask, 0, name), join(folder, name))


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
        # follow_symlink=False (inotify.py:168-173): a symbolic link is never followed.
        mask = Mask(mask | InotifyConstants.IN_DONT_FOLLOW)
        fd = cast(_InotifyFD, self._inotify_fd)
        self._inotify = cast(InotifyWatchGroup, _WatchGroup(fd, self._session, mask))

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
    """One inotify instance per root (so a per-instance queue limit applies to it alone), whose
    events all go to one :class:`_WatchGroup`.

    watchdog's keeps a watch object per wd to find the callbacks of an event (inotify_c.py:
    335-367); here there is one group per instance, so the map is left empty and unused.
    """

    def __init__(self, session: InotifySession) -> None:
        super().__init__()
        self._session = session
        self.group: _WatchGroup | None = None
        self.name = f"treewatch-inotify {os.fsdecode(session.paths.top)}"

    def add_watch(self, path: bytes, mask: Mask) -> int:
        """inotify_add_watch(2): the folder's wd, the one it has if it is watched already."""
        wd = inotify_add_watch(self._inotify_fd, path, mask)
        if wd == -1:
            # Every failure raised: watchdog's _raise_error returns on EACCES (inotify_c.py:521).
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return int(wd)

    def remove_watch(self, wd: int) -> None:
        # EINVAL if the kernel dropped it meanwhile (folder removed, filesystem unmounted): fine.
        inotify_rm_watch(self._inotify_fd, WatchDescriptor(wd))

    def handle_event(self, event: InotifyEvent) -> None:
        group = self.group
        if group is None:
            return
        if event.is_queue_overflow:
            group.on_queue_overflow()
        elif event.is_ignored:
            group.on_watch_deleted(event.wd)
        else:
            group.on_event(event)

    def close(self) -> None:
        # watchdog's (inotify_c.py:312-333) without removing watch by watch: closing the
        # instance removes them all at once, and the group is inactive by now.
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._is_reading:
                os.write(self._kill_w, b"!")  # wakes the reader, which closes the descriptors
            else:
                self._close_resources()

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
        # A teardown that raises must not take the supervisor thread with it: watchdog's own,
        # removing watch by watch through its path maps, once raised KeyError here, and the
        # root went unwatched for good (torture seed 13631969). The session is thrown away
        # either way: closing the inotify instance below removes every watch at once, and the
        # supervisor starts a new session.
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
