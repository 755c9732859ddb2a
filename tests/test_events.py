"""daemon.events.map_event, called directly: watchdog's events made by hand, no observer, no files.

The real inotify side (which events watchdog makes, and when) is tests/test_watch.py.
"""

from __future__ import annotations

import pytest
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
)

from daemon.events import EventKind, RootPaths, WatchEvent, map_event
from daemon.filters import Excluder

CHANGED, DELETED, CREATED_DIR, MOVED = EventKind.CHANGED, EventKind.DELETED, EventKind.CREATED_DIR, EventKind.MOVED
TOP = b"/srv/lib"
PATHS = RootPaths(TOP, Excluder([".stversions", "*.tmp"]))


def at(rel: bytes) -> bytes:
    return TOP + b"/" + rel


CASES: list[tuple[str, FileSystemEvent, WatchEvent | None]] = [
    ("file created", FileCreatedEvent(at(b"a.jpg")), WatchEvent(CHANGED, b"a.jpg")),
    ("file modified", FileModifiedEvent(at(b"d/a.jpg")), WatchEvent(CHANGED, b"d/a.jpg")),
    ("file attrib (chmod, xattr)", FileAttribEvent(at(b"a.jpg")), WatchEvent(CHANGED, b"a.jpg")),
    ("file closed after writing", FileClosedEvent(at(b"a.jpg")), WatchEvent(CHANGED, b"a.jpg")),
    ("file opened: not a change", FileOpenedEvent(at(b"a.jpg")), None),
    ("file closed unwritten: not a change", FileClosedNoWriteEvent(at(b"a.jpg")), None),
    ("folder attrib", DirAttribEvent(at(b"d")), WatchEvent(CHANGED, b"d", is_dir=True)),
    ("folder modified: watchdog's parent event, dropped", DirModifiedEvent(at(b"d")), None),
    ("folder created: walk it whole", DirCreatedEvent(at(b"d")), WatchEvent(CREATED_DIR, b"d", is_dir=True)),
    ("file deleted", FileDeletedEvent(at(b"d/a.jpg")), WatchEvent(DELETED, b"d/a.jpg")),
    ("folder deleted", DirDeletedEvent(at(b"d")), WatchEvent(DELETED, b"d", is_dir=True)),
    ("the root deleted: ROOT_GONE comes from inotify itself", DirDeletedEvent(TOP), None),
    ("root's own attrib", DirAttribEvent(TOP), WatchEvent(CHANGED, b"", is_dir=True)),
    (
        "file renamed inside the root",
        FileMovedEvent(at(b"x.jpg"), at(b"d/y.jpg")),
        WatchEvent(MOVED, b"x.jpg", b"d/y.jpg"),
    ),
    ("folder renamed inside the root", DirMovedEvent(at(b"d"), at(b"g")), WatchEvent(MOVED, b"d", b"g", is_dir=True)),
    ("file moved out of the root", FileMovedEvent(at(b"a.jpg"), b"/tmp/a.jpg"), WatchEvent(DELETED, b"a.jpg")),
    ("folder moved out", DirMovedEvent(at(b"d"), b"/tmp/d"), WatchEvent(DELETED, b"d", is_dir=True)),
    ("file moved in", FileMovedEvent(b"/tmp/a.jpg", at(b"a.jpg")), WatchEvent(CHANGED, b"a.jpg")),
    ("folder moved in: walk it whole", DirMovedEvent(b"/tmp/d", at(b"d")), WatchEvent(CREATED_DIR, b"d", is_dir=True)),
    (
        "safe save: excluded temp name renamed over",
        FileMovedEvent(at(b"b.tmp"), at(b"b.jpg")),
        WatchEvent(CHANGED, b"b.jpg"),
    ),
    ("renamed to an excluded name", FileMovedEvent(at(b"c.jpg"), at(b"c.tmp")), WatchEvent(DELETED, b"c.jpg")),
    # The excluded end's folder changed too: named, so its own row is refreshed (seed 7072).
    (
        "excluded folder moved into another folder",
        DirMovedEvent(at(b"vol/.stversions"), at(b"vol/a/b/c")),
        WatchEvent(MOVED, b"vol/.stversions", b"vol/a/b/c", is_dir=True),
    ),
    (
        "file moved to an excluded name in another folder",
        FileMovedEvent(at(b"d/c.jpg"), at(b"e/c.tmp")),
        WatchEvent(MOVED, b"d/c.jpg", b"e/c.tmp"),
    ),
    (
        "moved in from deep in an excluded tree: nothing of it is watched or indexed",
        DirMovedEvent(at(b".stversions/x"), at(b"d/x")),
        WatchEvent(CREATED_DIR, b"d/x", is_dir=True),
    ),
    # Not entries, but their folder's mtime moved: the scan refreshes the folder's own row.
    ("renamed between excluded names", FileMovedEvent(at(b"a.tmp"), at(b"b.tmp")), WatchEvent(CHANGED, b"b.tmp")),
    ("the root itself moved", DirMovedEvent(TOP, b"/srv/old"), None),
    ("moved from outside to outside", FileMovedEvent(b"/tmp/a", b"/tmp/b"), None),
    ("excluded name made", FileCreatedEvent(at(b"a.tmp")), WatchEvent(CHANGED, b"a.tmp")),
    ("excluded folder removed", DirDeletedEvent(at(b".stversions")), WatchEvent(CHANGED, b".stversions")),
    ("excluded name written: its folder did not change", FileModifiedEvent(at(b"a.tmp")), None),
    ("below an excluded folder", FileCreatedEvent(at(b".stversions/v1/a.jpg")), None),
    ("inside a folder with an excluded name", FileCreatedEvent(at(b"scratch.tmp/x")), None),
    ("a sibling whose name starts like the root", FileCreatedEvent(b"/srv/library/a.jpg"), None),
    (
        "synthetic: one per descendant of a moved folder",
        FileMovedEvent(at(b"d/a"), at(b"g/a"), is_synthetic=True),
        None,
    ),
    ("synthetic: one per descendant of a folder moved in", DirCreatedEvent(at(b"d/e"), is_synthetic=True), None),
    ("not UTF-8: the bytes round-trip", FileCreatedEvent(at(b"caf\xe9.jpg")), WatchEvent(CHANGED, b"caf\xe9.jpg")),
    ("a str path is encoded", FileCreatedEvent("/srv/lib/café.jpg"), WatchEvent(CHANGED, "café.jpg".encode())),
]


@pytest.mark.parametrize(("event", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_map_event(event: FileSystemEvent, expected: WatchEvent | None) -> None:
    assert map_event(event, PATHS) == expected


@pytest.mark.parametrize(
    ("top", "path", "rel"),
    [
        (b"/srv/lib", b"/srv/lib", b""),
        (b"/srv/lib", b"/srv/lib/a/b", b"a/b"),
        (b"/srv/lib", b"/srv/lib2/a", None),
        (b"/srv/lib", b"/srv", None),
        (b"/", b"/a/b", b"a/b"),
        (b"/", b"/", b""),
    ],
)
def test_root_relative_paths(top: bytes, path: bytes, rel: bytes | None) -> None:
    assert RootPaths(top, Excluder([])).rel(path) == rel


def test_the_root_itself_is_never_excluded() -> None:
    paths = RootPaths(TOP, Excluder(["*"]))
    assert not paths.excluded(b"")
    assert paths.excluded(b"a")
