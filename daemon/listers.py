"""Step 1 of a sync on more than one core: worker processes that list known folders, compare
each listing's digest with the one stored, go below the folders found unchanged, and hand
every other folder back to the walk (``walk.walk_scope``), which reads it as it always does.

A no-change sync is its listing: ``scandir``, ``lstat`` and the digest, ~2.7 µs an entry in
Python, all of it holding the GIL, so threads cannot share it and processes can. Listing and
digesting as the walk does, without the database, in one process and in two (docs/benchmarks.md,
"Where P1 can still go"): 1M entries 2.62-2.70 s against 1.38-1.41 s (`find` 2.04 s); 200k
entries cold 1.82 s against 1.06-1.13 s (`find` 1.75-1.87 s).

A lister decides only the one case that needs nothing written: a folder with a row, listed
through a descriptor that is still the inode its parent's listing showed, nothing vanished
between the listing and the lstat, the digest equal to the stored one, and no child on
another filesystem the walk must check (``VolumeGate.points``). Anything else, an error
included, goes back to the walk, which lists it again and records what it finds; so a lister
that fails or dies costs only time. Each lister reads the stored digests through its own
read-only connection: in WAL mode a reader never blocks the scan's writes, and the walk never
changes the digest of a folder it has handed to a lister.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import signal
import sqlite3
import stat as stat_mod
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from daemon import fs
from daemon.filters import Excluder
from daemon.index import sqlite_uri
from daemon.model import LISTING_DIGEST_BYTES, Stat, StatFields, join, stat_fields, stat_of_fields
from daemon.walk import listing_digest
from daemon.workers import WorkerProcess, never_stopping, worker_pipes

# Folders fewer than this many components deep are not gone below by the lister that found
# them unchanged: their subfolders go back to the walk as new work, which it spreads over the
# listers, so two listers share a tree with a few large top folders. Deeper ones stay with
# their lister (no round trip per folder).
SPLIT_DEPTH = 3
WAIT_S = 0.2  # how often a walk waiting on its listers looks at its stop flag
CANNOT_READ_INDEX = 3  # a lister's exit status when its read-only connection cannot be opened

Folder = tuple[bytes, StatFields]


@dataclass(frozen=True, slots=True)
class Setup:
    """What a lister needs to decide as the walk would: sent once, before any folder."""

    db_path: str
    root_id: int
    root_path: bytes
    seed: bytes  # walk.digest_seed of the scan's excludes
    excludes: tuple[str, ...]
    points: frozenset[bytes]  # mount points below the root (VolumeGate.points)


@dataclass(slots=True)
class Answer:
    """One request's outcome: entries seen in unchanged folders, folders for the walk to read
    itself, and unchanged folders' subfolders for the walk to hand out again (SPLIT_DEPTH)."""

    seen: int
    back: list[Folder]
    more: list[Folder]
    unchanged: int = 0  # folders found as stored


class _Lister(WorkerProcess):
    """The walk's side of one lister process: requests out, answers in, in order."""

    def __init__(self, setup: bytes, stopping: Callable[[], bool]) -> None:
        super().__init__("daemon.listers")
        self.stopping = stopping
        self.outstanding: deque[list[Folder]] = deque()
        self.answered: deque[Answer] = deque()
        self.ended_early = self.process is None  # never started, or died before the walk was done
        self.send(setup)

    def submit(self, folders: list[Folder]) -> None:
        self.outstanding.append(folders)
        self.send(pickle.dumps(folders, pickle.HIGHEST_PROTOCOL))

    def receive_ready(self) -> None:
        while self.alive and self.outstanding and self.readable.poll(0):
            self.receive()

    def receive(self) -> None:
        """Read one answer (the lister answers in order); a dead lister's requests come back whole."""
        try:
            seen, back, more, unchanged = pickle.loads(self.results.recv_bytes())  # noqa: S301 (from the lister this process started)
        except (EOFError, OSError):
            self.died()
            return
        self.outstanding.popleft()
        self.answered.append(Answer(seen, back, more, unchanged))

    def died(self) -> None:
        self.alive = False
        self.ended_early = True
        while self.outstanding:
            self.answered.append(Answer(0, self.outstanding.popleft(), []))

    def why_it_ended(self) -> str:
        """Why a lister that ended early did, once it has been waited for (``close``)."""
        code = None if self.process is None else self.process.returncode
        if code is None:
            return "could not be started"
        if code == CANNOT_READ_INDEX:
            return "could not open the index read-only"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"


