"""Pure decisions of the scan: has it changed, is it racily clean, is a root or a volume offline, is it a rename.

No I/O here: every function takes values, so each rule has a table test naming its cases.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from daemon.model import Entry, EntryRow, Kind, Mount, Stat, is_within

# Filesystem timestamp granularity by type, for the racy-clean rule. FAT keeps mtime in
# 2 s steps; network filesystems round to whole seconds on some servers; local Linux
# filesystems stamp from the kernel's coarse clock (one tick, at most 10 ms at HZ=100),
# so 100 ms is a safe margin there.
GRANULARITY_NS: dict[str, int] = {"vfat": 2_000_000_000, "msdos": 2_000_000_000, "exfat": 2_000_000_000}
NETWORK_GRANULARITY_NS = 1_000_000_000
LOCAL_GRANULARITY_NS = 100_000_000
# Filesystems whose content other machines change: inotify does not see another client's
# writes, and servers round times to whole seconds. FUSE mounts (`fuse`, `fuse.*`: sshfs appears
# as fuse.sshfs) are treated the same: most do not report changes below them to inotify.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "afs", "lustre", "gpfs", "sshfs"})


def is_network_fs(fs_type: str) -> bool:
    """``fs_type`` as /proc/self/mountinfo names it."""
    return fs_type in NETWORK_FS or fs_type == "fuse" or fs_type.startswith("fuse.")


def uses_polling(observer: str, fs_type: str) -> bool:
    """Whether a root is polled: ``observer`` from its config, ``fs_type`` from mountinfo."""
    if observer == "auto":
        return is_network_fs(fs_type)
    return observer == "polling"


def polled_volumes(observer: str, fs_types: Mapping[bytes, str]) -> list[bytes]:
    """The volumes (mount point -> filesystem type) of a root watched by inotify that are polled
    anyway: on a network or FUSE filesystem inotify does not see other clients' changes, so with
    ``observer = "auto"`` each such volume is synced every poll_interval_s, as a root on one is."""
    return sorted(rel for rel, fs_type in fs_types.items() if observer == "auto" and is_network_fs(fs_type))


# Bumped when what the index derives from a file's content changes (see PhotoStructure's
# sync vs rebuild). Entries with a lower scheme are `rebuild`'s work, not the scan's: the
# scan follows the filesystem, and re-deriving unchanged content must not touch the feed.
HASH_SCHEME = 1


def granularity_ns(fs_type: str) -> int:
    if fs_type in GRANULARITY_NS:
        return GRANULARITY_NS[fs_type]
    if is_network_fs(fs_type) or fs_type == "fuseblk":
        return NETWORK_GRANULARITY_NS
    return LOCAL_GRANULARITY_NS


class Change(enum.Enum):
    NONE = "none"  # index matches the disk
    METADATA = "metadata"  # refresh the row, keep the hash
    CONTENT = "content"  # re-hash (files) or re-read (symlink target)
    REPLACED = "replaced"  # another kind of entry now has the name: delete + add


def classify(indexed: Entry, now: Stat) -> Change:
    """Compare an index row with a fresh lstat.

    The content rule follows git and Syncthing: size, mtime_ns or inode differing means
    the content may differ. ctime alone moves on chmod, chown, xattr edits and hard links,
    none of which touch content, so it only refreshes metadata (borg's files cache makes
    the same split). A racily clean row was hashed in the same timestamp tick as its last
    write, so a matching stat proves nothing and the content is checked again.
    """
    old = indexed.stat
    if old.kind != now.kind:
        return Change.REPLACED
    if now.kind is Kind.FILE:
        if old.size != now.size or old.mtime_ns != now.mtime_ns or old.inode != now.inode:
            return Change.CONTENT
        if indexed.racy or indexed.blake3 is None:
            return Change.CONTENT
    elif now.kind is Kind.SYMLINK and (old.inode != now.inode or old.mtime_ns != now.mtime_ns):
        return Change.CONTENT  # a symlink cannot be rewritten in place: a new one has a new target
    if old != now:
        return Change.METADATA
    return Change.NONE


def row_unchanged(row: EntryRow, st: Stat) -> bool:
    """``classify(entry_of(row), st) is Change.NONE``, without building the Entry and its Stat.

    A no-change sync asks this of every entry; building the two frozen dataclasses per row
    was a third of its time. It must equal `classify`: tests/test_rules.py checks that it
    does, for any row and stat.
    """
    if (row[4], row[5], row[6], row[7], row[8], row[9], row[10], row[11], row[12]) != (
        st.size, st.mtime_ns, st.ctime_ns, st.inode, st.dev, st.mode, st.uid, st.gid, st.nlink
    ) or row[3] != st.kind.value:  # fmt: skip
        return False
    # A file is trusted only when hashed and not racily clean. An older hash scheme does not
    # make it changed: re-deriving is `rebuild`'s work (see HASH_SCHEME), as in classify.
    return st.kind is not Kind.FILE or (not row[14] and row[13] is not None)


def is_racily_clean(mtime_ns: int, scan_started_ns: int, fs_granularity_ns: int) -> bool:
    """True when a file written in the same tick as the scan's start could change unseen.

    git's Documentation/technical/racy-git.adoc: a file modified within the timestamp
    granularity of the moment its state was recorded can be modified again without its
    mtime moving. Such an entry is stored with ``racy`` set and re-hashed on the next pass.
    """
    return mtime_ns >= scan_started_ns - fs_granularity_ns


def stable_while_hashed(before: Stat, after: Stat) -> bool:
    """A file whose stat moved while it was read is not stored as hashed."""
    return (before.size, before.mtime_ns, before.ctime_ns, before.inode) == (
        after.size,
        after.mtime_ns,
        after.ctime_ns,
        after.inode,
    )


@dataclass(frozen=True, slots=True)
class RootProbe:
    """What the scanner saw of a root's own folder, for the offline decision."""

    exists: bool
    is_dir: bool
    dev: int | None
    empty: bool  # no entries at all (excludes ignored: an unmounted mount point has none)


