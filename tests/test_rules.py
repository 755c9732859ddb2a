"""Table tests for the pure rules of daemon/rules.py: each case is named for what it proves."""

from __future__ import annotations

import dataclasses
import stat as stat_mod

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.model import Entry, Kind, Stat, entry_of
from daemon.rules import (
    HASH_SCHEME,
    LOCAL_GRANULARITY_NS,
    Candidate,
    Change,
    RootProbe,
    classify,
    granularity_ns,
    is_racily_clean,
    offline_reason,
    row_unchanged,
    same_inode,
    stable_while_hashed,
)

S = 1_000_000_000
FILE = Stat(Kind.FILE, 100, 10 * S, 10 * S, 42, 7, stat_mod.S_IFREG | 0o644, 1000, 1000, 1)
DIR = Stat(Kind.DIR, 4096, 10 * S, 10 * S, 43, 7, stat_mod.S_IFDIR | 0o755, 1000, 1000, 2)
LINK = Stat(Kind.SYMLINK, 5, 10 * S, 10 * S, 44, 7, stat_mod.S_IFLNK | 0o777, 1000, 1000, 1)
FIFO = Stat(Kind.OTHER, 0, 10 * S, 10 * S, 45, 7, stat_mod.S_IFIFO | 0o644, 1000, 1000, 1)


def entry(st: Stat, *, racy: bool = False, blake3: bytes | None = b"h" * 32, scheme: int = HASH_SCHEME) -> Entry:
    digest = blake3 if st.kind is Kind.FILE else None
    return Entry(1, 1, b"x", st, digest, racy, scheme, 1)


def r(st: Stat, **changes: object) -> Stat:
    return dataclasses.replace(st, **changes)  # type: ignore[arg-type]


CLASSIFY = [
    ("unchanged file -> none", entry(FILE), FILE, Change.NONE),
    ("ctime only -> metadata", entry(FILE), r(FILE, ctime_ns=11 * S), Change.METADATA),
    ("chmod -> metadata", entry(FILE), r(FILE, mode=stat_mod.S_IFREG | 0o600, ctime_ns=11 * S), Change.METADATA),
    ("chown -> metadata", entry(FILE), r(FILE, uid=0, gid=0), Change.METADATA),
    ("hard link added -> metadata", entry(FILE), r(FILE, nlink=2, ctime_ns=11 * S), Change.METADATA),
    ("size differs -> content", entry(FILE), r(FILE, size=101), Change.CONTENT),
    ("size same, mtime later -> content", entry(FILE), r(FILE, mtime_ns=11 * S), Change.CONTENT),
    ("size same, mtime earlier -> content", entry(FILE), r(FILE, mtime_ns=9 * S), Change.CONTENT),
    ("inode differs -> content", entry(FILE), r(FILE, inode=99), Change.CONTENT),
    ("racy row -> content", entry(FILE, racy=True), FILE, Change.CONTENT),
    ("never hashed (unreadable before) -> content", entry(FILE, blake3=None), FILE, Change.CONTENT),
    ("older hash scheme -> none (rebuild's job)", entry(FILE, scheme=HASH_SCHEME - 1), FILE, Change.NONE),
    ("kind changed file -> dir: replaced", entry(FILE), DIR, Change.REPLACED),
    ("kind changed dir -> file: replaced", entry(DIR), FILE, Change.REPLACED),
    ("kind changed file -> symlink: replaced", entry(FILE), LINK, Change.REPLACED),
    ("kind changed file -> fifo: replaced", entry(FILE), FIFO, Change.REPLACED),
    ("symlink retarget (new inode) -> content", entry(LINK), r(LINK, inode=98, mtime_ns=11 * S), Change.CONTENT),
    (
        "symlink retarget, same length, same inode reused -> content",
        entry(LINK),
        r(LINK, mtime_ns=11 * S),
        Change.CONTENT,
    ),
    ("symlink chown -> metadata", entry(LINK), r(LINK, uid=0, ctime_ns=11 * S), Change.METADATA),
    ("unchanged symlink -> none", entry(LINK), LINK, Change.NONE),
    (
        "folder gained a child (mtime, size) -> metadata",
        entry(DIR),
        r(DIR, mtime_ns=11 * S, nlink=3),
        Change.METADATA,
    ),
    ("racy flag is ignored for folders -> none", entry(DIR, racy=True), DIR, Change.NONE),
    ("fifo unchanged -> none", entry(FIFO), FIFO, Change.NONE),
    ("fifo chmod -> metadata", entry(FIFO), r(FIFO, mode=stat_mod.S_IFIFO | 0o600), Change.METADATA),
]


