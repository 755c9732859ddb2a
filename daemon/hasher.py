"""Step 2 of a scan: BLAKE3 of a file, read through a verified descriptor, stat before and after.

Files are read with ``readinto`` into a reused buffer rather than mmap'd: a file truncated
while mapped raises SIGBUS, which kills the whole daemon, and truncation mid-hash is an
ordinary event on a live NAS. blake3 releases the GIL for each large ``update``, so the
worker threads hash in parallel, and files of ``THREADED_HASH_BYTES`` or more are also split
across cores inside blake3 itself (as ``b3sum`` does).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import blake3

from daemon import fs
from daemon.model import Stat
from daemon.rules import stable_while_hashed

READ_CHUNK = 4 * 1024 * 1024
THREADED_HASH_BYTES = 32 * 1024 * 1024
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
        if before.size <= SMALL_FILE:
            data = os.read(fd, before.size + 1)
            hasher = blake3.blake3(data)
            total = len(data)
        else:
            threads = blake3.blake3.AUTO if before.size >= THREADED_HASH_BYTES else 1
            hasher = blake3.blake3(max_threads=threads)
            buf = _buffer()
            total = 0
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                hasher.update(buf[:n])
                total += n
        after = Stat.of(os.fstat(fd))
        if total != after.size or not stable_while_hashed(before, after):
            raise Unstable(path)
        return Hashed(hasher.digest(), after, started, fs.read_xattrs(fd))
    finally:
        os.close(fd)
