"""The shared vocabulary of every stage: kinds, feed operations, scopes, stats."""

from __future__ import annotations

import dataclasses
import enum
import os
import stat as stat_mod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Kind(enum.StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"  # FIFO, socket, device node: recorded, never opened

    @classmethod
    def of_mode(cls, mode: int) -> Kind:
        if stat_mod.S_ISREG(mode):
            return cls.FILE
        if stat_mod.S_ISDIR(mode):
            return cls.DIR
        if stat_mod.S_ISLNK(mode):
            return cls.SYMLINK
        return cls.OTHER


class ExitCode(enum.IntEnum):
    """The process's exit status, for every command and the daemon (DESIGN.md, "Interfaces")."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    RESET = 3  # a feed cursor that means nothing here any more: take a snapshot (docs/feed.md)
    CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus=78 does not restart a bad config


class Op(enum.StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"
    RENAMED = "renamed"
    METADATA = "metadata"


class RootState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    SCANNING = "scanning"


class VolumeState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    # Found by the upgrade to schema 7 in an index made before volumes were known: a folder on
    # another device than its parent. The next scan tells a mount point from a btrfs subvolume.
    UNCONFIRMED = "unconfirmed"


class ScanKind(enum.StrEnum):
    FULL = "full"
    SUBTREE = "subtree"
    FOLDER = "folder"
    FILE = "file"


@dataclass(frozen=True, slots=True, order=True)
class ScanScope:
    """What one scan looks at: ``subtree`` is relative to ``root`` (b"" is the root itself).

    A recursive scope covers the subtree and everything below it. A non-recursive scope
    covers the path itself and, when it is a folder, its direct children (a child folder
    that the index does not know yet is walked whole, since no event was seen for what
    was created in it before its watch existed).
    """

    root: bytes
    subtree: bytes = b""
    recursive: bool = True

    @property
    def absolute(self) -> bytes:
        return join(self.root, self.subtree)

    def covers(self, other: ScanScope) -> bool:
        """True when scanning ``self`` also scans everything ``other`` would."""
        if self.root != other.root:
            return False
        if self.subtree == other.subtree:
            return self.recursive or not other.recursive
        if not self.recursive:
            # A folder scope covers its direct children, not deeper paths.
            return parent_of(other.subtree) == self.subtree and not other.recursive
        return is_within(other.subtree, self.subtree)


def join(base: bytes, rel: bytes) -> bytes:
    if not rel:
        return base
    return base.rstrip(b"/") + b"/" + rel if base != b"/" else b"/" + rel


def parent_of(rel: bytes) -> bytes:
    """The parent of a root-relative path; the root's own children have parent b""."""
    slash = rel.rfind(b"/")
    return rel[:slash] if slash >= 0 else b""


def name_of(rel: bytes) -> bytes:
    return rel[rel.rfind(b"/") + 1 :]


def is_within(rel: bytes, ancestor: bytes) -> bool:
    """True when ``rel`` is ``ancestor`` or lies below it (both root-relative)."""
    if not ancestor:
        return True
    return rel == ancestor or rel.startswith(ancestor + b"/")


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of an lstat that the index keeps."""

    kind: Kind
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    dev: int
    mode: int
    uid: int
    gid: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        # The same object `cls(...)` makes, built by setting the slots directly: a frozen
        # dataclass's __init__ goes through object.__setattr__ for each field, and a walk makes
        # one Stat per entry (this halves the cost, about 0.7 us of 1.3 per entry).
        new = object.__new__(cls)
        _SET_STAT[0](new, _KIND_OF_FORMAT.get(stat_mod.S_IFMT(st.st_mode), Kind.OTHER))
        _SET_STAT[1](new, st.st_size)
        _SET_STAT[2](new, st.st_mtime_ns)
        _SET_STAT[3](new, st.st_ctime_ns)
        _SET_STAT[4](new, st.st_ino)
        _SET_STAT[5](new, st.st_dev)
        _SET_STAT[6](new, st.st_mode)
        _SET_STAT[7](new, st.st_uid)
        _SET_STAT[8](new, st.st_gid)
        _SET_STAT[9](new, st.st_nlink)
        return new


# A Stat as plain values, for a pipe to a worker process (hasher, listers).
StatFields = tuple[str, int, int, int, int, int, int, int, int, int]


def stat_fields(st: Stat) -> StatFields:
    return (st.kind.value, st.size, st.mtime_ns, st.ctime_ns, st.inode, st.dev, st.mode, st.uid, st.gid, st.nlink)


def stat_of_fields(fields: StatFields) -> Stat:
    return Stat(Kind(fields[0]), *fields[1:])


_KIND_OF_FORMAT = {stat_mod.S_IFREG: Kind.FILE, stat_mod.S_IFDIR: Kind.DIR, stat_mod.S_IFLNK: Kind.SYMLINK}
# The slots' own setters, in field order (what Stat.of assigns, by position).
_SET_STAT: tuple[Callable[[Stat, object], None], ...] = tuple(
    getattr(Stat, f.name).__set__ for f in dataclasses.fields(Stat)
)


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/self/mountinfo (proc(5)): a filesystem mounted somewhere."""

    mount_id: int
    parent_id: int  # the mount it sits on (itself, or one outside the table, for the namespace's root)
    devno: str  # "major:minor" as the kernel names the filesystem (not always a file's st_dev: btrfs)
    fs_root: bytes  # the folder of the filesystem mounted here: b"/" unless a bind mount of a folder
    mount_point: bytes
    fs_type: str
    source: str  # /dev/sdb1, server:/export, tmpfs


@dataclass(frozen=True, slots=True)
class Entry:
    """One indexed entry, as the index holds it."""

    id: int
    root_id: int
    path: bytes  # relative to the root
    stat: Stat
    blake3: bytes | None
    racy: bool
    scheme: int
    seq: int
    target: bytes | None = None  # a symlink's target
    xattrs: str | None = None  # JSON object, names and values os.fsdecode'd


# An entry as the index hands it out, positionally: these columns in this order. The walk
# compares most rows without building an Entry from them (rules.row_unchanged).
ENTRY_COLUMNS = (
    "id, root_id, path, kind, size, mtime_ns, ctime_ns, inode, dev, mode, uid, gid, nlink,"
    " blake3, racy, scheme, seq, target, xattrs"
)
EntryRow = tuple[Any, ...]


def entry_of(row: EntryRow) -> Entry:
    """The Entry of a row of ENTRY_COLUMNS."""
    stat = Stat(Kind(row[3]), *row[4:13])
    return Entry(row[0], row[1], row[2], stat, row[13], bool(row[14]), row[15], row[16], row[17], row[18])


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One entry the walk found different from the index: what step 2 turns into a row."""

    path: bytes
    reason: str  # new | content | metadata | replaced
    entry_id: int | None  # the row now at this path, if any
    parent_id: int | None  # None when the parent is new too
    stat: Stat
    renamed_from: int | None  # a gone entry matched by inode
    # A new folder's listing digest and child count (walk.listing_digest), set once the walk
    # has listed it: step 2 stores it when every child is written as walked.
    listing: bytes | None = None


# A folder's children_digest: this many bytes of BLAKE3 over its listing (walk.listing_digest),
# then its child count, little-endian.
LISTING_DIGEST_BYTES = 16


@dataclass(frozen=True, slots=True)
class FolderState:
    """A folder's row as the walk needs it to skip an unchanged listing (walk.listing_digest)."""

    id: int
    digest: bytes | None  # of the listing last found equal to the index; None once a child changed
    generation: int  # children_gen: moves with every write to a child row


@dataclass(slots=True)
class ScanReport:
    """What one scan did, for its caller: the CLI's summary, the daemon's log and next rounds."""

    root: bytes
    kind: ScanKind
    offline: str | None = None
    came_online: bool = False
    device_moved: bool = False
    busy_pid: int | None = None  # another live process is scanning this root
    ops: dict[Op, int] = field(default_factory=lambda: dict.fromkeys(Op, 0))
    files_hashed: int = 0
    bytes_hashed: int = 0
    walked: int = 0
    errors: dict[bytes, str] = field(default_factory=dict)  # errors not seen by the previous scan
    error_count: int = 0
    unstable: list[bytes] = field(default_factory=list)  # changed while hashed: scan again later
    linked: list[bytes] = field(default_factory=list)  # other names of a changed hard-linked file
    interrupted: bool = False
    seconds: float = 0.0
    # Volumes below the root (daemon/volumes.py), by mount point relative to the root.
    volumes_offline: dict[bytes, str] = field(default_factory=dict)  # every offline one, and why
    volumes_online: list[bytes] = field(default_factory=list)
    volumes_back: list[bytes] = field(default_factory=list)  # offline before this scan, online now
    volumes_missed: list[bytes] = field(default_factory=list)  # offline ones the scopes cover: left as indexed
    # Lister processes (daemon/listers.py) that ended before the walk did, and why: the walk
    # listed their folders itself, so nothing was missed; the sync was only slower.
    listers_lost: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """The index now matches the disk for the scanned scopes."""
        return not (
            self.offline or self.busy_pid or self.error_count or self.unstable or self.interrupted
            or self.volumes_missed
        )  # fmt: skip
