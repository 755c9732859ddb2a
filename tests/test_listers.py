"""Lister processes: a sync's walk hands known folders to them, and reads itself only what they
hand back. Every whole-root sync of the engine's tests (tests/test_scan_cases.py,
tests/test_folder_digest.py, tests/test_scan_property.py) runs through them as well; these
tests check that they really decide folders, and what they hand back and why."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import fs
from daemon.filters import Excluder
from daemon.index import Index, sqlite_uri
from daemon.journal import ScanJournal
from daemon.listers import SPLIT_DEPTH, Answer, Listers, Setup, list_below
from daemon.model import Op, ScanScope, stat_fields
from daemon.walk import WalkState, digest_seed, walk_scope
from tests.engine import settle
from tests.test_scan_cases import sync

# Deeper than SPLIT_DEPTH, so a lister both hands subfolders out and goes below them itself.
FOLDERS = [f"top{t}/y{y}/m{m}/e{e}" for t in range(3) for y in range(2) for m in range(2) for e in range(2)]


@pytest.fixture
def index(db: Path) -> Iterator[Index]:
    idx = Index(db)
    yield idx
    idx.close()


@pytest.fixture
def tree(library: Path, index: Index) -> Path:
    """A tree indexed and synced once more, so every folder has its digest."""
    assert len(FOLDERS[0].split("/")) > SPLIT_DEPTH
    for folder in FOLDERS:
        (library / folder).mkdir(parents=True)
        for i in range(3):
            (library / folder / f"f{i}.jpg").write_bytes(folder.encode() * (i + 1))
    settle(library)
    sync(index, library)
    sync(index, library)
    return library


def entries_on_disk(root: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


def folders_on_disk(root: Path) -> int:
    return sum(len(dirs) for _, dirs, _ in os.walk(root))


def setup_of(index: Index, root: Path, excludes: tuple[str, ...] = (), points: frozenset[bytes] = frozenset()) -> Setup:
    return Setup(str(index.path), 1, os.fsencode(root), digest_seed(Excluder(excludes)), excludes, points)


def walk_with(index: Index, root: Path, listers: Listers) -> WalkState:
    state = WalkState(ScanJournal.begin(index, 1, "full", "[]"), 1000)
    try:
        walk_scope(state, os.fsencode(root), ScanScope(os.fsencode(root), b""), Excluder(()), lambda: False, listers)
    finally:
        listers.close()
    state.flush()
    return state


def queued(index: Index) -> list[bytes]:
    return [bytes(r[0]) for r in index.db.execute("SELECT path FROM scan_queue ORDER BY path")]


def test_an_unchanged_tree_is_decided_by_the_listers_alone(tree: Path, index: Index) -> None:
    listers = Listers(2, setup_of(index, tree))
    state = walk_with(index, tree, listers)
    assert state.seen == entries_on_disk(tree)
    assert listers.unchanged == folders_on_disk(tree)  # every folder but the root, which the walk lists
    assert listers.handed_back == 0
    assert queued(index) == []
    assert state.errors == {}
    assert listers.lost == []


def test_a_changed_folder_is_handed_back_and_read_by_the_walk(tree: Path, index: Index) -> None:
    (tree / "top1/y0/m1/e0/f1.jpg").write_bytes(b"new content, new size")
    (tree / "top2/y1/new.jpg").write_bytes(b"a new file")
    listers = Listers(2, setup_of(index, tree))
    state = walk_with(index, tree, listers)
    # e0 (a file's size), y1 (a new name) and top2, whose listing holds y1's new mtime.
    assert listers.handed_back == 3
    assert listers.unchanged == folders_on_disk(tree) - 3
    assert queued(index) == [b"top1/y0/m1/e0/f1.jpg", b"top2/y1", b"top2/y1/new.jpg"]  # y1: its mtime
    assert state.seen == entries_on_disk(tree)
    sync(index, tree)  # and the whole scan, through the listers, matches the disk


def test_a_lister_killed_before_the_walk_costs_only_time(tree: Path, index: Index) -> None:
    (tree / "top0/y1/m0/e1/f0.jpg").write_bytes(b"changed")
    listers = Listers(2, setup_of(index, tree))
    dead = listers.listers[0].process
    assert dead is not None
    dead.kill()
    dead.wait()
    state = walk_with(index, tree, listers)
    assert listers.handed_back >= 1  # what the dead one was sent came back to the walk
    assert queued(index) == [b"top0/y1/m0/e1/f0.jpg"]
    assert state.seen == entries_on_disk(tree)
    assert listers.lost == ["killed by SIGKILL"]  # for the log: the sync was slower, and why


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="a sync starts listers only with two cores or more")
def test_a_sync_whose_listers_cannot_read_the_index_is_whole_and_says_why(tree: Path, index: Index) -> None:
    """The listers open the database by its name, after the scan has: renamed in between (as a
    file moved by hand would be), they cannot, and the walk lists every folder itself."""
    (tree / "top2/y0/m1/e1/new.jpg").write_bytes(b"new")
    moved = index.path.with_name("moved.db")
    index.path.rename(moved)  # the scan's own connection keeps its open file
    try:
        report = sync(index, tree)
    finally:
        moved.rename(index.path)
    assert report.listers_lost == ["could not open the index read-only"] * 2
    assert report.ops[Op.ADDED] == 1


def test_close_while_folders_are_out_leaves_no_lister_alive(tree: Path, index: Index) -> None:
    listers = Listers(2, setup_of(index, tree))
    for top in ("top0", "top1", "top2"):
        listers.submit(top.encode(), fs.lstat(os.fsencode(tree / top)))
    assert listers.pending
    listers.close()
    for lister in listers.listers:
        assert lister.process is not None and lister.process.returncode is not None
    assert listers.lost == []  # killed by the walk: not lost


def test_a_stop_is_not_held_up_by_listers_that_read_nothing(tree: Path, index: Index) -> None:
    """A walk that has filled a lister's request pipe waits for room; once stopping, it gives
    the lister up instead (SIGSTOPped here: as one deep in a long request, it reads nothing)."""
    stop = threading.Event()
    listers = Listers(2, setup_of(index, tree), stop.is_set)
    try:
        for lister in listers.listers:
            assert lister.process is not None
            os.kill(lister.process.pid, signal.SIGSTOP)
        st = fs.lstat(os.fsencode(tree / "top0"))
        setter = threading.Timer(0.5, stop.set)
        setter.start()
        deadline = time.monotonic() + 60
        submitted = 0
        while any(lister.alive for lister in listers.listers):  # far more than two pipes hold
            assert time.monotonic() < deadline, "the listers were never given up"
            listers.submit(b"top0", st)
            submitted += 1
        setter.join()
        assert stop.is_set() and submitted > 1000
    finally:
        listers.close()
    for lister in listers.listers:
        assert lister.process is not None and lister.process.returncode == -signal.SIGKILL
    assert listers.lost == []  # given up by the walk: not lost


def list_one(index: Index, tree: Path, rel: str, setup: Setup | None = None, stat_of: Path | None = None) -> Answer:
    setup = setup or setup_of(index, tree)
    st = fs.lstat(os.fsencode(stat_of or tree / rel))
    with sqlite3.connect(sqlite_uri(index.path, "mode=ro"), uri=True) as db:
        return list_below(db, setup, Excluder(setup.excludes), [(rel.encode(), stat_fields(st))])


def test_a_shallow_unchanged_folder_hands_its_subfolders_out(tree: Path, index: Index) -> None:
    answer = list_one(index, tree, "top0")
    assert (answer.unchanged, answer.back) == (1, [])
    assert sorted(rel for rel, _ in answer.more) == [b"top0/y0", b"top0/y1"]
    assert answer.seen == 2  # its two children; what is below them is theirs to count


def test_a_deep_unchanged_folder_is_gone_below_by_its_lister(tree: Path, index: Index) -> None:
    answer = list_one(index, tree, "top0/y1/m0")
    assert answer.more == [] and answer.back == []
    assert answer.unchanged == 3  # m0, e0, e1
    assert answer.seen == 2 + 2 * 3


def test_a_folder_swapped_after_its_parent_was_listed_is_handed_back(tree: Path, index: Index) -> None:
    old = tree / "top1/y0/m0"
    before = tree / "before"
    shutil.copytree(old, before)  # another inode, the same names and sizes
    answer = list_one(index, tree, "top1/y0/m0", stat_of=before)
    assert [rel for rel, _ in answer.back] == [b"top1/y0/m0"]
    assert answer.seen == 0


def test_a_folder_without_a_digest_or_a_row_is_handed_back(tree: Path, index: Index) -> None:
    (tree / "top2/brand-new").mkdir()
    assert [rel for rel, _ in list_one(index, tree, "top2/brand-new").back] == [b"top2/brand-new"]
    index.db.execute("UPDATE entries SET children_digest = NULL WHERE path = ?", (b"top2/y0",))
    assert [rel for rel, _ in list_one(index, tree, "top2/y0").back] == [b"top2/y0"]


def test_a_folder_holding_a_mount_point_is_handed_back_for_the_walk_to_check(tree: Path, index: Index) -> None:
    setup = setup_of(index, tree, points=frozenset({b"top0/y1/m1"}))
    answer = list_one(index, tree, "top0/y1", setup)
    assert ([rel for rel, _ in answer.back], answer.seen, answer.unchanged) == ([b"top0/y1"], 0, 0)


def test_an_excluded_subfolder_is_not_gone_below(library: Path, index: Index) -> None:
    for folder in ("a/keep/x", "a/skipdir/x"):
        (library / folder).mkdir(parents=True)
        (library / folder / "f").write_bytes(b"1")
    settle(library)
    sync(index, library, exclude=("skipdir",))
    sync(index, library, exclude=("skipdir",))
    answer = list_one(index, library, "a", setup_of(index, library, excludes=("skipdir",)))
    assert answer.back == []
    assert [rel for rel, _ in answer.more] == [b"a/keep"]


def test_a_database_whose_path_means_something_in_a_uri_is_read_by_the_listers(library: Path, tmp_path: Path) -> None:
    """The listers open the database by URI on their own: below a folder named like Synology's
    #recycle it is still the index (a cut name would hand every folder back, only slower)."""
    home = tmp_path / os.fsdecode(b"#recycle 50%25 caf\xe9?")
    home.mkdir()
    index = Index(home / "index.db")
    try:
        for folder in FOLDERS[:4]:
            (library / folder).mkdir(parents=True)
            (library / folder / "f.jpg").write_bytes(folder.encode())
        settle(library)
        sync(index, library)
        sync(index, library)
        listers = Listers(2, setup_of(index, library))
        walk_with(index, library, listers)
        assert listers.unchanged == folders_on_disk(library)
        assert listers.handed_back == 0
    finally:
        index.close()
