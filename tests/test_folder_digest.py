"""A folder whose listing matches the digest stored with it is not compared child by child.

The digest is an optimisation that must never hide a change: each test stores digests with
two syncs of a settled tree, checks that they were stored (so the fast path really runs), then
changes the disk or the index and asserts the next sync against the oracle.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xattr

from daemon.config import RootConfig, SyncConfig
from daemon.index import Index
from daemon.journal import ScanJournal
from daemon.model import ScanScope
from daemon.scan import scan
from daemon.schema import MIGRATIONS, SCHEMA_VERSION, statements
from daemon.toolstore import ToolStore
from daemon.walk import listing_digest
from tests.engine import run_scan, settle
from tests.test_scan_cases import _BetweenSteps, sync


@pytest.fixture
def index(db: Path) -> Iterator[Index]:
    idx = Index(db)
    yield idx
    idx.close()


def make_tree(library: Path) -> None:
    for folder in ("photos/2001", "photos/2002", "docs"):
        (library / folder).mkdir(parents=True)
        for i in range(5):
            (library / folder / f"f{i}.jpg").write_bytes(bytes([i]) * (100 + i))
    (library / "docs" / "skip.tmp").write_bytes(b"excluded")
    settle(library)


def digest_of(index: Index, rel: str) -> bytes | None:
    state = walk_view(index).folder_state(rel.encode())
    assert state is not None, rel
    return state.digest


def walk_view(index: Index) -> ScanJournal:
    """What a walk of the root sees and stores through: a scan's journal."""
    return ScanJournal.begin(index, 1, "full", "[]")


def stored(index: Index, library: Path) -> None:
    """Two syncs: the first after an index finds every folder equal and stores its digest."""
    sync(index, library, exclude=("*.tmp",))
    sync(index, library, exclude=("*.tmp",))
    for rel in ("photos", "photos/2001", "photos/2002", "docs"):
        assert digest_of(index, rel) is not None, rel


FOLDERS = ("photos", "photos/2001", "photos/2002", "docs")


@pytest.fixture(params=["by the first index", "by a later sync"])
def digested(request: pytest.FixtureRequest, library: Path, index: Index) -> Path:
    make_tree(library)
    sync(index, library, exclude=("*.tmp",))
    if request.param == "by a later sync":
        stored(index, library)
    for rel in FOLDERS:
        assert digest_of(index, rel) is not None, rel
    return library


def test_a_first_index_stores_the_digest_of_every_folder_it_adds(library: Path, index: Index) -> None:
    make_tree(library)
    (library / "photos" / "empty").mkdir()
    settle(library)
    sync(index, library, exclude=("*.tmp",))
    first = {rel: digest_of(index, rel) for rel in (*FOLDERS, "photos/empty")}
    assert None not in first.values(), first
    assert int.from_bytes((first["docs"] or b"")[16:], "little") == 5, "skip.tmp is excluded, not counted"
    # The very digests a sync stores when it finds each folder equal: the next sync matches
    # them (and so keeps them) instead of comparing every row, as the syncs after it do.
    sync(index, library, exclude=("*.tmp",))
    assert {rel: digest_of(index, rel) for rel in first} == first


@pytest.fixture(params=["by a first index", "copied into an indexed root"])
def new_tree(request: pytest.FixtureRequest, library: Path, index: Index) -> Path:
    """The tree of make_tree, about to be scanned as new: by a first index (steps 1 and 2 side
    by side, walk.StreamedWalk) or with a root already indexed (the queued path). The tree is
    smaller than PROCESS_MIN_FILES: a first index reads all of its walk before step 2 begins,
    so a change at the "hashing" phase comes between the walk and the writes in both."""
    if request.param == "copied into an indexed root":
        (library / "indexed.txt").write_bytes(b"already there")
        settle(library)
        sync(index, library, exclude=("*.tmp",))
    make_tree(library)
    return library


def test_a_new_folder_whose_child_changed_before_its_row_was_written_gets_no_digest(
    new_tree: Path, index: Index
) -> None:
    library = new_tree
    changed = library / "photos" / "2001" / "f3.jpg"
    grows = _BetweenSteps(lambda: changed.write_bytes(b"grown after the walk listed it"))
    report = scan(index, RootConfig(path=library, exclude=("*.tmp",)), [ScanScope(os.fsencode(library), b"")],
                  SyncConfig(hash_workers=1), progress=grows)  # fmt: skip
    assert report.clean
    row = index.entry(1, b"photos/2001/f3.jpg")
    assert row is not None and row.stat.size == len(b"grown after the walk listed it")
    # The walk's digest of photos/2001 lists f3 as it was listed; its row holds what was hashed
    # later. A digest must describe the rows as they are, so the folder is left without one.
    assert digest_of(index, "photos/2001") is None
    assert digest_of(index, "photos/2002") is not None and digest_of(index, "photos") is not None
    sync(index, library, exclude=("*.tmp",))  # asserts index == disk


