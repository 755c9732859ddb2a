"""Step 2 of a scan's hashing: BLAKE3 of a file, read through a verified descriptor with a stat
before and after, and the dispatch of many files to threads or worker processes, in order.

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
import functools
import os
import pickle
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import blake3

from daemon import fs
from daemon.model import Kind, Stat, stat_fields, stat_of_fields
from daemon.rules import stable_while_hashed
from daemon.workers import WorkerProcess, worker_pipes

if TYPE_CHECKING:  # `status` reaches this module through rebuild.py: no thread pool at import
    from concurrent.futures import ThreadPoolExecutor

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


def hash_if_unchanged(path: bytes, indexed: Stat) -> Hashed | None:
    """The hash of the file at ``path`` if it is still the file the index describes (a regular
    file with the same size, mtime and inode before and after the read); None when it is not,
    or is changing: that is the scanner's to look at. `verify` and `rebuild` re-derive only
    what the index already holds. OSError for a file the disk refuses to read."""
    try:
        now = fs.lstat(path)
        if not _same_content(indexed, now):
            return None
        hashed = hash_file(path, now)
    except (fs.Moved, Unstable, FileNotFoundError, NotADirectoryError):
        return None
    return hashed if _same_content(indexed, hashed.stat) else None


def _same_content(indexed: Stat, now: Stat) -> bool:
    return (now.kind, now.size, now.mtime_ns, now.inode) == (Kind.FILE, indexed.size, indexed.mtime_ns, indexed.inode)


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
# A group crosses the pipe as plain tuples (model.stat_fields), which pickle in C, not as Stat
# dataclasses and Kind enums, which pickle through their classes' Python methods.


def serve(request_fd: int, result_fd: int) -> None:
    """A worker process: hash each group it is sent, until the scan closes its end of the pipe."""
    requests, results = worker_pipes(request_fd, result_fd)
    while True:
        try:
            group = pickle.loads(requests.recv_bytes())  # noqa: S301 (from the scan that started this process)
        except (EOFError, OSError):  # closed, or cut mid-message by a scan killed while sending
            return
        items = [(path, stat_of_fields(fields)) for path, fields in group]
        # The stat after hashing is nearly always the one the walk saw: None says so, and
        # spares the scan building a Stat per file again.
        outcomes = [
            o
            if isinstance(o, Exception)
            else (o.digest, None if o.stat == seen else stat_fields(o.stat), o.read_started_ns, o.xattrs)
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


class _Worker(WorkerProcess):
    def __init__(self) -> None:
        super().__init__("daemon.hasher")
        self.waiting: deque[_Answer] = deque()

    def submit(self, group: list[tuple[bytes, Stat]]) -> _Answer:
        answer = _Answer(self, group)
        self.waiting.append(answer)
        if not self.alive:
            self._hash_here()
            return answer
        self.send(pickle.dumps([(path, stat_fields(st)) for path, st in group], pickle.HIGHEST_PROTOCOL))
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
            o if isinstance(o, Exception) else Hashed(o[0], seen if o[1] is None else stat_of_fields(o[1]), o[2], o[3])
            for o, (_, seen) in zip(outcomes, answer.group, strict=True)
        ]

    def _hash_here(self) -> None:
        self.alive = False
        while self.waiting:
            answer = self.waiting.popleft()
            answer.outcomes = hash_group(answer.group)

    def died(self) -> None:
        self._hash_here()


# --- dispatch: which worker hashes what, and in what order the results come back ----------------

# How many entries may be in flight (hashing, or waiting for the caller to write them) at once.
# Enough for the workers to go on through a commit (~15 ms for 1000 rows) instead of waiting
# for it: a first index of 100k small files took 4.95 s with 256, 3.9 s with 2048.
HASH_WINDOW = 2048
# Small files are hashed in groups, one worker task per group: a task per file costs more
# in thread hand-offs than hashing the file (100k files of 4-64 KiB: 8.1 s one task each,
# against 1.9 s for b3sum). Large files keep a task each, so two of them hash in parallel.
GROUP_FILES = 64
GROUP_BYTES = 8 * 1024 * 1024
GROUP_FILE_MAX = 1024 * 1024  # files larger than this get a task of their own
# From this many small files queued, their groups go to worker processes (HashProcesses).
# A worker takes ~45 ms to start; first index of N files of 4-64 KiB, threads vs processes:
# 1,000: 0.07 vs 0.12 s; 2,000: 0.16 vs 0.15 s; 5,000: 0.43 vs 0.28 s.
PROCESS_MIN_FILES = 3000


class Pending(Protocol):
    """A hash on its way: a Future of one file, or one file's slot in a group's Future."""

    def done(self) -> bool: ...
    def cancel(self) -> bool: ...
    def result(self) -> Hashed: ...


class _Slot:
    """One file's share of a group hashed by a single worker task."""

    __slots__ = ("future", "i")

    def __init__(self, i: int) -> None:
        self.future: Group | None = None  # set when the group is submitted
        self.i = i

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def cancel(self) -> bool:
        return self.future is not None and self.future.cancel()

    def result(self) -> Hashed:
        assert self.future is not None, "a group is submitted before any of its slots is awaited"
        outcome = self.future.result()[self.i]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def open_processes(hash_workers: int, small_files: int) -> HashProcesses | None:
    """Worker processes for a scan that will hash ``small_files`` small files, or None (threads).

    One core stays with the scan's own process: it walks and commits (a second worker process on
    two cores made the first index of 100k small files slower, 4.2 s against 3.8 s). Out of
    descriptors or processes, the threads hash them.
    """
    count = min(hash_workers, len(os.sched_getaffinity(0)) - 1)
    if small_files < PROCESS_MIN_FILES or count <= 0:
        return None
    with contextlib.suppress(OSError):
        return HashProcesses(count)
    return None


