"""daemon.watch and daemon.inotify against real inotify: real files in tmp_path, a real asyncio loop, real limits.

Every wait is on a condition with a deadline. The overflow test lowers the global
fs.inotify.max_queued_events only while the watcher creates its inotify instance; the
watch-limit tests run in a user namespace whose own user.max_inotify_watches is lowered,
so nothing else on the machine is affected.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_move_event_grouper import GroupedInotifyEvent

from daemon import inotify
from daemon.config import RootConfig, WatchConfig
from daemon.events import EventKind, WatchEvent
from daemon.rules import uses_polling
from daemon.watch import RootWatcher
from tests.conftest import MAX_QUEUED, lowered_queue, queue_sysctl_held

REPO = Path(__file__).resolve().parents[1]
CHANGED, DELETED, CREATED_DIR, MOVED = EventKind.CHANGED, EventKind.DELETED, EventKind.CREATED_DIR, EventKind.MOVED
USERNS_WATCHES = "/proc/sys/user/max_inotify_watches"


@dataclass
class Run:
    watcher: RootWatcher
    events: list[WatchEvent] = field(default_factory=list)
    off_loop: list[str] = field(default_factory=list)  # sink calls seen on another thread
    watched_at_overflow: list[int] = field(default_factory=list)  # watched folders as OVERFLOW arrived

    def find(
        self, kind: EventKind, rel: bytes | None = None, dest: bytes | None = None, is_dir: bool | None = None
    ) -> WatchEvent | None:
        for e in self.events:
            same_paths = (rel is None or e.rel == rel) and (dest is None or e.dest == dest)
            if e.kind is kind and same_paths and (is_dir is None or e.is_dir == is_dir):
                return e
        return None

    async def seen(self, kind: EventKind, rel: bytes | None = None, **kw: Any) -> WatchEvent:
        event = await until(lambda: self.find(kind, rel, **kw), f"{kind.name} {rel!r} {kw} in {self.events}")
        assert isinstance(event, WatchEvent)
        return event


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> object:
    """Await ``condition`` being truthy, checking every 20 ms, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


@contextlib.asynccontextmanager
async def watching(
    root: Path,
    *,
    observer: str = "inotify",
    exclude: tuple[str, ...] | None = None,
    retry_base_s: float = 60.0,
    queue_limit: int | None = None,
) -> AsyncIterator[Run]:
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    cfg = RootConfig(root, observer) if exclude is None else RootConfig(root, observer, exclude)
    run: Run

    def sink(event: WatchEvent) -> None:
        if threading.get_ident() != loop_thread:
            run.off_loop.append(threading.current_thread().name)
        if event.kind is EventKind.OVERFLOW:
            run.watched_at_overflow.append(run.watcher.watched_dirs)
        run.events.append(event)

    watcher = RootWatcher(cfg, WatchConfig(poll_interval_s=0.2), loop, sink, retry_base_s=retry_base_s)
    run = Run(watcher)
    with lowered_queue(queue_limit) if queue_limit is not None else contextlib.nullcontext():
        await asyncio.to_thread(watcher.start)
    try:
        yield run
    finally:
        await asyncio.to_thread(watcher.stop)
        watcher.stop()  # idempotent
        assert watcher.mode == "stopped"
        assert run.off_loop == []
        left = [t.name for t in threading.enumerate() if t.name.startswith("treewatch") and str(root) in t.name]
        assert left == []


@contextlib.contextmanager
def reader_held(run: Run) -> Iterator[None]:
    """The root's inotify reader kept from reading, so that a burst written meanwhile overflows a
    small queue however fast this machine's reader is. It takes this lock around each read
    (watchdog 7.1, inotify_c.py:397-417): held, it reads at most the batch it was waiting for."""
    session = run.watcher._session
    assert session is not None and session.observer is not None
    with session.observer._inotify_fd._lock:
        yield


def b(path: Path) -> bytes:
    return os.fsencode(path)


