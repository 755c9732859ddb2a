"""Step 2 of a scan: BLAKE3 of a file, read through a verified descriptor, stat before and after.

Files are read with ``readinto`` into a reused buffer rather than mmap'd: a file truncated
while mapped raises SIGBUS, which kills the whole daemon, and truncation mid-hash is an
ordinary event on a live NAS. blake3 releases the GIL for each large ``update``, so the
worker threads hash in parallel.

Files of ``CHILD_HASH_BYTES`` or more are hashed by ``b3sum`` (Debian's, when installed) in a
child process reading the verified descriptor: it maps the file and hashes it on every core,
about 1.6x faster than reading it into a buffer (2 GiB: 0.4 s against 0.66 s), and a SIGBUS
from a file truncated under the mapping ends only that child. The process start (~1 ms) is
nothing against 32 MiB of hashing.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

import blake3

from daemon import fs
from daemon.model import Stat
from daemon.rules import stable_while_hashed

READ_CHUNK = 4 * 1024 * 1024
CHILD_HASH_BYTES = 32 * 1024 * 1024
SMALL_FILE = 256 * 1024

_buffers = threading.local()


class Unstable(Exception):
    """The file changed while it was read; it is not stored as hashed."""


@dataclass(frozen=True, slots=True)
class Hashed:
    digest: bytes
    stat: Stat  # the stat the digest belongs to (unchanged from before the read to after it)
    read_started_ns: int
    xattrs: str | None


def _buffer() -> memoryview:
    buf: memoryview | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = memoryview(bytearray(READ_CHUNK))
        _buffers.buf = buf
    return buf


def hash_file(path: bytes, seen: Stat) -> Hashed:
    """Hash the regular file the walk saw at ``path``.

    Raises fs.Moved when the path now holds another file (or a symlink, FIFO, folder),
    Unstable when it changed while being read, OSError for what the disk refuses.
    """
    fd = fs.open_verified(path, seen)
    try:
        started = time.time_ns()
        before = Stat.of(os.fstat(fd))
        digest = _hash_in_child(fd, path) if before.size >= CHILD_HASH_BYTES and _b3sum() else None
        if digest is not None:
            total = before.size  # b3sum mapped the size fstat gave it; a change shows in `after`
        elif before.size <= SMALL_FILE:
            data = os.read(fd, before.size + 1)
            digest = blake3.blake3(data).digest()
            total = len(data)
        else:
            hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if before.size >= CHILD_HASH_BYTES else 1)
            buf = _buffer()
            total = 0
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                hasher.update(buf[:n])
                total += n
            digest = hasher.digest()
        after = Stat.of(os.fstat(fd))
        if total != after.size or not stable_while_hashed(before, after):
            raise Unstable(path)
        return Hashed(digest, after, started, fs.read_xattrs(fd))
    finally:
        os.close(fd)


@functools.cache
def _b3sum() -> str | None:
    return shutil.which("b3sum")


def _hash_in_child(fd: int, path: bytes) -> bytes | None:
    """BLAKE3 of the open file by b3sum, or None when b3sum failed for a reason of its own.

    /dev/stdin reopens the descriptor's own file through /proc (a rename or a swapped path
    cannot redirect it), and b3sum maps what it opens by name, never its standard input.
    A child killed by SIGBUS read a file truncated under it: `Unstable`, as for any file that
    changed while it was read.
    """
    b3sum = _b3sum()
    assert b3sum is not None
    os.lseek(fd, 0, os.SEEK_SET)
    child = subprocess.run(
        [b3sum, "--raw", "/dev/stdin"], stdin=fd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False
    )
    if child.returncode == -signal.SIGBUS:
        raise Unstable(path)
    if child.returncode != 0 or len(child.stdout) != blake3.blake3.digest_size:
        return None  # e.g. no memory to map it: the in-process read hashes it instead
    return child.stdout
