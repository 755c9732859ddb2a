"""Table tests for the pure rules of daemon/rules.py: each case is named for what it proves."""

from __future__ import annotations

import dataclasses
import stat as stat_mod

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.fs import parse_mountinfo
from daemon.model import Entry, Kind, Mount, Stat, entry_of
from daemon.rules import (
    HASH_SCHEME,
    LOCAL_GRANULARITY_NS,
    Candidate,
    Change,
    RootProbe,
    VolumeGate,
    VolumeProbe,
    VolumeRecord,
    classify,
    granularity_ns,
    is_racily_clean,
    mounts_below,
    offline_reason,
    polled_volumes,
    row_unchanged,
    same_inode,
    sample_matches,
    stable_while_hashed,
    volume_offline_reason,
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


# --- volumes: filesystems mounted below a root --------------------------------------------------


def mnt(mid: int, parent: int, point: bytes, fs_type: str = "ext4", fs_root: bytes = b"/") -> Mount:
    return Mount(mid, parent, "7:0", fs_root, point, fs_type, f"/dev/m{mid}")


# The namespace's root (its parent is outside the table), a root's filesystem, volumes below it.
TABLE = [mnt(1, 0, b"/"), mnt(2, 1, b"/srv"), mnt(3, 2, b"/srv/lib/usb"), mnt(4, 3, b"/srv/lib/usb/inner")]
MOUNTS_BELOW = [
    ("a mount below the root -> a volume", TABLE[:3], {b"usb"}),
    ("a mount below a volume -> a volume too", TABLE, {b"usb", b"usb/inner"}),
    ("the root's own mount and those above it -> not volumes", [*TABLE[:2], mnt(5, 2, b"/srv/lib")], set()),
    ("a sibling sharing the root's name as a prefix -> not below it", [*TABLE[:2], mnt(5, 2, b"/srv/library")], set()),
    ("two stacked on one point -> one volume, the top one", [*TABLE[:3], mnt(6, 3, b"/srv/lib/usb", "tmpfs")],
     {b"usb"}),
    ("a mount under a covered mount -> hidden, not a volume", [*TABLE, mnt(7, 3, b"/srv/lib/usb")], {b"usb"}),
    ("an escaped name -> its bytes", [*TABLE[:2], mnt(8, 2, b"/srv/lib/my disk")], {b"my disk"}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "table", "want"), MOUNTS_BELOW, ids=[c[0] for c in MOUNTS_BELOW])
def test_mounts_below(name: str, table: list[Mount], want: set[bytes]) -> None:
    assert set(mounts_below(b"/srv/lib", table)) == want


def test_mounts_below_keeps_the_top_of_a_stack() -> None:
    stacked = [*TABLE[:3], mnt(6, 3, b"/srv/lib/usb", "tmpfs")]
    assert mounts_below(b"/srv/lib/", stacked)[b"usb"].fs_type == "tmpfs"


def test_mountinfo_lines_are_parsed_with_their_escapes() -> None:
    text = (
        b"29 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        b"66 29 7:0 / /srv/lib/my\\040disk rw,relatime - ext4 /dev/loop0 rw\n"
        b"68 29 254:0 /data/a /srv/lib/- rw shared:5 master:1 - ext4 /dev/vda rw\n"
    )
    table = parse_mountinfo(text)
    assert [(m.mount_id, m.parent_id, m.mount_point, m.fs_root) for m in table] == [
        (29, 1, b"/", b"/"),
        (66, 29, b"/srv/lib/my disk", b"/"),
        (68, 29, b"/srv/lib/-", b"/data/a"),
    ]
    assert (table[1].devno, table[1].fs_type, table[1].source) == ("7:0", "ext4", "/dev/loop0")


USB = mnt(3, 2, b"/srv/lib/usb")
REC = VolumeRecord("ext4", b"/", "aa", 1792)


def probe(mount: Mount | None = USB, *, exists: bool = True, fsid: str = "aa", empty: bool = False,
          sampled: int = 4, matching: int = 0) -> VolumeProbe:  # fmt: skip
    return VolumeProbe(mount, exists, fsid, empty, sampled, matching)


VOLUME_OFFLINE = [
    ("unmounted: the mount point is a plain folder -> offline", REC, probe(None), "not mounted"),
    ("unmounted and its folder removed (udisks) -> offline", REC, probe(None, exists=False), "missing"),
    ("the same filesystem id and folder -> online", REC, probe(), None),
    ("back on another device, same filesystem id -> online", REC, probe(), None),
    ("another filesystem (tmpfs reusing the device number) -> offline", REC, probe(fsid="bb"), "another filesystem"),
    ("another filesystem with the same top-level entries (a copy, vfat renumbered) -> online", REC,
     probe(fsid="bb", matching=3), None),
    ("half of the entries alike is not most -> offline", REC, probe(fsid="bb", matching=2), "another filesystem"),
    ("no filesystem id, most inodes the same -> online", VolumeRecord("nfs4", b"/", "", 40), probe(fsid="",
     matching=4), None),
    ("no filesystem id on either side, entries differ -> offline", VolumeRecord("9p", b"/", "", 40),
     probe(fsid=""), "another filesystem"),
    ("another folder of the same filesystem bind-mounted -> offline", REC,
     probe(mnt(3, 2, b"/srv/lib/usb", fs_root=b"/other")), "another folder"),
    ("mounted but empty while indexed -> offline", REC, probe(empty=True), "empty"),
    ("nothing indexed below it: anything mounted -> online", REC, probe(fsid="bb", sampled=0), None),
    ("a volume never recorded -> online", None, probe(fsid="bb"), None),
    ("never recorded and not mounted -> offline", None, probe(None), "not mounted"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "rec", "probe", "want"), VOLUME_OFFLINE, ids=[c[0] for c in VOLUME_OFFLINE])
def test_volume_offline_reason(name: str, rec: VolumeRecord | None, probe: VolumeProbe, want: str | None) -> None:
    reason = volume_offline_reason(rec, probe)
    if want is None:
        assert reason is None
    else:
        assert reason is not None and want in reason, reason


SAMPLE = [
    ("same inode -> same entry", FILE, r(FILE, size=5, mtime_ns=1), True),
    ("new inode, same size and mtime (vfat renumbers) -> same entry", FILE, r(FILE, inode=99), True),
    ("new inode, another size -> not", FILE, r(FILE, inode=99, size=5), False),
    ("new inode, another mtime -> not", FILE, r(FILE, inode=99, mtime_ns=1), False),
    ("a folder: new inode, same mtime, any size -> same entry", DIR, r(DIR, inode=99, size=1), True),
    ("another kind -> not", FILE, r(DIR, inode=42), False),
    ("nothing there -> not", FILE, None, False),
]


@pytest.mark.parametrize(("name", "indexed", "now", "want"), SAMPLE, ids=[c[0] for c in SAMPLE])
def test_sample_matches(name: str, indexed: Stat, now: Stat | None, want: bool) -> None:
    assert sample_matches(indexed, now) is want


GATE = VolumeGate(
    online={b"usb": (1792, 2), b"usb/inner": (1793, 2)},
    offline=frozenset({b"old"}),
    left_out=frozenset({b"net"}),
    fs_types={b"usb": "vfat", b"usb/inner": "ext4"},
)


def test_polled_volumes() -> None:
    fs_types = {b"usb": "ext4", b"nas": "nfs4", b"phone": "fuse.sshfs", b"share": "cifs"}
    assert polled_volumes("auto", fs_types) == [b"nas", b"phone", b"share"]
    assert polled_volumes("inotify", fs_types) == [], "the admin chose inotify for the whole root"


def test_volume_gate() -> None:
    assert GATE.points == {b"usb", b"usb/inner", b"old", b"net"}
    assert GATE.frozen(b"old") and GATE.frozen(b"old/a/b") and not GATE.frozen(b"older") and not GATE.frozen(b"usb")
    assert GATE.outside(b"net/x") and not GATE.outside(b"network")
    assert GATE.enters(b"usb", 1792, 2) and GATE.enters(b"plain", 5, 5)
    assert not GATE.enters(b"usb", 2049, 2), "unmounted since the scan began: its folder is another"
    assert not GATE.enters(b"old", 1, 1) and not GATE.enters(b"net", 1, 1)
    assert GATE.volume_of(b"usb/inner/x") == b"usb/inner" and GATE.volume_of(b"usb/a") == b"usb"
    assert GATE.volume_of(b"usbx") is None
    assert GATE.fs_type_of(b"usb/a.jpg", "ext4") == "vfat" and GATE.fs_type_of(b"a.jpg", "btrfs") == "btrfs"