def test_file_created_modified_deleted_with_exact_bytes(library: Path) -> None:
    name = b"caf\xe9.jpg"  # not UTF-8: must round-trip as bytes
    path = b(library) + b"/" + name

    async def scenario() -> None:
        async with watching(library) as run:
            assert run.watcher.mode == "inotify"
            assert (run.watcher.expected_dirs, run.watcher.watched_dirs) == (1, 1)
            with open(path, "wb") as f:
                f.write(b"x")
            await run.seen(CHANGED, name, is_dir=False)
            # watchdog's synthetic "parent folder modified" is dropped: listing a folder per
            # write in it would cost work proportional to the folder (the scanner refreshes
            # the parent's own row from the child's event instead).
            assert not any(e.is_dir for e in run.events), run.events
            run.events.clear()
            with open(path, "ab") as f:
                f.write(b"y")
            await run.seen(CHANGED, name)
            run.events.clear()
            os.unlink(path)
            await run.seen(DELETED, name, is_dir=False)

    asyncio.run(scenario())


def test_new_folder_is_reported_and_watched(library: Path) -> None:
    async def scenario() -> None:
        async with watching(library) as run:
            (library / "a" / "b").mkdir(parents=True)
            (library / "a" / "b" / "c.txt").write_text("early")  # before watchdog watched a/b, maybe
            await run.seen(CREATED_DIR, b"a", is_dir=True)
            # Either the file itself or a walkable folder above it is reported.
            await until(lambda: run.find(CHANGED, b"a/b/c.txt") or run.find(CREATED_DIR, b"a/b"), "a/b/c.txt or a/b")
            await until(lambda: run.watcher.watched_dirs == 3, "watches on root, a, a/b")
            (library / "a" / "b" / "late.txt").write_text("late")
            await run.seen(CHANGED, b"a/b/late.txt")
            assert run.watcher.expected_dirs == 3

    asyncio.run(scenario())


def test_renames_inside_the_root_carry_both_paths(library: Path) -> None:
    (library / "x.jpg").write_text("x")
    (library / "d" / "e").mkdir(parents=True)
    (library / "d" / "e" / "f.jpg").write_text("f")

    async def scenario() -> None:
        async with watching(library) as run:
            (library / "x.jpg").rename(library / "y.jpg")
            await run.seen(MOVED, b"x.jpg", dest=b"y.jpg", is_dir=False)
            (library / "d").rename(library / "g")
            await run.seen(MOVED, b"d", dest=b"g", is_dir=True)
            # The watches moved with the folder: a change inside is reported at its new path.
            (library / "g" / "e" / "new.jpg").write_text("n")
            await run.seen(CHANGED, b"g/e/new.jpg")
            # One MOVED for the folder, none per descendant (watchdog's synthetic events).
            assert [e.rel for e in run.events if e.kind is MOVED] == [b"x.jpg", b"d"]

    asyncio.run(scenario())


def test_moves_across_the_root_boundary(tmp_path: Path, library: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "in_dir" / "sub").mkdir(parents=True)
    (outside / "in.jpg").write_text("in")
    (library / "out.jpg").write_text("out")
    (library / "out_dir").mkdir()

    async def scenario() -> None:
        async with watching(library) as run:
            (library / "out.jpg").rename(outside / "out.jpg")
            await run.seen(DELETED, b"out.jpg", is_dir=False)
            (library / "out_dir").rename(outside / "out_dir")
            await run.seen(DELETED, b"out_dir", is_dir=True)
            (outside / "in.jpg").rename(library / "in.jpg")
            await run.seen(CHANGED, b"in.jpg", is_dir=False)
            (outside / "in_dir").rename(library / "in_dir")
            await run.seen(CREATED_DIR, b"in_dir", is_dir=True)
            await until(lambda: run.watcher.watched_dirs == 3, "watches on the moved-in folders")
            (library / "in_dir" / "sub" / "later.jpg").write_text("l")
            await run.seen(CHANGED, b"in_dir/sub/later.jpg")
            assert run.find(MOVED) is None

    asyncio.run(scenario())


