"""Step 2 of a scan: BLAKE3 of a file, read through a verified descriptor, stat before and after.

Files are read with ``readinto`` into a reused buffer rather than mmap'd: a file truncated
while mapped raises SIGBUS, which kills the whole daemon, and truncation mid-hash is an
ordinary event on a live NAS. blake3 releases the GIL for each large ``update``, so the
worker threads hash in parallel.

Small files are hashed in groups. When a scan has many of them, the groups go to worker
processes (`HashProcesses`) instead of threads: per small file, the Python work around the
hash (open, fstat twice, read, flistxattr, the result) holds the GIL longer than BLAKE3 does,
so threads only contend with the scan's own thread for it.

Files of ``CHILD_HASH_BYTES`` or more are hashed by ``b3sum`` (Debian's, when installed) in a
child process reading the verified descriptor: it maps the file and hashes it on every core,
about 1.6x faster than reading it into a buffer (2 GiB: 0.4 s against 0.66 s), and a SIGBUS
from a file truncated under the mapping ends only that child. The process start (~1 ms) is
nothing against 32 MiB of hashing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import blake3

from daemon import fs
from daemon.model import Kind, Stat
from daemon.rules import stable_while_hashed

READ_CHUNK = 4 * 1024 * 1024
CHILD_HASH_BYTES = 32 * 1024 * 1024
SMALL_FILE = 256 * 1024
PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size

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


def hash_group(items: list[tuple[bytes, Stat]]) -> list[Hashed | Exception]:
    """Hash each file of a group; a file's failure is its own result, not the group's."""
    out: list[Hashed | Exception] = []
    for path, seen in items:
        try:
            out.append(hash_file(path, seen))
        except Exception as e:  # OSError, fs.Moved, Unstable: handled per file by the caller
            out.append(e)
    return out


# --- worker processes ------------------------------------------------------------------
# A group crosses the pipe as plain tuples, which pickle in C, not as Stat dataclasses and
# Kind enums, which pickle through their classes' Python methods.
_StatFields = tuple[str, int, int, int, int, int, int, int, int, int]


def _fields(st: Stat) -> _StatFields:
    return (st.kind.value, st.size, st.mtime_ns, st.ctime_ns, st.inode, st.dev, st.mode, st.uid, st.gid, st.nlink)


def _stat(fields: _StatFields) -> Stat:
    return Stat(Kind(fields[0]), *fields[1:])


def serve(request_fd: int, result_fd: int) -> None:
    """A worker process: hash each group it is sent, until the scan closes its end of the pipe."""
    # Ctrl-C in a terminal reaches the whole process group (and `systemctl kill` the whole
    # cgroup): the scan stops and closes the pipes, and this loop ends at its next read or
    # write, instead of a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from multiprocessing.connection import Connection  # 5 ms of imports: only where used

    requests = Connection(request_fd, writable=False)
    results = Connection(result_fd, readable=False)
    while True:
        try:
            group = pickle.loads(requests.recv_bytes())  # noqa: S301 (from the scan that started this process)
        except (EOFError, OSError):  # closed, or cut mid-message by a scan killed while sending
            return
        items = [(path, _stat(fields)) for path, fields in group]
        # The stat after hashing is nearly always the one the walk saw: None says so, and
        # spares the scan building a Stat per file again.
        outcomes = [
            o
            if isinstance(o, Exception)
            else (o.digest, None if o.stat == seen else _fields(o.stat), o.read_started_ns, o.xattrs)
            for o, (_, seen) in zip(hash_group(items), items, strict=True)
        ]
        try:
            results.send_bytes(pickle.dumps(outcomes, pickle.HIGHEST_PROTOCOL))
        except BrokenPipeError:
            return  # the scan stopped and no longer reads


class Group(Protocol):
    """A group's outcomes on their way: a thread pool's Future, or a worker process's answer."""

    def done(self) -> bool: ...
    def cancel(self) -> bool: ...
    def result(self) -> list[Hashed | Exception]: ...