def offline_reason(probe: RootProbe, recorded_dev: int | None, indexed_entries: int) -> str | None:
    """Why a root must be treated as offline (nothing deleted), or None when it is online.

    A missing, emptied or re-devised root looks exactly like a library whose every file was
    deleted; Syncthing lost users' data that way (syncthing#762, #799, #4345) before it
    required a folder marker. Deleting a whole library is never inferred from its absence.
    """
    if not probe.exists:
        return "root folder is missing"
    if not probe.is_dir:
        return "root is not a folder"
    if indexed_entries > 0 and probe.empty:
        return "root folder is empty but the index is not (unmounted?)"
    if recorded_dev is not None and probe.dev != recorded_dev:
        return f"root is on another device than recorded ({probe.dev} instead of {recorded_dev})"
    return None


# --- volumes: filesystems mounted below a root ------------------------------------------------


def mounts_below(root: bytes, table: Sequence[Mount]) -> dict[bytes, Mount]:
    """The mounts a walk of ``root`` (its real path) meets below it, by mount point relative to it.

    Of mounts stacked on one point only the top one is seen, and a mount whose parent is covered
    is not seen at all (mounting over /srv/lib/a hides /srv/lib/a/b). A btrfs subvolume has an
    st_dev of its own but is no mount unless mounted: it is not listed here (os.path.ismount,
    which compares st_dev with the parent's, calls it one).
    """
    by_id = {m.mount_id: m for m in table}
    covered = {
        m.parent_id
        for m in table
        if m.parent_id != m.mount_id and (p := by_id.get(m.parent_id)) is not None and p.mount_point == m.mount_point
    }

    def seen(m: Mount) -> bool:
        if m.mount_id in covered:
            return False
        visited = {m.mount_id}
        current = m
        while (parent := by_id.get(current.parent_id)) is not None and parent.mount_id not in visited:
            # A mount stacked on its parent hides it; one below another point needs that one seen.
            if parent.mount_point != current.mount_point and parent.mount_id in covered:
                return False
            visited.add(parent.mount_id)
            current = parent
        return True

    prefix = root.rstrip(b"/") + b"/"
    return {m.mount_point[len(prefix) :]: m for m in table if m.mount_point.startswith(prefix) and seen(m)}


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    """What the index recorded of a volume when it was last online."""

    fs_type: str
    fs_root: bytes
    fsid: str  # statvfs f_fsid in hex; "" when the filesystem gives none
    dev: int


@dataclass(frozen=True, slots=True)
class VolumeProbe:
    """What is at a volume's mount point now."""

    mount: Mount | None  # the mount seen there (mounts_below); None: the path is no mount point
    exists: bool  # something is at the mount point's path, mounted or not
    fsid: str
    empty: bool  # the mounted folder has no entries at all
    sampled: int  # top-level entries of the volume read from the index (0: nothing indexed below it)
    matching: int  # of those, how many are still there as indexed (sample_matches)


def sample_matches(indexed: Stat, now: Stat | None) -> bool:
    """Whether a volume's top-level entry as indexed is still what has its name.

    The same inode is, as the root's check relies on (a filesystem keeps its inode numbers across
    mounts). So are, for one that does not (vfat and exfat number inodes anew at every mount),
    the same kind with the same mtime and, for what is not a folder, the same size.
    """
    if now is None or now.kind is not indexed.kind:
        return False
    if now.inode == indexed.inode:
        return True
    return now.mtime_ns == indexed.mtime_ns and (now.kind is Kind.DIR or now.size == indexed.size)