def test_excluded_names_are_neither_watched_nor_reported_below_their_folder(library: Path) -> None:
    (library / ".stversions" / "old").mkdir(parents=True)

    async def scenario() -> None:
        async with watching(library, exclude=(".stversions", "*.tmp")) as run:
            assert run.watcher.watched_dirs == 1  # .stversions and below: not watched
            (library / "a.tmp").write_text("t")
            (library / "b.tmp").write_text("t")
            (library / ".stversions" / "v1.jpg").write_text("v")
            (library / "scratch.tmp").mkdir()
            (library / "scratch.tmp" / "x").write_text("x")
            (library / "b.tmp").rename(library / "b.jpg")  # an editor's safe save
            (library / "c.jpg").write_text("c")
            (library / "c.jpg").rename(library / "c.tmp")
            (library / "sentinel").write_text("s")
            await run.seen(CHANGED, b"sentinel")  # everything before it has been delivered
            assert run.find(CHANGED, b"b.jpg") is not None
            assert run.find(DELETED, b"c.jpg") is not None
            # An excluded name made right below a watched folder is reported as itself, a change
            # (its folder's mtime moved; the scan indexes nothing of it); nothing below an
            # excluded folder is reported at all.
            named = {p for e in run.events for p in (e.rel, e.dest) if p and (b".tmp" in p or b".stversions" in p)}
            assert named <= {b"a.tmp", b"b.tmp", b"scratch.tmp"}, run.events
            assert all(e.kind is CHANGED and e.dest is None for e in run.events if e.rel in named), run.events
            assert run.watcher.watched_dirs == 1

    asyncio.run(scenario())


async def caught_up(run: Run, folder: Path, timeout: float = 120.0) -> None:
    """Until the watcher has handled every event so far: a fresh file's event has come through.

    The reader thread handles the kernel's queue in order, so once an event of that file is
    delivered, so is every overflow queued before it, with watchdog's rebuild of the watches
    after it. If the file's events were lost to a new overflow instead, another file is tried.
    """
    deadline = time.monotonic() + timeout
    for n in itertools.count():
        overflows = sum(e.kind is EventKind.OVERFLOW for e in run.events)
        name = f"caught-up-{n}".encode()
        (folder / os.fsdecode(name)).write_bytes(b"")

        def through_or_lost(name: bytes = name, overflows: int = overflows) -> bool:
            lost = sum(e.kind is EventKind.OVERFLOW for e in run.events) > overflows
            return run.find(CHANGED, name) is not None or lost

        await until(through_or_lost, f"{name!r} or a new overflow", timeout=max(deadline - time.monotonic(), 0))
        if run.find(CHANGED, name) is not None:
            return


@pytest.mark.root
def test_a_real_queue_overflow_is_reported_with_the_sysctl(library: Path) -> None:
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_queued_events")

    async def scenario() -> None:
        before = int(MAX_QUEUED.read_text())
        async with watching(library, queue_limit=16) as run:
            assert int(MAX_QUEUED.read_text()) == before  # restored as soon as the instance exists
            with reader_held(run):
                for i in range(200):
                    (library / f"f{i:04}").write_bytes(b"")
            event = await run.seen(EventKind.OVERFLOW)
            assert f"fs.inotify.max_queued_events from {before} to {before * 4}" in event.detail
            # On a busy machine the reader thread can still be working through the burst when
            # the first overflow arrives: more overflows, each followed by watchdog removing and
            # re-adding every watch. A folder made then can lose its IN_CREATE to either.
            await caught_up(run, library)
            # Still watching, and watchdog re-added the watches: new folders are followed.
            assert run.watcher.mode == "inotify"
            (library / "after").mkdir()
            await run.seen(CREATED_DIR, b"after")
            (library / "after" / "x").write_text("x")
            await run.seen(CHANGED, b"after/x")

    # The message names the value in force at the overflow: no other run may change it meanwhile.
    with queue_sysctl_held():
        asyncio.run(scenario())