class Listers:
    """Lister processes of one walk (``walk.FolderListers``). ``submit`` queues a folder,
    ``answers`` waits for what came back; ``pending`` says whether any folder is still out."""

    def __init__(self, count: int, setup: Setup, stopping: Callable[[], bool] = never_stopping) -> None:
        payload = pickle.dumps(setup, pickle.HIGHEST_PROTOCOL)
        self.listers: list[_Lister] = []
        self.queued: list[Folder] = []
        self.unchanged = 0  # folders the listers found as stored
        self.handed_back = 0  # folders they handed back to the walk
        # Why each lister that ended before the walk did (known once closed): the walk read
        # their folders itself, so the sync was only slower, but a lister killed by the OOM
        # killer on every sync is worth a line in the log.
        self.lost: list[str] = []
        try:
            for _ in range(count):
                self.listers.append(_Lister(payload, stopping))
        except BaseException:  # out of descriptors, say: none of the started ones is left behind
            self.close()
            raise

    def submit(self, rel: bytes, st: Stat) -> None:
        self.queued.append((rel, stat_fields(st)))
        self.flush()  # now: the walk may be busy with a new subtree for long

    @property
    def pending(self) -> bool:
        return bool(self.queued) or any(lister.outstanding or lister.answered for lister in self.listers)

    def flush(self) -> None:
        """Send the queued folders, one request per folder to the least busy listers."""
        queued, self.queued = self.queued, []
        for folder in queued:
            live = [lister for lister in self.listers if lister.alive]
            if not live:  # every lister died: the walk reads them itself
                self.listers[0].answered.append(Answer(0, [folder], []))
                continue
            min(live, key=lambda lister: len(lister.outstanding)).submit([folder])

    def answers(self, stopping: Callable[[], bool]) -> tuple[int, list[tuple[bytes, Stat]]]:
        """(entries seen, folders for the walk to read itself) of every answer that has come,
        waiting for one if none has, until ``stopping``. Subfolders to hand out again are
        queued here and sent."""
        while True:
            self.flush()
            seen, got = 0, False
            back: list[tuple[bytes, Stat]] = []
            for lister in self.listers:
                lister.receive_ready()
                for answer in lister.answered:
                    got = True
                    seen += answer.seen
                    self.unchanged += answer.unchanged
                    self.handed_back += len(answer.back)
                    back.extend((rel, stat_of_fields(fields)) for rel, fields in answer.back)
                    self.queued.extend(answer.more)
                lister.answered.clear()
            if got or stopping():
                self.flush()
                return seen, back
            waiting = select.poll()  # not select.select: it refuses descriptors from 1024 up
            busy = [lister.result_fd for lister in self.listers if lister.alive and lister.outstanding]
            if not busy:
                return seen, back
            for fd in busy:
                waiting.register(fd, select.POLLIN)
            waiting.poll(WAIT_S * 1000)

    def close(self) -> None:
        unfinished = self.pending
        failed: BaseException | None = None
        for lister in self.listers:
            try:
                lister.close(kill=unfinished)
            except BaseException as e:  # Ctrl-C in a wait, say: the others are still closed (killed)
                failed, unfinished = failed or e, True
        self.lost = [lister.why_it_ended() for lister in self.listers if lister.ended_early]
        if failed is not None:
            raise failed


def open_listers(count: int, setup: Setup, stopping: Callable[[], bool]) -> Listers | None:
    """``count`` listers, or None when this machine has one core for the walk (no gain), or no
    process can be started (the walk lists alone)."""
    count = min(count, len(os.sched_getaffinity(0)))
    if count < 2:
        return None
    with contextlib.suppress(OSError):
        return Listers(count, setup, stopping)
    return None


# --- the lister process -------------------------------------------------------------------------


def serve(request_fd: int, result_fd: int) -> None:
    """A lister process: answer each request, until the walk closes its end of the pipe."""
    requests, results = worker_pipes(request_fd, result_fd)
    try:
        setup: Setup = pickle.loads(requests.recv_bytes())  # noqa: S301 (from the walk that started this process)
    except (EOFError, OSError):
        return
    try:
        db = sqlite3.connect(sqlite_uri(setup.db_path, "mode=ro"), uri=True, timeout=30.0)
    except sqlite3.Error:
        sys.exit(CANNOT_READ_INDEX)  # the walk takes this lister's folders back, and says why it ended
    excluded = Excluder(setup.excludes)
    while True:
        try:
            folders: list[Folder] = pickle.loads(requests.recv_bytes())  # noqa: S301
        except (EOFError, OSError):
            return
        answer = list_below(db, setup, excluded, folders)
        try:
            payload = pickle.dumps((answer.seen, answer.back, answer.more, answer.unchanged), pickle.HIGHEST_PROTOCOL)
            results.send_bytes(payload)
        except BrokenPipeError:
            return


def list_below(db: sqlite3.Connection, setup: Setup, excluded: Excluder, folders: list[Folder]) -> Answer:
    """Go below each folder while its listing is the one stored (see the module's docstring)."""
    answer = Answer(0, [], [])
    stack = [(rel, stat_of_fields(fields)) for rel, fields in folders]
    while stack:
        rel, st = stack.pop()
        try:
            unchanged = _unchanged(db, setup, excluded, rel, st)
        except Exception:  # the walk reads the folder again and reports what it finds
            unchanged = None
        if unchanged is None:
            answer.back.append((rel, stat_fields(st)))
            continue
        count, subfolders = unchanged
        answer.seen += count
        answer.unchanged += 1
        if rel.count(b"/") + 1 < SPLIT_DEPTH:
            answer.more.extend((child, stat_fields(child_st)) for child, child_st in subfolders)
        else:
            stack.extend(subfolders)
    return answer


def _unchanged(
    db: sqlite3.Connection, setup: Setup, excluded: Excluder, rel: bytes, st: Stat
) -> tuple[int, list[tuple[bytes, Stat]]] | None:
    """(entries counted, subfolders to go below) when the folder is as stored, else None."""
    row = db.execute(
        "SELECT children_digest FROM entries WHERE root_id = ? AND path = ? AND kind = 'dir'", (setup.root_id, rel)
    ).fetchone()
    stored: bytes | None = None if row is None else row[0]
    if stored is None:
        return None
    listing = fs.list_dir(join(setup.root_path, rel), st)
    if listing.vanished or listing_digest(setup.seed, listing.children) != stored[:LISTING_DIGEST_BYTES]:
        return None
    subfolders = []
    for name, raw in listing.children:
        if stat_mod.S_ISDIR(raw.st_mode):
            child = rel + b"/" + name
            if excluded(child):
                continue
            if child in setup.points:
                return None  # the walk checks that volume (walk._volume_child)
            subfolders.append((child, Stat.of(raw)))
    return int.from_bytes(stored[LISTING_DIGEST_BYTES:], "little"), subfolders