def test_a_new_folder_whose_child_vanished_before_its_row_was_written_gets_no_digest(
    new_tree: Path, index: Index
) -> None:
    library = new_tree
    gone = library / "photos" / "2002" / "f4.jpg"
    vanishes = _BetweenSteps(gone.unlink)
    report = scan(index, RootConfig(path=library, exclude=("*.tmp",)), [ScanScope(os.fsencode(library), b"")],
                  SyncConfig(hash_workers=1), progress=vanishes)  # fmt: skip
    assert report.unstable == [b"photos/2002/f4.jpg"]
    assert digest_of(index, "photos/2002") is None, "4 of its 5 children were written"
    assert digest_of(index, "photos/2001") is not None
    sync(index, library, exclude=("*.tmp",))


def test_a_new_folder_with_a_racy_child_gets_no_digest(library: Path, index: Index) -> None:
    make_tree(library)
    racy = library / "docs" / "f1.jpg"
    future = time.time_ns() + 3600 * 1_000_000_000  # always "in the same tick as the scan"
    os.utime(racy, ns=(future, future))
    sync(index, library, exclude=("*.tmp",))
    row = index.entry(1, b"docs/f1.jpg")
    assert row is not None and row.racy
    assert digest_of(index, "docs") is None
    assert digest_of(index, "photos/2001") is not None


def test_a_skipped_folder_still_counts_its_children(digested: Path, index: Index) -> None:
    report = sync(index, digested, exclude=("*.tmp",))
    # 4 folders, 15 files (skip.tmp is excluded, so not walked)
    assert report.walked == 19
    assert report.files_hashed == 0


@pytest.mark.parametrize(
    "field", ["st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size", "st_mtime_ns", "st_ctime_ns"]
)
def test_the_listing_digest_covers_every_lstat_field_the_index_compares(library: Path, field: str) -> None:
    """Most changes move ctime too, so the sync tests would not see a field left out of the
    digest: each field alone must change it, and the access time (read by every backup) not."""
    (library / "a.jpg").write_bytes(b"a")
    st = os.lstat(library / "a.jpg")
    reduced = st.__reduce__()
    assert isinstance(reduced, tuple)
    visible, extra = reduced[1]  # the stat tuple's ten items, then the named-only fields
    fields = dict(zip(("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size"), visible[:7])) | extra

    def digest(**changed: int) -> bytes:
        values = fields | changed
        same = os.stat_result((*(values[name] for name in list(fields)[:7]), *visible[7:]), values)
        return listing_digest(b"seed", [(b"a.jpg", same)])

    assert digest() == listing_digest(b"seed", [(b"a.jpg", st)])
    assert digest(**{field: fields[field] + 1}) != digest()
    assert digest(st_atime_ns=fields["st_atime_ns"] + 10**9) == digest()


@pytest.mark.parametrize(
    "change",
    [
        "rewrite same size",
        "append",
        "chmod",
        "xattr",
        "hard link",
        "new file",
        "delete",
        "rename",
        "new subfolder",
        "replace with folder",
    ],
)
def test_every_change_in_a_digested_folder_is_seen(digested: Path, index: Index, change: str) -> None:
    folder = digested / "photos" / "2001"
    f0 = folder / "f0.jpg"
    before = index.entry(1, b"photos/2001/f0.jpg")
    assert before is not None
    if change == "rewrite same size":
        f0.write_bytes(b"\xff" * f0.stat().st_size)
    elif change == "append":
        with f0.open("ab") as f:
            f.write(b"more")
    elif change == "chmod":
        f0.chmod(0o600)
    elif change == "xattr":
        xattr.set(str(f0), "user.tag", b"x")
    elif change == "hard link":
        os.link(f0, digested / "docs" / "link.jpg")  # f0's nlink and ctime move
    elif change == "new file":
        (folder / "new.jpg").write_bytes(b"new")
    elif change == "delete":
        f0.unlink()
    elif change == "rename":
        f0.rename(folder / "renamed.jpg")
    elif change == "new subfolder":
        (folder / "sub").mkdir()
        (folder / "sub" / "deep.jpg").write_bytes(b"deep")
    elif change == "replace with folder":
        f0.unlink()
        f0.mkdir()
    sync(index, digested, exclude=("*.tmp",))  # asserts index == disk
    # Every one of these changes wrote a row below photos/2001, which clears its digest.
    assert digest_of(index, "photos/2001") is None
    after = index.entry(1, b"photos/2001/f0.jpg")
    if change == "rewrite same size":
        assert after is not None and after.blake3 != before.blake3
    if change == "xattr":
        assert after is not None and after.xattrs is not None and "user.tag" in after.xattrs