def test_an_overflow_is_reported_once_every_watch_is_back(library: Path) -> None:
    """watchdog re-adds every watch after an overflow; the full sync the overflow brings must
    not list a folder before its watch is back (a change there would be seen by neither). So
    whenever OVERFLOW reaches the loop, every folder is watched again."""
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_queued_events")
    folders = 3000  # re-adding their watches takes long enough to be seen half done
    for i in range(folders):
        (library / f"d{i:04}").mkdir()
    watched_when_told: list[int] = []

    async def scenario() -> None:
        async with watching(library, queue_limit=16) as run:
            with reader_held(run):
                for i in range(200):
                    (library / "d0000" / f"f{i:03}").write_bytes(b"")
            await run.seen(EventKind.OVERFLOW)
            await caught_up(run, library)
            watched_when_told.extend(run.watched_at_overflow)

    with queue_sysctl_held():
        asyncio.run(scenario())
    assert watched_when_told and all(n == folders + 1 for n in watched_when_told), watched_when_told


def test_a_folder_moved_in_is_watched_though_its_parent_moved_before_the_event_was_read(library: Path) -> None:
    """A folder moved in from outside, then its parent moved away, both before the reader read
    the first event: the folder was gone from the path that event named, so watchdog could not
    watch it, and a file made in it later was never seen (torture seed 13074143). The reader is
    held so that the order is this one whatever the machine's speed."""
    outside = library.parent / "outside"
    (outside / "x" / "y").mkdir(parents=True)
    (library / "deep" / "a").mkdir(parents=True)

    async def scenario() -> None:
        async with watching(library) as run:
            with reader_held(run):
                os.rename(outside / "x", library / "deep" / "a" / "n")
                os.rename(library / "deep", library / "moved")
            await run.seen(MOVED, b"deep", dest=b"moved")
            (library / "moved" / "a" / "n" / "new").write_bytes(b"1")
            (library / "moved" / "a" / "n" / "y" / "new").write_bytes(b"1")
            await run.seen(CHANGED, b"moved/a/n/new")
            await run.seen(CHANGED, b"moved/a/n/y/new")

    asyncio.run(scenario())


def test_folders_moved_again_before_their_events_were_read_are_named_where_they_ended(library: Path) -> None:
    """The watches follow a folder by its descriptor, asked of the kernel at the move's
    destination: moved on before the first move was read, it is found where it was, and named
    where it ended by its next move. The nested case is torture seed 2 (`mv A/d/b X/n; mv A
    X/n/m`), which once left b's events under X/n/m/d/b for good."""
    (library / "d" / "e").mkdir(parents=True)
    (library / "A" / "d" / "b" / "c").mkdir(parents=True)
    (library / "X").mkdir()

    async def scenario() -> None:
        async with watching(library) as run:
            watched = run.watcher.watched_dirs
            with reader_held(run):
                os.rename(library / "d", library / "x")
                os.rename(library / "x", library / "y")
                os.rename(library / "A" / "d" / "b", library / "X" / "n")
                os.rename(library / "A", library / "X" / "n" / "m")
            await run.seen(MOVED, b"x", dest=b"y")
            await run.seen(MOVED, b"A", dest=b"X/n/m")
            for rel in ("y/e/f", "X/n/c/f", "X/n/m/d/f", "X/n/m/f"):
                (library / rel).write_bytes(b"1")
                await run.seen(CHANGED, os.fsencode(rel))
            assert run.watcher.watched_dirs == watched
            changed = sorted({e.rel for e in run.events if e.kind is CHANGED and e.rel is not None})
            assert changed == [b"X/n/c/f", b"X/n/m/d/f", b"X/n/m/f", b"y/e/f"]

    asyncio.run(scenario())


