"""What the watcher reports, and the pure mapping from watchdog's events to it.

:func:`map_event` turns one of watchdog's events into a root-relative :class:`WatchEvent`,
or into nothing (excluded, outside the root, or covered by another event). It does no I/O
and needs no observer: a :class:`RootPaths` value says how paths become root-relative and
what is left out, so it can be called with events made by hand. The ``file:line``
citations in the comments are watchdog 7.1.0's (``watchdog/events.py``,
``watchdog/observers/inotify.py``).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field

from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileSystemEvent,
    FileSystemMovedEvent,
)

from daemon.filters import Excluder


class EventKind(enum.Enum):
    CHANGED = "changed"  # a file (or with is_dir, a folder's own listing/metadata) changed
    DELETED = "deleted"
    CREATED_DIR = "created_dir"  # a new folder: walk it whole
    MOVED = "moved"
    OVERFLOW = "overflow"  # events were lost: full sync of the root
    WATCH_LIMIT = "watch_limit"  # folders could not be watched: now polling, full sync
    OBSERVER_DIED = "observer_died"  # a watchdog thread died: now polling until restored, full sync
    INOTIFY_RESTORED = "inotify_restored"  # inotify is back after a fallback: full sync
    ROOT_GONE = "root_gone"  # the root was deleted, moved or unmounted: now polling
    UNMOUNTED = "unmounted"  # a filesystem below the root was unmounted (IN_UNMOUNT): look at the mounts


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    rel: bytes | None = None  # root-relative path bytes (b"" = the root); MOVED: the source
    dest: bytes | None = None  # MOVED only: the destination
    is_dir: bool = False
    detail: str = ""  # OVERFLOW / WATCH_LIMIT / OBSERVER_DIED / ROOT_GONE: a sentence for the log


class LeftOut:
    """The mount points below a root with ``one_filesystem``: neither watched nor indexed.

    The set changes with the mount table: the loop swaps ``points`` for a new frozenset (one
    reference assignment) while watchdog's threads read it.
    """

    def __init__(self, points: frozenset[bytes] = frozenset()) -> None:
        self.points = points

    def covers(self, rel: bytes) -> bool:
        return any(rel == p or rel.startswith(p + b"/") for p in self.points)


@dataclass(frozen=True, slots=True)
class RootPaths:
    """A watched root as its events' paths see it: where it is, and what is left out of it."""

    top: bytes  # the root's real path, as watched
    excluder: Excluder
    left_out: LeftOut = field(default_factory=LeftOut)
    prefix: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.top.rstrip(b"/") + b"/")

    def rel(self, path: bytes | str) -> bytes | None:
        raw = path if isinstance(path, bytes) else os.fsencode(path)
        if raw == self.top:
            return b""
        return raw[len(self.prefix) :] if raw.startswith(self.prefix) else None

    def excluded(self, rel: bytes) -> bool:
        return rel != b"" and (self.excluder.any_component(rel) or self.left_out.covers(rel))


_FILE_CHANGED = (FileCreatedEvent, FileModifiedEvent, FileAttribEvent, FileClosedEvent)
# DirModifiedEvent is left out on purpose: watchdog makes one for the parent of every created,
# deleted, moved or written file (inotify.py:489-534), and a folder event means "list this
# folder" — for a folder of 100k files, per write. The child's own event is enough; the
# scanner refreshes the parent's own row from it (walk._refresh_own_entry).
_DIR_CHANGED = (DirAttribEvent,)


def _excluded_name(paths: RootPaths, rel: bytes | None) -> WatchEvent | None:
    """An excluded name made, removed or renamed right below a folder that is indexed: not an
    entry, but its folder's mtime moved. Reported as a change of the name itself; the scan of
    that scope refreshes the folder's own row and indexes nothing of the name (walk.walk_scope).
    Deeper in an excluded tree, or a mount point left out, nothing is reported."""
    if not rel or paths.left_out.covers(rel):
        return None
    parent = rel.rpartition(b"/")[0]
    if parent and paths.excluded(parent):
        return None
    return WatchEvent(EventKind.CHANGED, rel)


def _excluded_elsewhere(paths: RootPaths, excluded_end: bytes | None, other_end: bytes) -> bool:
    """A move's excluded end is a name right below an indexed folder other than the other end's:
    that folder's mtime moved too, so the event names both ends and the scan of the excluded one
    refreshes its folder's own row (walk.walk_scope). Torture seed 7072: `mv vol/lost+found
    vol/a/b/c` left the volume's own row with its old mtime. In one folder (an editor's safe
    save) the other end's scan refreshes it already."""
    if excluded_end is None or _excluded_name(paths, excluded_end) is None:
        return False
    return excluded_end.rpartition(b"/")[0] != other_end.rpartition(b"/")[0]


def map_event(event: FileSystemEvent, paths: RootPaths) -> WatchEvent | None:
    # Synthetic events are watchdog's walk of a folder moved or moved in (events.py:665-709):
    # one per descendant. MOVED of the folder and CREATED_DIR (walk it whole) already cover them.
    if event.is_synthetic:
        return None
    is_dir = event.is_directory
    if isinstance(event, FileSystemMovedEvent):
        src_rel = paths.rel(event.src_path)
        dest_rel = paths.rel(event.dest_path) if event.dest_path else None
        src = src_rel if src_rel and not paths.excluded(src_rel) else None  # b"": the root (ROOT_GONE)
        dest = dest_rel if dest_rel and not paths.excluded(dest_rel) else None
        if src is not None and dest is not None:
            return WatchEvent(EventKind.MOVED, src, dest, is_dir)
        if dest is not None:  # moved in, or from an excluded name (an editor's temp file)
            if _excluded_elsewhere(paths, src_rel, dest):
                return WatchEvent(EventKind.MOVED, src_rel, dest, is_dir)
            return WatchEvent(EventKind.CREATED_DIR if is_dir else EventKind.CHANGED, dest, is_dir=is_dir)
        if src is not None:  # moved out, or to an excluded name
            if _excluded_elsewhere(paths, dest_rel, src):
                return WatchEvent(EventKind.MOVED, src, dest_rel, is_dir)
            return WatchEvent(EventKind.DELETED, src, is_dir=is_dir)
        # From one excluded name to another (an editor's temp files): its folder's own mtime.
        return _excluded_name(paths, dest_rel)
    rel = paths.rel(event.src_path)
    if rel is None:
        return None
    if paths.excluded(rel):
        if isinstance(event, (FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent)):
            return _excluded_name(paths, rel)
        return None
    if isinstance(event, _FILE_CHANGED):
        return WatchEvent(EventKind.CHANGED, rel)
    if isinstance(event, _DIR_CHANGED):
        return WatchEvent(EventKind.CHANGED, rel, is_dir=True)
    if isinstance(event, DirCreatedEvent):
        return WatchEvent(EventKind.CREATED_DIR, rel, is_dir=True)
    if isinstance(event, (FileDeletedEvent, DirDeletedEvent)):
        # The root's own deletion is ROOT_GONE, reported from the raw inotify event.
        return WatchEvent(EventKind.DELETED, rel, is_dir=is_dir) if rel else None
    return None