class HashProcesses:
    """Worker processes that hash groups of small files, each with an interpreter (and GIL) of its own.

    The scan's thread talks to them directly: a reader thread per worker would be one more
    thread contending for the GIL (the first index of 100k small files took 4.7 s with one,
    3.9 s without). It never blocks sending a group while the worker blocks sending results:
    a full pipe makes it read the results waiting first. A worker that dies (killed, or its
    interpreter cannot start) costs only time: its groups are hashed in this process instead.
    """

    def __init__(self, count: int) -> None:
        self.workers: list[_Worker] = []
        self.next = 0
        try:
            for _ in range(count):
                self.workers.append(_Worker())
        except BaseException:  # out of descriptors, say: none of the started ones is left behind
            self.close()
            raise

    def submit(self, group: list[tuple[bytes, Stat]]) -> Group:
        worker = self.workers[self.next]
        self.next = (self.next + 1) % len(self.workers)
        return worker.submit(group)

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


class _Answer:
    """One group sent to a worker, until its outcomes come back."""

    __slots__ = ("group", "outcomes", "worker")

    def __init__(self, worker: _Worker, group: list[tuple[bytes, Stat]]) -> None:
        self.worker = worker
        self.group = group
        self.outcomes: list[Hashed | Exception] | None = None

    def done(self) -> bool:
        if self.outcomes is None:
            self.worker.receive_ready()
        return self.outcomes is not None

    def cancel(self) -> bool:
        return False  # sent already: the worker hashes it anyway

    def result(self) -> list[Hashed | Exception]:
        while self.outcomes is None:
            self.worker.receive()
        return self.outcomes


class _Worker:
    def __init__(self) -> None:
        child_requests, self.request_fd = os.pipe()
        try:
            result_fd, child_results = os.pipe()
        except OSError:
            os.close(child_requests)
            os.close(self.request_fd)
            raise
        try:
            # -P: not the current folder first on sys.path, where a `daemon` of another
            # checkout would give the workers other code than the scan's.
            serve_call = f"from daemon.hasher import serve; serve({child_requests}, {child_results})"
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-P", "-c", serve_call],
                pass_fds=(child_requests, child_results),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError:
            self.process = None  # its groups are hashed here, as for a worker that died
        finally:
            os.close(child_requests)
            os.close(child_results)
        from multiprocessing.connection import Connection  # 5 ms of imports: only where used

        os.set_blocking(self.request_fd, False)
        for fd in (self.request_fd, result_fd):
            # Room for dozens of groups each way (the default 64 KiB holds ~10): a full pipe
            # stalls the scan or the worker, never both (see submit). Refused beyond
            # pipe-max-size or the user's pipe quota: the default then.
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.results = Connection(result_fd, writable=False)
        self.waiting: deque[_Answer] = deque()
        self.alive = self.process is not None
        self.readable = select.poll()
        self.readable.register(result_fd, select.POLLIN)
        self.writable_or_readable = select.poll()
        self.writable_or_readable.register(result_fd, select.POLLIN)
        self.writable_or_readable.register(self.request_fd, select.POLLOUT)

    def submit(self, group: list[tuple[bytes, Stat]]) -> _Answer:
        answer = _Answer(self, group)
        self.waiting.append(answer)
        if not self.alive:
            self._hash_here()
            return answer
        payload = pickle.dumps([(path, _fields(st)) for path, st in group], pickle.HIGHEST_PROTOCOL)
        # Framed as multiprocessing's Connection.send_bytes frames it, for the worker's recv_bytes.
        frame = memoryview(struct.pack("!i", len(payload)) + payload)
        while frame and self.alive:
            try:
                frame = frame[os.write(self.request_fd, frame) :]
            except BlockingIOError:
                self.writable_or_readable.poll()
                self.receive_ready()
            except BrokenPipeError:
                self._hash_here()
        return answer

    def receive_ready(self) -> None:
        while self.waiting and self.readable.poll(0):
            self.receive()

    def receive(self) -> None:
        """Wait for the next group's outcomes (the worker answers in order)."""
        if not self.alive:
            self._hash_here()
            return
        try:
            outcomes = pickle.loads(self.results.recv_bytes())  # noqa: S301 (from the worker this process started)
        except (EOFError, OSError):
            self._hash_here()
            return
        answer = self.waiting.popleft()
        answer.outcomes = [
            o if isinstance(o, Exception) else Hashed(o[0], seen if o[1] is None else _stat(o[1]), o[2], o[3])
            for o, (_, seen) in zip(outcomes, answer.group, strict=True)
        ]

    def _hash_here(self) -> None:
        self.alive = False
        while self.waiting:
            answer = self.waiting.popleft()
            answer.outcomes = hash_group(answer.group)

    def close(self) -> None:
        os.close(self.request_fd)  # the worker ends at its next read
        self.results.close()
        if self.process is not None:
            self.process.wait()