def test_a_folder_moved_out_is_forgotten_and_one_made_at_its_name_is_watched(tmp_path: Path, library: Path) -> None:
    """Moved out of the root while a new folder took its name, or renamed and then moved out,
    all before the events were read: the old folders' watches go (a change out there is not
    reported under the root's path) and the new one is watched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (library / "d" / "e").mkdir(parents=True)
    (library / "g" / "e").mkdir(parents=True)

    async def scenario() -> None:
        async with watching(library) as run:
            with reader_held(run):
                os.rename(library / "d", outside / "d")
                (library / "d").mkdir()
                os.rename(library / "g", library / "h")
                os.rename(library / "h", outside / "h")
            await run.seen(DELETED, b"d", is_dir=True)
            await run.seen(DELETED, b"h", is_dir=True)
            await until(lambda: run.watcher.watched_dirs == 2, "watches on the root and the new d only")
            (outside / "d" / "e" / "f").write_bytes(b"out")
            (outside / "h" / "e" / "f").write_bytes(b"out")
            (library / "d" / "new").write_bytes(b"in")
            await run.seen(CHANGED, b"d/new")
            assert [e.rel for e in run.events if e.rel and e.rel.endswith(b"e/f")] == []

    asyncio.run(scenario())


def test_polling_observer_places_nothing_and_emits_nothing(library: Path) -> None:
    async def scenario() -> None:
        async with watching(library, observer="polling") as polled, watching(library) as sentinel:
            assert polled.watcher.mode == "polling"
            (library / "new.jpg").write_text("n")
            await sentinel.seen(CHANGED, b"new.jpg")  # the change was visible to inotify by now
            assert polled.events == []
            assert (polled.watcher.expected_dirs, polled.watcher.watched_dirs) == (0, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("observer", "fstype", "polled"),
    [
        ("auto", "ext4", False),
        ("auto", "btrfs", False),
        ("auto", "nfs", True),
        ("auto", "nfs4", True),
        ("auto", "cifs", True),
        ("auto", "smb3", True),
        ("auto", "9p", True),
        ("auto", "fuse.sshfs", True),
        ("auto", "fuse.mergerfs", True),
        ("auto", "fuseblk", False),  # ntfs-3g on a local disk: every change goes through this host
        ("inotify", "nfs4", False),  # the admin's explicit choice wins
        ("polling", "ext4", True),
    ],
)
def test_observer_choice(observer: str, fstype: str, polled: bool) -> None:
    assert uses_polling(observer, fstype) is polled


def test_root_gone_then_back(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.mkdir()

    async def scenario() -> None:
        async with watching(root, retry_base_s=0.2) as run:
            (root / "x").write_text("x")
            await run.seen(CHANGED, b"x")
            shutil.rmtree(root)
            gone = await run.seen(EventKind.ROOT_GONE, b"")
            assert run.watcher.mode == "polling"
            assert run.find(DELETED, b"") is None
            assert str(root) in gone.detail
            root.mkdir()
            await run.seen(EventKind.INOTIFY_RESTORED)
            assert run.watcher.mode == "inotify"
            (root / "y").write_text("y")
            await run.seen(CHANGED, b"y")

    asyncio.run(scenario())


def emitter_dies_once_on_boom(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Fault injection into watchdog, not into the daemon: watchdog's own emitter raises once,
    on a file named "boom"; the list it returns then holds one True. The daemon's emitter calls
    it through super(), so the real thread dies through the daemon's real code path."""
    original = InotifyEmitter.build_and_queue_event
    raised: list[bool] = []

    def faulty(self: InotifyEmitter, event: GroupedInotifyEvent, *, full_events: bool = False) -> None:
        path = getattr(event, "path", b"")
        if isinstance(path, bytes) and path.endswith(b"/boom") and not raised:
            raised.append(True)
            raise RuntimeError("injected")
        original(self, event, full_events=full_events)

    monkeypatch.setattr(InotifyEmitter, "build_and_queue_event", faulty)
    return raised