T = TypeVar("T")


def hash_in_order(
    items: Iterable[T],
    to_hash: Callable[[T], tuple[bytes, Stat] | None],
    pool: ThreadPoolExecutor,
    procs: HashProcesses | None,
    stopping: Callable[[], bool],
) -> Iterator[tuple[T, Pending | None]]:
    """Every item with its hash on its way (None for an item ``to_hash`` says needs none), in the
    items' order, each as soon as its own hash is done. Up to HASH_WINDOW items are in flight, so
    the workers go on hashing while the caller writes. Once ``stopping()``, no new item is taken,
    and items still waiting for a hash are dropped (their hashes cancelled)."""
    window: deque[tuple[T, Pending | None]] = deque()
    group: list[tuple[bytes, Stat]] = []
    slots: list[_Slot] = []
    group_bytes = 0

    def submit_group() -> None:
        nonlocal group, slots, group_bytes
        if group:
            future = procs.submit(group) if procs is not None else pool.submit(hash_group, group)
            for slot in slots:
                slot.future = future
        group, slots, group_bytes = [], [], 0

    for item in items:
        if stopping():
            break
        pending: Pending | None = None
        wanted = to_hash(item)
        if wanted is not None:
            path, stat = wanted
            if stat.size > GROUP_FILE_MAX:
                pending = pool.submit(hash_file, path, stat)
            else:
                slot = _Slot(len(group))
                group.append(wanted)
                slots.append(slot)
                group_bytes += stat.size
                pending = slot
                if len(group) >= GROUP_FILES or group_bytes >= GROUP_BYTES:
                    submit_group()
        window.append((item, pending))
        if len(window) > HASH_WINDOW:
            submit_group()  # the head may be waited on now: its group must be on its way
        while window and (len(window) > HASH_WINDOW or window[0][1] is None or window[0][1].done()):
            yield window.popleft()
    submit_group()
    while window:
        item, pending = window.popleft()
        if stopping() and pending is not None:
            pending.cancel()
            continue
        yield item, pending