@pytest.mark.parametrize(("name", "indexed", "now", "want"), CLASSIFY, ids=[c[0] for c in CLASSIFY])
def test_classify(name: str, indexed: Entry, now: Stat, want: Change) -> None:
    assert classify(indexed, now) is want


RACY = [
    ("written long before the scan -> clean", 5 * S, 10 * S, LOCAL_GRANULARITY_NS, False),
    ("written exactly one tick before -> racy", 10 * S - LOCAL_GRANULARITY_NS, 10 * S, LOCAL_GRANULARITY_NS, True),
    (
        "written just over one tick before -> clean",
        10 * S - LOCAL_GRANULARITY_NS - 1,
        10 * S,
        LOCAL_GRANULARITY_NS,
        False,
    ),
    ("written in the same tick -> racy", 10 * S - 1, 10 * S, LOCAL_GRANULARITY_NS, True),
    ("written after the read started -> racy", 11 * S, 10 * S, LOCAL_GRANULARITY_NS, True),
    ("FAT 2 s granularity, 1.5 s before -> racy", 10 * S - 1_500_000_000, 10 * S, 2 * S, True),
    ("FAT 2 s granularity, 3 s before -> clean", 7 * S, 10 * S, 2 * S, False),
]


@pytest.mark.parametrize(("name", "mtime", "started", "gran", "want"), RACY, ids=[c[0] for c in RACY])
def test_is_racily_clean(name: str, mtime: int, started: int, gran: int, want: bool) -> None:
    assert is_racily_clean(mtime, started, gran) is want


@pytest.mark.parametrize(
    ("fs", "want"),
    [("ext4", LOCAL_GRANULARITY_NS), ("vfat", 2 * S), ("exfat", 2 * S), ("nfs4", S), ("fuse.sshfs", S), ("cifs", S)],
)
def test_granularity_by_filesystem(fs: str, want: int) -> None:
    assert granularity_ns(fs) == want


ONLINE = RootProbe(exists=True, is_dir=True, dev=7, empty=False)
OFFLINE = [
    ("missing -> offline", RootProbe(False, False, None, True), 7, 10, "missing"),
    ("not a dir -> offline", RootProbe(True, False, 7, True), 7, 10, "not a folder"),
    ("emptied while the index is not -> offline", RootProbe(True, True, 7, True), 7, 10, "empty"),
    ("other device -> offline", RootProbe(True, True, 8, False), 7, 10, "another device"),
    (
        "unmounted: empty mount point on the parent's device -> offline",
        RootProbe(True, True, 8, True),
        7,
        10,
        "empty",
    ),
    ("fine -> online", ONLINE, 7, 10, None),
    (
        "empty and never indexed (first scan of an empty folder) -> online",
        RootProbe(True, True, 7, True),
        None,
        0,
        None,
    ),
    ("empty, index empty too -> online", RootProbe(True, True, 7, True), 7, 0, None),
    ("no recorded device yet -> online", RootProbe(True, True, 9, False), None, 10, None),
    ("missing even when never indexed -> offline", RootProbe(False, False, None, True), None, 0, "missing"),
]


@pytest.mark.parametrize(("name", "probe", "dev", "count", "want"), OFFLINE, ids=[c[0] for c in OFFLINE])
def test_offline_reason(name: str, probe: RootProbe, dev: int | None, count: int, want: str | None) -> None:
    reason = offline_reason(probe, dev, count)
    if want is None:
        assert reason is None
    else:
        assert reason is not None and want in reason