def test_a_dead_observer_thread_is_reported_and_restarted(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emitter_dies_once_on_boom(monkeypatch)

    async def scenario() -> None:
        async with watching(library) as run:
            (library / "boom").write_text("b")
            died = await run.seen(EventKind.OBSERVER_DIED)
            assert "emitter" in died.detail
            assert "injected" in died.detail
            await run.seen(EventKind.INOTIFY_RESTORED)  # restarted at once the first time
            assert run.watcher.mode == "inotify"
            (library / "after").write_text("a")
            await run.seen(CHANGED, b"after")

    asyncio.run(scenario())


def test_a_teardown_that_fails_still_restarts_inotify(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A teardown that raised killed the supervisor thread, and the root stayed unwatched for
    good with nothing said (torture seed 13631969: watchdog's own teardown walked its path
    maps, which disagreed). Fault injection: the emitter dies on "boom", and the dead
    session's watch group raises as it is torn down."""
    (library / "sub").mkdir()
    deactivate = inotify._WatchGroup.deactivate
    armed = emitter_dies_once_on_boom(monkeypatch)

    def fails(self: inotify._WatchGroup) -> None:
        if armed and len(armed) == 1:
            armed.append(True)
            raise KeyError("injected at teardown")
        deactivate(self)

    monkeypatch.setattr(inotify._WatchGroup, "deactivate", fails)

    async def scenario() -> None:
        async with watching(library) as run:
            (library / "boom").write_text("b")
            await run.seen(EventKind.OBSERVER_DIED)
            await run.seen(EventKind.INOTIFY_RESTORED)
            assert len(armed) == 2, "the teardown raised"
            assert run.watcher.mode == "inotify"
            (library / "sub" / "after").write_text("a")
            await run.seen(CHANGED, b"sub/after")

    asyncio.run(scenario())


# The watch-limit tests run this in a user namespace (`unshare -U -r`), whose own
# /proc/sys/user/max_inotify_watches caps the watches its processes may hold.
CHILD = """
import asyncio, json, os, sys, time
from pathlib import Path
from daemon.config import RootConfig, WatchConfig
from daemon.events import EventKind
from daemon.watch import RootWatcher

root, limit = Path(sys.argv[1]), sys.argv[2]
LIMIT = "/proc/sys/user/max_inotify_watches"

def out(**kw):
    print(json.dumps(kw), flush=True)

async def until(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            out(timeout=what)
            sys.exit(3)
        await asyncio.sleep(0.02)

def kinds(events, kind):
    return [e for e in events if e.kind is kind]

async def main():
    with open(LIMIT, "w") as f:
        f.write(limit)
    loop = asyncio.get_running_loop()
    events = []
    def sink(ev):
        events.append(ev)
        out(event=ev.kind.name, rel=os.fsdecode(ev.rel or b""), detail=ev.detail, mode=watcher.mode,
            expected=watcher.expected_dirs, watched=watcher.watched_dirs)
    watcher = RootWatcher(RootConfig(root), WatchConfig(), loop, sink, retry_base_s=0.2, retry_max_s=1.0)
    await asyncio.to_thread(watcher.start)
    await until(lambda: kinds(events, EventKind.WATCH_LIMIT), "WATCH_LIMIT")
    # A measured window (not a wait for anything): the retries it holds must cost next to nothing.
    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.sleep(2.5)
    out(phase="limited", mode=watcher.mode, cpu_s=time.process_time() - cpu, wall_s=time.monotonic() - wall,
        events=len(events))
    with open(LIMIT, "w") as f:
        f.write("1000000")
    await until(lambda: kinds(events, EventKind.INOTIFY_RESTORED), "INOTIFY_RESTORED")
    out(phase="restored", mode=watcher.mode, expected=watcher.expected_dirs, watched=watcher.watched_dirs)
    (root / "after.txt").write_text("x")
    await until(lambda: any(e.kind is EventKind.CHANGED and e.rel == b"after.txt" for e in events), "after.txt")
    await asyncio.to_thread(watcher.stop)
    out(phase="done", mode=watcher.mode)

asyncio.run(main())
"""


def run_in_user_namespace(root: Path, limit: int) -> list[dict[str, Any]]:
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", f"echo 5 > {USERNS_WATCHES}"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"no user namespace with a writable {USERNS_WATCHES}: {probe.stderr.decode().strip()}")
    result = subprocess.run(
        ["unshare", "-U", "-r", sys.executable, "-c", CHILD, str(root), str(limit)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (lines, result.stderr)
    return lines


@pytest.mark.root
def test_watch_limit_falls_back_to_polling_and_backs_off_until_restored(library: Path) -> None:
    for i in range(40):
        (library / f"d{i:02}").mkdir()  # 41 folders with the root; the namespace allows 10 watches
    lines = run_in_user_namespace(library, 10)
    events = [line for line in lines if "event" in line]
    limit = next(e for e in events if e["event"] == "WATCH_LIMIT")
    assert "fs.inotify.max_user_watches" in limit["detail"]
    assert "user.max_inotify_watches is 10: raise it to 82" in limit["detail"]
    assert limit["mode"] == "polling"
    assert limit["expected"] == 41
    assert limit["watched"] < limit["expected"]
    # max(current * 2, folders * 2): current is the init namespace's fs.inotify.max_user_watches.
    current = int(Path("/proc/sys/fs/inotify/max_user_watches").read_text())
    assert f"to {max(current * 2, 82)}" in limit["detail"]

    limited = next(line for line in lines if line.get("phase") == "limited")
    assert limited["mode"] == "polling"
    assert limited["events"] == 1  # one WATCH_LIMIT; failed retries are quiet
    assert limited["cpu_s"] < 0.5, limited  # backoff, not spinning: a few retries in 2.5 s

    restored = next(e for e in events if e["event"] == "INOTIFY_RESTORED")
    assert restored["mode"] == "inotify"
    after = next(line for line in lines if line.get("phase") == "restored")
    assert after["expected"] == after["watched"] == 41
    assert any(e["event"] == "CHANGED" and e["rel"] == "after.txt" for e in events)
    assert lines[-1] == {"phase": "done", "mode": "stopped"}


# An unmounted root: a tmpfs mounted over the root in a private mount namespace, then unmounted.
UNMOUNT_CHILD = """
import asyncio, json, os, subprocess, sys, time
from pathlib import Path
from daemon.config import RootConfig, WatchConfig
from daemon.events import EventKind
from daemon.watch import RootWatcher

root = Path(sys.argv[1])
subprocess.run(["mount", "-t", "tmpfs", "tw-test", str(root)], check=True)
(root / "sub").mkdir()

def out(**kw):
    print(json.dumps(kw), flush=True)

async def until(cond, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            out(timeout=what)
            sys.exit(3)
        await asyncio.sleep(0.02)

async def main():
    loop = asyncio.get_running_loop()
    events = []
    def sink(ev):
        events.append(ev)
        out(event=ev.kind.name, rel=os.fsdecode(ev.rel or b""), detail=ev.detail, mode=watcher.mode)
    watcher = RootWatcher(RootConfig(root), WatchConfig(), loop, sink, retry_base_s=0.2)
    await asyncio.to_thread(watcher.start)
    out(phase="started", mode=watcher.mode, watched=watcher.watched_dirs)
    subprocess.run(["umount", str(root)], check=True)
    await until(lambda: any(e.kind is EventKind.ROOT_GONE for e in events), "ROOT_GONE")
    await until(lambda: any(e.kind is EventKind.INOTIFY_RESTORED for e in events), "INOTIFY_RESTORED")
    await asyncio.to_thread(watcher.stop)
    out(phase="done")

asyncio.run(main())
"""


@pytest.mark.root
def test_unmounted_root_is_root_gone(library: Path) -> None:
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace: {probe.stderr.decode().strip()}")
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", UNMOUNT_CHILD, str(library)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0, (lines, result.stderr)
    assert lines[0] == {"phase": "started", "mode": "inotify", "watched": 2}
    gone = next(line for line in lines if line.get("event") == "ROOT_GONE")
    assert gone["mode"] == "polling"
    assert "IN_UNMOUNT" in gone["detail"] or "IN_IGNORED" in gone["detail"]
    # Back on the (empty) folder below: watched again; the scheduler's offline rule decides the rest.
    assert any(line.get("event") == "INOTIFY_RESTORED" for line in lines)
