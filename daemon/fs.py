"""Every filesystem access of the scanner: safe opens, directory listings, xattrs, mounts.

Nothing here follows a symlink below a root, and nothing opens a FIFO, socket or device:
an ``open()`` on a FIFO blocks until a writer appears, so files are opened with
``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` before a byte is read.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import stat as stat_mod
import sys
from dataclasses import dataclass
from pathlib import Path

import xattr

from daemon.model import Mount, Stat

_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()
OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Moved(Exception):
    """The entry at a path is no longer the one the walk saw (swapped, replaced, changed)."""


def lstat(path: bytes) -> Stat:
    return Stat.of(os.lstat(path))


@dataclass(frozen=True, slots=True)
class Listing:
    """A folder's children as (name, lstat) pairs, read through a verified descriptor."""

    # Raw lstat results: a sync of an unchanged folder only digests them (walk.listing_digest),
    # and building a Stat for each would be a third of that folder's cost.
    children: list[tuple[bytes, os.stat_result]]
    vanished: list[bytes]  # listed, then gone before their lstat


def list_dir(path: bytes, expected: Stat | None) -> Listing:
    """List a folder by a descriptor opened without following symlinks.

    When ``expected`` is given, the folder must still be the inode the parent's listing
    showed: a folder swapped for a symlink (or another folder) between the two steps is
    not read, so nothing outside the root is ever listed.
    """
    fd = os.open(path, OPEN_DIR)
    try:
        if expected is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (expected.dev, expected.inode):
                raise Moved(path)
        children: list[tuple[bytes, os.stat_result]] = []
        vanished: list[bytes] = []
        with os.scandir(fd) as it:
            for entry in it:
                name = entry.name.encode(_FS_ENCODING, _FS_ERRORS)  # os.fsencode, minus its checks
                try:
                    children.append((name, entry.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    vanished.append(name)
        return Listing(children, vanished)
    finally:
        os.close(fd)


def is_empty_dir(path: bytes) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def read_xattrs(target: bytes | int) -> str | None:
    """Extended attributes of a path (not followed) or an open descriptor, as JSON text.

    {name: value}, both os.fsdecode'd (surrogateescape), so any byte string round-trips
    through JSON; None when there are none or the filesystem has no xattrs.
    """
    try:
        items = xattr.get_all(target, nofollow=True) if isinstance(target, bytes) else xattr.get_all(target)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.ENOENT, errno.EACCES, errno.EPERM):
            return None
        raise
    if not items:
        return None
    return json.dumps({os.fsdecode(k): os.fsdecode(v) for k, v in sorted(items)}, sort_keys=True)


def check_same(path: bytes, expected: Stat) -> None:
    """Raise unless ``path`` still holds the entry the walk saw (same device, inode and kind):
    FileNotFoundError or NotADirectoryError when nothing is there, Moved when another is."""
    st = os.lstat(path)
    if (st.st_dev, st.st_ino, stat_mod.S_IFMT(st.st_mode)) != (
        expected.dev,
        expected.inode,
        stat_mod.S_IFMT(expected.mode),
    ):
        raise Moved(path)


def read_link(path: bytes) -> bytes:
    return os.readlink(path)


def open_verified(path: bytes, expected: Stat) -> int:
    """Open a regular file the walk saw, refusing anything that is not that same file."""
    fd = os.open(path, OPEN_FILE)
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (expected.dev, expected.inode):
        os.close(fd)
        raise Moved(path)
    return fd


def _unescape(field: bytes) -> bytes:
    # mountinfo escapes space, tab, newline and backslash as three octal digits (proc(5)).
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


MOUNTINFO = Path("/proc/self/mountinfo")


def mounts(mountinfo: Path = MOUNTINFO) -> list[Mount]:
    """The mount table of this process's mount namespace, in the kernel's order."""
    return list(_parsed(mountinfo.read_bytes()))


@functools.lru_cache(maxsize=2)
def _parsed(text: bytes) -> tuple[Mount, ...]:
    # Every scan reads the table (daemon/volumes.py) and it rarely changes; parsing is most of
    # the cost (0.14 of 0.23 ms for 20 mounts), so an unchanged text is not parsed again.
    return tuple(parse_mountinfo(text))


def parse_mountinfo(text: bytes) -> list[Mount]:
    result = []
    for line in text.splitlines():
        fields = line.split()
        # Optional fields (from the 7th on) end with "-"; an earlier field may be a "-" itself.
        if b"-" not in fields[6:]:
            continue
        sep = fields.index(b"-", 6)
        result.append(
            Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                devno=fields[2].decode(),
                fs_root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                fs_type=fields[sep + 1].decode("utf-8", "replace"),
                source=os.fsdecode(_unescape(fields[sep + 2])) if len(fields) > sep + 2 else "",
            )
        )
    return result


def mount_of(path: bytes, table: list[Mount] | None = None) -> Mount | None:
    """The mount holding ``path``: the longest mount point that is a prefix of it (the last one wins)."""
    best: Mount | None = None
    for m in table if table is not None else mounts():
        mp = m.mount_point.rstrip(b"/") or b"/"
        if (path == mp or path.startswith(mp.rstrip(b"/") + b"/")) and (
            best is None or len(mp) >= len(best.mount_point.rstrip(b"/") or b"/")
        ):
            best = m
    return best


def fs_id(path: bytes) -> str:
    """statvfs's f_fsid in hex, "" when the filesystem gives none (0) or cannot be asked.

    Made from the filesystem's UUID by ext4, xfs and btrfs (and per subvolume by btrfs), random
    per mount for tmpfs, the server's id for NFS: unlike st_dev, it does not change when a disk
    comes back on another loop or block device, and is not handed to the next filesystem as
    anonymous device numbers are. (vfat makes it from the block device's number: no better.)
    """
    try:
        fsid = os.statvfs(path).f_fsid
    except OSError:
        return ""
    return f"{fsid:016x}" if fsid else ""


def fs_type(path: bytes) -> str:
    m = mount_of(os.path.realpath(path))
    return m.fs_type if m else "unknown"


class DaemonLock:
    """One daemon per database: an flock on a file beside it, released when the process dies.

    It is also how `status` knows a daemon runs, with no heartbeat written to the disk: an
    idle daemon writes nothing, so the NAS's disks may spin down.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self.fd = -1

    def acquire(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            return False
        return True

    @staticmethod
    def held(database: Path) -> bool:
        """True while a daemon holds the lock of ``database``."""
        try:
            fd = os.open(database.with_name(database.name + ".lock"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def identity(path: bytes | Path) -> tuple[int, int] | None:
    """(st_dev, st_ino) of what is at ``path`` now, None when nothing is: to notice a file or
    folder replaced under an open handle or a watch (a deleted database, an unmounted root)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