def cand(kind: Kind = Kind.FILE, dev: int = 7, inode: int = 42, size: int = 100, mtime: int = 10 * S) -> Candidate:
    return Candidate(dev, inode, kind, size, mtime)


SAME_INODE = [
    ("same file renamed -> match", cand(), cand(), True),
    ("inode reused by another file (size differs) -> no match", cand(), cand(size=5), False),
    ("inode reused by another file (mtime differs) -> no match", cand(), cand(mtime=11 * S), False),
    ("same inode number on another device -> no match", cand(), cand(dev=8), False),
    ("different inode -> no match", cand(), cand(inode=43), False),
    ("kind differs -> no match", cand(), cand(kind=Kind.DIR), False),
    ("folder moved and gained children -> match", cand(Kind.DIR), cand(Kind.DIR, size=8192, mtime=11 * S), True),
    ("symlink moved (mtime kept) -> match", cand(Kind.SYMLINK), cand(Kind.SYMLINK, mtime=12 * S), True),
]


@pytest.mark.parametrize(("name", "gone", "new", "want"), SAME_INODE, ids=[c[0] for c in SAME_INODE])
def test_same_inode(name: str, gone: Candidate, new: Candidate, want: bool) -> None:
    assert same_inode(gone, new) is want


STABLE = [
    ("nothing moved -> stable", FILE, True),
    ("appended -> unstable", r(FILE, size=200), False),
    ("rewritten in place, same size -> unstable", r(FILE, mtime_ns=11 * S, ctime_ns=11 * S), False),
    ("mtime restored by a touch -d after writing (ctime moved) -> unstable", r(FILE, ctime_ns=11 * S), False),
    ("replaced under the name -> unstable", r(FILE, inode=99), False),
    ("nlink alone is not compared -> stable", r(FILE, nlink=2), True),
]


@pytest.mark.parametrize(("name", "after", "want"), STABLE, ids=[c[0] for c in STABLE])
def test_stable_while_hashed(name: str, after: Stat, want: bool) -> None:
    assert stable_while_hashed(FILE, after) is want


# --- row_unchanged is classify, for the walk's hot path -----------------------------------------

_small = st.integers(min_value=0, max_value=2)  # few values: equal fields come up often
_stat = st.builds(
    Stat,
    kind=st.sampled_from(list(Kind)),
    size=_small,
    mtime_ns=_small,
    ctime_ns=_small,
    inode=_small,
    dev=_small,
    mode=_small,
    uid=_small,
    gid=_small,
    nlink=_small,
)


@settings(max_examples=400)
@given(
    indexed=_stat,
    now=_stat,
    blake3=st.none() | st.just(b"h" * 32),
    racy=st.booleans(),
    scheme=st.integers(min_value=0, max_value=HASH_SCHEME + 1),
    same_but=st.sampled_from([None, *(f.name for f in dataclasses.fields(Stat))]),
)
def test_row_unchanged_agrees_with_classify(
    indexed: Stat, now: Stat, blake3: bytes | None, racy: bool, scheme: int, same_but: str | None
) -> None:
    """The walk decides most rows with row_unchanged, without building an Entry; a row it calls
    unchanged must be exactly one that classify calls unchanged (and the other way round)."""
    if same_but is not None:  # now equal to the indexed stat except (at most) one field
        now = dataclasses.replace(indexed, **{same_but: getattr(now, same_but)})
    e = Entry(9, 1, b"a/b", indexed, blake3, racy, scheme, 5, None, None)
    row = (e.id, e.root_id, e.path, indexed.kind.value, indexed.size, indexed.mtime_ns, indexed.ctime_ns,
           indexed.inode, indexed.dev, indexed.mode, indexed.uid, indexed.gid, indexed.nlink, blake3, int(racy),
           scheme, e.seq, None, None)  # fmt: skip
    assert entry_of(row) == e  # the row is what the index hands out for this entry
    assert row_unchanged(row, now) == (classify(e, now) is Change.NONE)