def test_a_change_deep_below_only_reopens_its_own_folder(digested: Path, index: Index) -> None:
    (digested / "photos" / "2002" / "f1.jpg").write_bytes(b"changed")
    sync(index, digested, exclude=("*.tmp",))
    # The changed folder's digest was cleared by the write to its child; its siblings kept theirs.
    assert digest_of(index, "photos/2002") is None
    assert digest_of(index, "photos/2001") is not None
    assert digest_of(index, "docs") is not None


def test_changed_excludes_are_applied_in_digested_folders(digested: Path, index: Index) -> None:
    report = run_scan(index, digested, exclude=())  # the folder's listing is unchanged on disk
    assert report.clean
    assert index.entry(1, b"docs/skip.tmp") is not None
    report = run_scan(index, digested, exclude=("*.tmp",))
    assert report.clean
    assert index.entry(1, b"docs/skip.tmp") is None


def test_a_racy_child_keeps_its_folder_without_a_digest(digested: Path, index: Index) -> None:
    racy = digested / "photos" / "2001" / "f2.jpg"
    future = time.time_ns() + 3600 * 1_000_000_000  # always "in the same tick as the scan"
    racy.write_bytes(b"written in the tick")
    os.utime(racy, ns=(future, future))
    sync(index, digested, exclude=("*.tmp",))
    sync(index, digested, exclude=("*.tmp",))
    row = index.entry(1, b"photos/2001/f2.jpg")
    assert row is not None and row.racy
    # A same-tick rewrite would leave size, mtime and ctime as they are: only the racy rule
    # catches it, so this folder must be compared child by child on every sync.
    assert digest_of(index, "photos/2001") is None


def test_a_digest_is_not_stored_over_a_child_written_since_it_was_read(digested: Path, index: Index) -> None:
    journal = walk_view(index)
    folder = journal.folder_state(b"photos/2001")
    assert folder is not None and folder.digest is not None
    child = index.entry(1, b"photos/2001/f3.jpg")
    assert child is not None
    # Another writer (here `verify` accepting a new hash) changes a child after the walk read
    # the folder's state and before it stores the digest it computed. The corruption mark
    # alone is no column the walk compares, so it leaves the digest in place.
    tools = ToolStore(index)
    assert tools.set_corrupt(child, b"\x01" * 32)
    assert digest_of(index, "photos/2001") is not None
    assert tools.accept_content(child, b"\x01" * 32, racy=False) is not None
    assert digest_of(index, "photos/2001") is None
    journal.store_digests([(b"\x02" * 20, folder.id, folder.generation)])
    assert digest_of(index, "photos/2001") is None
    fresh = journal.folder_state(b"photos/2001")
    assert fresh is not None and fresh.generation > folder.generation
    journal.store_digests([(b"\x02" * 20, fresh.id, fresh.generation)])
    assert digest_of(index, "photos/2001") == b"\x02" * 20


def test_an_index_of_schema_3_is_migrated_and_its_folders_digested(library: Path, db: Path) -> None:
    make_tree(library)
    old = sqlite3.connect(db, isolation_level=None)
    for version in (1, 2, 3):
        script = MIGRATIONS[version]
        for statement in statements(script):
            old.execute(statement)
        old.execute(f"PRAGMA user_version = {version}")
    old.close()
    index = Index(db)
    try:
        assert index.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        triggers = {r[0] for r in index.db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert triggers == {"entries_child_removed", "entries_child_changed"}
        sync(index, library, exclude=("*.tmp",))
        stored(index, library)
    finally:
        index.close()


def test_a_new_folder_walked_by_two_scopes_of_one_scan_gets_no_digest(library: Path, index: Index) -> None:
    """Two scopes below a folder the index does not know both walk it whole (from the highest
    unknown ancestor), and what the first listing queued stays queued beside the second's: the
    rows written below it are then not one listing's, and a digest of either could skip a row
    that is not on disk for good (torture seed 20261202)."""
    (library / "indexed.txt").write_bytes(b"already there")
    settle(library)
    sync(index, library)
    folder = library / "new"
    folder.mkdir()
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        (folder / name).write_bytes(name.encode() * 100)
    settle(library)
    root = os.fsencode(library)
    scopes = [ScanScope(root, b"new/x.jpg", False), ScanScope(root, b"new/y.jpg", False)]
    report = scan(index, RootConfig(path=library), scopes, SyncConfig(hash_workers=1))
    assert report.clean
    assert index.entry(1, b"new/z.jpg") is not None, "the folder was walked whole"
    assert digest_of(index, "new") is None
    sync(index, library)
    sync(index, library)
    assert digest_of(index, "new") is not None, "digested the usual way once found equal"