def volume_offline_reason(recorded: VolumeRecord | None, probe: VolumeProbe) -> str | None:
    """Why a volume below a root must be left as indexed (offline), or None when it is online.

    An unmounted disk leaves its mount point an empty folder of the filesystem around it, and a
    walk would find every entry of the disk gone (syncthing#762, #799, #4345 at the root level;
    PhotoStructure treats every mounted volume as a unit of its own). So a volume is online only
    when a mount is there and it is the filesystem recorded: the same filesystem id and folder
    of it (a bind mount mounts a folder), or else most of its top-level entries still there
    as indexed. A volume with nothing indexed below it has nothing to lose.
    """
    if probe.mount is None:
        if not probe.exists:
            return "the mount point is missing"
        return "not mounted: the mount point is a folder of the filesystem around it"
    if recorded is None or probe.sampled == 0:
        return None
    m = probe.mount
    if probe.empty:
        return f"{m.source} ({m.fs_type}) is mounted there but empty while the index is not"
    if probe.fsid and probe.fsid == recorded.fsid and m.fs_root == recorded.fs_root:
        return None
    if probe.matching * 2 > probe.sampled:
        return None  # the same entries: the same filesystem, back on another device
    if m.fs_root != recorded.fs_root and probe.fsid == recorded.fsid:
        what = f"another folder of the filesystem ({os.fsdecode(m.fs_root)}, not {os.fsdecode(recorded.fs_root)})"
    else:
        what = f"another filesystem ({m.source}, {m.fs_type}, id {probe.fsid or 'none'}, not {recorded.fsid or 'none'})"
    return f"{what} is mounted there, without the entries indexed below it"


@dataclass(frozen=True, slots=True)
class VolumeGate:
    """The volumes below a root as one scan sees them: where its walk goes, and where it does not.

    ``online``: mount points the walk enters, with the (st_dev, st_ino) their top folder had when
    the scan began; a folder at that path that is no longer it (unmounted meanwhile) is not
    entered. ``offline``: mount points whose subtree stays as indexed, not walked, nothing below it
    deleted. ``left_out``: mount points a root with ``one_filesystem`` does not index, as if
    excluded. ``fs_types``: the filesystem of each online volume (the racy rule's granularity).
    """

    online: Mapping[bytes, tuple[int, int]] = field(default_factory=dict)
    offline: frozenset[bytes] = frozenset()
    left_out: frozenset[bytes] = frozenset()
    fs_types: Mapping[bytes, str] = field(default_factory=dict)
    points: frozenset[bytes] = field(init=False)  # every mount point above: one lookup per entry

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", frozenset(self.online) | self.offline | self.left_out)

    def frozen(self, rel: bytes) -> bool:
        """``rel`` is an offline volume's mount point or lies below one."""
        return any(is_within(rel, mp) for mp in self.offline)

    def outside(self, rel: bytes) -> bool:
        """``rel`` is a left-out mount point or lies below one."""
        return any(is_within(rel, mp) for mp in self.left_out)

    def enters(self, rel: bytes, dev: int, inode: int) -> bool:
        """Whether the walk may list the folder at ``rel`` that has this st_dev and st_ino."""
        if rel not in self.points:
            return True
        return self.online.get(rel) == (dev, inode)

    def volume_of(self, rel: bytes) -> bytes | None:
        """The mount point of the deepest online volume holding ``rel`` (itself included)."""
        best = None
        for mp in self.online:
            if is_within(rel, mp) and (best is None or len(mp) > len(best)):
                best = mp
        return best

    def fs_type_of(self, rel: bytes, root_fs_type: str) -> str:
        mp = self.volume_of(rel)
        return root_fs_type if mp is None else self.fs_types.get(mp, root_fs_type)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A gone index entry or a new disk entry, as rename matching sees it."""

    dev: int
    inode: int
    kind: Kind
    size: int
    mtime_ns: int


def same_inode(gone: Candidate, new: Candidate) -> bool:
    """The rename rule's first test: the same inode on the same device, unchanged.

    A rename keeps the inode, size and mtime of a file; for folders and symlinks the
    inode alone identifies them (a folder's size and mtime move when it gains children).
    """
    if (gone.dev, gone.inode, gone.kind) != (new.dev, new.inode, new.kind):
        return False
    return gone.kind is not Kind.FILE or (gone.size, gone.mtime_ns) == (new.size, new.mtime_ns)
