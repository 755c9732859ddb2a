"""One scan of one root: the three steps (walk, hash, deletions) over a set of scopes; resume.

The index itself is the scan's progress record: every batch commits its rows together with
the queue rows it consumed, so a scan interrupted at any point (SIGTERM, kill -9, power cut)
is resumed by scanning again — what was committed now matches the disk and is not queued,
so nothing committed is hashed twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from daemon import fs
from daemon.config import RootConfig, SyncConfig
from daemon.filters import Excluder
from daemon.hasher import Group, Hashed, HashProcesses, Unstable, hash_file, hash_group
from daemon.index import Batch, Index, QueueRow, RootRow, Write
from daemon.model import Kind, Op, RootState, ScanKind, ScanScope, Stat, join, parent_of
from daemon.rules import HASH_SCHEME, RootProbe, granularity_ns, is_racily_clean, offline_reason
from daemon.walk import WalkState, walk_scope

# Commit at least this often while hashing, so progress and resume points stay fresh.
COMMIT_EVERY_S = 2.0
# How many queued entries may be in flight (hashing or waiting to commit) at once. Enough for
# the hash workers to go on through a commit (~15 ms for 1000 rows) instead of waiting for it:
# a first index of 100k small files took 4.95 s with 256, 3.9 s with 2048.
HASH_WINDOW = 2048
# How deep a chain of renames is written ahead of path order before falling back to parking.
MAX_EARLY_DEPTH = 100


# Small files are hashed in groups, one worker task per group: a task per file costs more
# in thread hand-offs than hashing the file (100k files of 4-64 KiB: 8.1 s one task each,
# against 1.9 s for b3sum). Large files keep a task each, so two of them hash in parallel.
GROUP_FILES = 64
GROUP_BYTES = 8 * 1024 * 1024
GROUP_FILE_MAX = 1024 * 1024  # files larger than this get a task of their own
# From this many small files queued, their groups go to worker processes (hasher.HashProcesses).
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


class Progress(Protocol):
    def phase(self, root: bytes, phase: str) -> None: ...
    def total(self, files: int, nbytes: int) -> None: ...
    def advance(self, files: int, nbytes: int) -> None: ...


class NoProgress:
    def phase(self, root: bytes, phase: str) -> None:
        pass

    def total(self, files: int, nbytes: int) -> None:
        pass

    def advance(self, files: int, nbytes: int) -> None:
        pass


@dataclass(slots=True)
class ScanReport:
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

    @property
    def clean(self) -> bool:
        """The index now matches the disk for the scanned scopes."""
        return not (self.offline or self.busy_pid or self.error_count or self.unstable or self.interrupted)


def scan_kind(scopes: Sequence[ScanScope], is_dir: Callable[[bytes], bool]) -> ScanKind:
    """A scan counts as its widest scope."""
    if any(s.recursive and not s.subtree for s in scopes):
        return ScanKind.FULL
    if any(s.recursive for s in scopes):
        return ScanKind.SUBTREE
    if any(not s.subtree or is_dir(s.subtree) for s in scopes):
        return ScanKind.FOLDER
    return ScanKind.FILE


def probe_root(path: bytes) -> RootProbe:
    try:
        st = os.stat(path)  # the root itself may be a symlink the admin chose; nothing below is followed
    except (FileNotFoundError, NotADirectoryError):
        return RootProbe(exists=False, is_dir=False, dev=None, empty=True)
    except OSError:
        return RootProbe(exists=True, is_dir=False, dev=None, empty=True)
    if not os.path.isdir(path):
        return RootProbe(exists=True, is_dir=False, dev=st.st_dev, empty=True)
    try:
        empty = fs.is_empty_dir(path)
    except OSError:
        empty = True
    return RootProbe(exists=True, is_dir=True, dev=st.st_dev, empty=empty)


def check_online(index: Index, root: RootRow) -> tuple[str | None, bool]:
    """(offline reason or None, whether the root came back on a new device number).

    NFS, btrfs and tmpfs hand out anonymous device numbers that can change across a
    remount; when the root's top-level entries still carry the recorded inode numbers,
    it is the same filesystem and the new number is adopted instead of staying offline.
    """
    probe = probe_root(root.path)
    reason = offline_reason(probe, root.dev, int(index.has_entries(root.id)))
    if reason is None or not probe.exists or not probe.is_dir or probe.empty or probe.dev is None:
        return reason, False
    samples = index.sample_inodes(root.id)
    same = 0
    for rel, inode in samples:
        with contextlib.suppress(OSError):
            same += os.lstat(join(root.path, rel)).st_ino == inode
    if samples and same * 2 > len(samples):
        index.move_root_dev(root.id, probe.dev)
        return None, True
    return reason, False


class _Stepper:
    """Step 2 for one scan: turns queue rows into writes, hashing files in worker threads or processes."""

    def __init__(self, index: Index, root: RootRow, scan_id: int, sync: SyncConfig, report: ScanReport,
                 progress: Progress, pool: ThreadPoolExecutor, procs: HashProcesses | None,
                 stop: threading.Event) -> None:  # fmt: skip
        self.index, self.root, self.scan_id, self.sync = index, root, scan_id, sync
        self.report, self.progress, self.pool, self.procs, self.stop = report, progress, pool, procs, stop
        self.granularity = granularity_ns(fs.fs_type(root.path))
        self.batch = Batch(root.id, scan_id)
        self.last_commit = time.monotonic()
        self.hash_matched: set[int] = set()
        self.any_gone = index.any_gone(scan_id)
        # Inode-matched renames of this scan: source entry id -> the path it moves to.
        self.rename_sources: dict[int, bytes] = {}
        self.moved: set[int] = set()  # sources whose rename is written
        self.parked: set[int] = set()  # sources moved aside to break a cycle (mv a t; mv b a; mv t b)
        self.in_progress: set[bytes] = set()
        self.done_early: set[bytes] = set()  # rows written ahead of path order (see _first)
        self.last_in_order = b""

    def commit(self) -> None:
        if len(self.batch) or self.batch.counters or self.batch.errors:
            self.index.commit(self.batch)
        self.batch = Batch(self.root.id, self.scan_id)
        self.last_commit = time.monotonic()

    def run(self) -> None:
        window: deque[tuple[QueueRow, Pending | None]] = deque()
        group: list[tuple[bytes, Stat]] = []
        slots: list[_Slot] = []
        group_bytes = 0

        def submit_group() -> None:
            nonlocal group, slots, group_bytes
            if group:
                future = self.procs.submit(group) if self.procs is not None else self.pool.submit(hash_group, group)
                for slot in slots:
                    slot.future = future
            group, slots, group_bytes = [], [], 0

        self.rename_sources.update(self.index.rename_targets(self.scan_id))
        for row in self.index.queued(self.scan_id):
            if self.stop.is_set():
                break
            pending: Pending | None = None
            if row.stat.kind is Kind.FILE and row.reason != "metadata" and row.renamed_from is None:
                path = join(self.root.path, row.path)
                if row.stat.size > GROUP_FILE_MAX:
                    pending = self.pool.submit(hash_file, path, row.stat)
                else:
                    slot = _Slot(len(group))
                    group.append((path, row.stat))
                    slots.append(slot)
                    group_bytes += row.stat.size
                    pending = slot
                    if len(group) >= GROUP_FILES or group_bytes >= GROUP_BYTES:
                        submit_group()
            window.append((row, pending))
            if len(window) > HASH_WINDOW:
                submit_group()  # the head may be waited on now: its group must be on its way
            while window and (len(window) > HASH_WINDOW or window[0][1] is None or window[0][1].done()):
                self._finish(*window.popleft())
        submit_group()
        while window:
            queued_row, future = window.popleft()
            if self.stop.is_set() and future is not None:
                future.cancel()
                continue
            self._finish(queued_row, future)
        self.commit()
        if self.parked - self.moved:
            # A parked row whose rename was not written (it changed again meanwhile) goes back
            # to its path, or is deleted when that is taken: never left under a NUL name.
            self.index.unpark(self.root.id)
        if self.stop.is_set():
            self.report.interrupted = True

    def _occupant(self, row: QueueRow, write: Write) -> None:
        """Who holds the path now: an entry moving elsewhere is parked, anything else evicted."""
        if row.entry_id is None or row.entry_id == write.entry_id:
            return
        if row.entry_id in self.rename_sources:
            if row.entry_id not in self.moved:  # else it has already left this path
                write.park_id = row.entry_id
                self.parked.add(row.entry_id)
        else:
            write.evict_id = row.entry_id
            self.hash_matched.add(row.entry_id)  # deleted: no later file may claim it by content

    def _ready(self, row: QueueRow, depth: int) -> bool:
        """Write ahead of path order what this row depends on, so the feed replays in order.

        The occupant of this row's path moving elsewhere is written first (`mv b c; mv a b`:
        "c renamed from b" before "b renamed from a"; a consumer applying "b renamed from a"
        first would then drop b on "c renamed from b"), and so is a new parent folder of such
        an early row, which must exist before its child. False when the parent is itself
        waiting on this row (`mv a0 t; mv a a0; mv t a0/a1`): the row then waits for its turn
        in path order and the occupant is parked instead, as in a swap.
        """
        if row.parent_id is None:
            parent = parent_of(row.path)
            if parent in self.in_progress or not self._write_early(parent, depth):
                return False
        occupant = row.entry_id
        if occupant is not None and occupant != row.renamed_from and occupant not in self.moved:
            target = self.rename_sources.get(occupant)
            if target is not None and target not in self.in_progress:
                self._write_early(target, depth)  # when it cannot be, the occupant is parked
        return True

    def _write_early(self, path: bytes, depth: int) -> bool:
        """Write the queued row at ``path`` now, unless it is written already; True when it is."""
        if path <= self.last_in_order or path in self.done_early:
            return True
        if depth >= MAX_EARLY_DEPTH:
            return False
        early = self.index.queued_row(self.scan_id, path)
        if early is None:
            return True  # not queued (unchanged, or committed already)
        if not self._write_row(early, None, depth + 1):
            return False
        self.done_early.add(path)
        return True

    def _finish(self, row: QueueRow, future: Pending | None) -> None:
        if row.path in self.done_early:
            self.done_early.discard(row.path)
        else:
            self._write_row(row, future, 0)
        self.last_in_order = row.path

    def _write_row(self, row: QueueRow, future: Pending | None, depth: int) -> bool:
        self.in_progress.add(row.path)
        try:
            # A row in path order is written regardless: whatever it depends on came before it.
            if not self._ready(row, depth) and depth:
                return False
            self._write_row_now(row, future)
            return True
        finally:
            self.in_progress.discard(row.path)

    def _write_row_now(self, row: QueueRow, future: Pending | None) -> None:
        abs_path = join(self.root.path, row.path)
        write = self._write_for(row, abs_path, future)
        self.batch.queue_done.append(row.path)
        if write is not None:
            if row.entry_id is not None and row.reason in ("content", "replaced"):
                # The row this path had may be one name of a hard-linked file whose inode the
                # path no longer holds (`echo > b; rm b; echo > b`, b a hard link of a): written
                # through b first, out of sight of a's folder. Its other names are looked at
                # again, as for a name deleted (_delete_gone). Torture seed 1149277456.
                self.report.linked += self.index.other_names(
                    self.root.id, [row.entry_id], unless_file=(write.stat.dev, write.stat.inode)
                )
            self._occupant(row, write)
            self.batch.writes.append(write)
            # Errors are not cleared here: scan() cleared the scope's old ones before the walk,
            # and clearing by path now would erase what this very scan found (a folder it could
            # not list whose own row changed; a file indexed without a hash as unreadable).
            self.report.ops[write.op] += 1
            if write.stat.kind is Kind.FILE and write.stat.nlink > 1:
                # A write through one name of a hard-linked file changes every name, but
                # inotify reports only the folder of the name written to: the other names
                # are looked at again (torture seed 1, burst 2: `ln a b; echo >> a` left b
                # with a's old size and hash in the index for good).
                self.report.linked += self.index.stale_links(self.root.id, write.path, write.stat)
        # batch_size counts entries, one queue row each (len(batch) counts a write and its queue row).
        if len(self.batch.queue_done) >= self.sync.batch_size or time.monotonic() - self.last_commit > COMMIT_EVERY_S:
            self.commit()

    def _write_for(self, row: QueueRow, abs_path: bytes, future: Pending | None) -> Write | None:
        st = row.stat
        if row.reason == "content" and row.entry_id in self.rename_sources:
            # The entry that held this path moved elsewhere in this scan (mv b c; mv a b):
            # what is here now is new, and the old row is parked by _occupant, not updated.
            row = dataclasses.replace(row, reason="new")
        try:
            if future is None:
                # Nothing will open this entry (a rename, a metadata refresh, a folder): make sure
                # it is still the one the walk saw before its row says so. xattrs and readlink
                # cannot tell: an xattr read of a vanished path finds "none" (torture seed 777001:
                # a file renamed into a folder that moved away before the write was stored there).
                fs.check_same(abs_path, st)
            if row.renamed_from is not None:
                old_path = self._path_of(row.renamed_from)
                self.moved.add(row.renamed_from)
                # A parked entry (one of a cycle) cannot be reported as renamed from a path that
                # now holds another entry: it keeps its id and hash but appears as added.
                op = Op.ADDED if row.renamed_from in self.parked else Op.RENAMED
                return Write(op, row.path, st, row.renamed_from, row.parent_id, keep_hash=True,
                             target=self._target(abs_path, st.kind), xattrs=fs.read_xattrs(abs_path),
                             old_path=None if op is Op.ADDED else old_path)  # fmt: skip
            if future is None:
                target = self._target(abs_path, st.kind)
                xattrs = fs.read_xattrs(abs_path) if st.kind in (Kind.FILE, Kind.DIR) else None
                if row.reason == "metadata":
                    return Write(Op.METADATA, row.path, st, row.entry_id, row.parent_id, keep_hash=True,
                                 target=target, xattrs=xattrs)  # fmt: skip
                if row.reason == "content":  # a symlink pointing elsewhere
                    return Write(Op.MODIFIED, row.path, st, row.entry_id, row.parent_id, target=target, xattrs=xattrs)
                return Write(Op.ADDED, row.path, st, None, row.parent_id, target=target, xattrs=xattrs)
            return self._hashed_write(row, future)
        except (fs.Moved, Unstable, FileNotFoundError, NotADirectoryError):
            # It changed between the walk and now: not stored as hashed, looked at again later.
            self.report.unstable.append(row.path)
            if row.renamed_from is not None:
                # Matching took the source off the gone list; its row stays where it was until
                # both ends are looked at again, together (the daemon adds them in one round).
                self.report.unstable.append(self._path_of(row.renamed_from))
            return None
        except OSError as e:
            self.batch.errors[row.path] = f"{os.strerror(e.errno or 0) if e.errno else e}"
            self.report.error_count += 1
            if row.reason == "metadata" or row.stat.kind is not Kind.FILE:
                return None
            # The file is there but unreadable: index it without a hash rather than pretend.
            op = Op.ADDED if row.reason in ("new", "replaced") else Op.MODIFIED
            entry_id = None if op is Op.ADDED else row.entry_id
            if entry_id is not None:
                old = self.index.entry(self.root.id, row.path)
                if old is not None and old.id == entry_id and old.blake3 is None and old.stat == st:
                    return None  # still unreadable, nothing else moved: no new feed entry per pass
            return Write(op, row.path, st, entry_id, row.parent_id, blake3=None)

    def _path_of(self, entry_id: int) -> bytes:
        row = self.index.db.execute("SELECT path FROM entries WHERE id = ?", (entry_id,)).fetchone()
        path: bytes = row[0]
        return path[1:] if path.startswith(b"\x00") else path

    @staticmethod
    def _target(abs_path: bytes, kind: Kind) -> bytes | None:
        return fs.read_link(abs_path) if kind is Kind.SYMLINK else None

    def _hashed_write(self, row: QueueRow, future: Pending) -> Write:
        result = future.result()
        st = result.stat
        self.report.files_hashed += 1
        self.report.bytes_hashed += st.size
        self.batch.counters["files_hashed"] = self.batch.counters.get("files_hashed", 0) + 1
        self.batch.counters["bytes_hashed"] = self.batch.counters.get("bytes_hashed", 0) + st.size
        self.batch.done_files += 1
        self.batch.done_bytes += st.size
        self.progress.advance(1, st.size)
        racy = is_racily_clean(st.mtime_ns, result.read_started_ns, self.granularity)
        common = {"blake3": result.digest, "racy": racy, "scheme": HASH_SCHEME, "xattrs": result.xattrs}
        if row.reason == "content" and row.entry_id is not None:
            old = self.index.db.execute("SELECT blake3 FROM entries WHERE id = ?", (row.entry_id,)).fetchone()
            op = Op.METADATA if old is not None and old[0] == result.digest else Op.MODIFIED
            return Write(op, row.path, st, row.entry_id, row.parent_id, **common)  # type: ignore[arg-type]
        # New here: the last resort of rename matching is a gone file with the same content.
        # (A first index has nothing gone: skip the query, one per file, when there is none.)
        match = None
        if self.any_gone:
            match = self.index.gone_with_hash(self.scan_id, result.digest, st.size, self.hash_matched)
        if match is not None:
            self.hash_matched.add(match[0])
            return Write(Op.RENAMED, row.path, st, match[0], row.parent_id, old_path=match[1], **common)  # type: ignore[arg-type]
        return Write(Op.ADDED, row.path, st, None, row.parent_id, **common)  # type: ignore[arg-type]


def _delete_gone(index: Index, root: RootRow, scan_id: int, sync: SyncConfig, report: ScanReport) -> None:
    """Step 3: delete what the walk did not find, re-checking before each batch that the root
    is still online — a disk unmounted mid-scan deletes nothing (Syncthing checks its folder
    marker at the same two points)."""
    # A row that step 2 wrote below a folder that step 1 found gone (it came back between the
    # two, or went after its child was walked) goes with it: never a row whose folder's row is
    # deleted (torture seed 777001).
    index.mark_gone_below_gone(scan_id, root.id)
    while True:
        chunk = index.gone(scan_id, sync.batch_size)
        if not chunk:
            return
        reason, _ = check_online(index, root)
        if reason is not None:
            report.offline = reason
            index.set_root(root.id, state=RootState.OFFLINE.value, offline_reason=reason)
            return
        # A hard-linked file deleted or moved out under one name may have been written through
        # it first, out of sight of the other names' folders: those are looked at again
        # (torture seed 2, burst 12: `ln a d/b; echo >> d/b; mv d /elsewhere` left a stale).
        gone_paths = {path for _, path, _ in chunk}
        linked = index.other_names(root.id, [i for i, _, kind in chunk if kind is Kind.FILE])
        report.linked += [p for p in linked if p not in gone_paths]
        index.commit(Batch(root.id, scan_id, deletes=chunk))
        report.ops[Op.DELETED] += len(chunk)


def scan(
    index: Index,
    root_config: RootConfig,
    scopes: Sequence[ScanScope],
    sync: SyncConfig,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> ScanReport:
    """Bring the index in line with the disk for ``scopes`` of one root."""
    started = time.monotonic()
    progress = progress or NoProgress()
    stop = stop or threading.Event()
    root_path = os.fsencode(root_config.path)
    root = index.root(root_path)
    assert root is not None
    root_id = root.id
    kind = scan_kind(scopes, lambda rel: (e := index.entry(root_id, rel)) is not None and e.stat.kind is Kind.DIR)
    report = ScanReport(root_path, kind)

    for active in index.active_scans():
        if active.root_id == root.id and active.pid != os.getpid() and fs.pid_alive(active.pid):
            report.busy_pid = active.pid
            return report

    reason, report.device_moved = check_online(index, root)
    if reason is not None:
        report.offline = reason
        index.set_root(root.id, state=RootState.OFFLINE.value, offline_reason=reason)
        return report
    report.came_online = root.state is RootState.OFFLINE
    probe_dev = os.stat(root_path).st_dev
    index.set_root(root.id, state=RootState.ONLINE.value, offline_reason=None, dev=probe_dev)
    root = index.root(root_path)
    assert root is not None

    scopes_json = json.dumps([[os.fsdecode(s.subtree), s.recursive] for s in scopes])
    scan_id = index.begin_scan(root.id, kind.value, scopes_json)
    previous_errors = {p for p, _ in index.errors(root.id, limit=1_000_000)}
    for scope in scopes:
        index.clear_errors_under(root.id, scope.subtree)

    progress.phase(root_path, "walking")
    walk = WalkState(index, scan_id, root.id, sync.batch_size)
    excluded = Excluder(root_config.exclude)
    for scope in scopes:
        walk_scope(walk, root_path, scope, excluded, stop.is_set)
    walk.flush()
    report.walked = walk.seen
    if walk.errors:
        index.commit(Batch(root.id, scan_id, errors=walk.errors))
        report.error_count += len(walk.errors)
    if stop.is_set():
        report.interrupted = True
        report.seconds = time.monotonic() - started
        return report

    index.match_renames_by_inode(scan_id)
    files, nbytes, small_files = index.queue_totals(scan_id, GROUP_FILE_MAX)
    index.set_scan(scan_id, state="hashing", queued_files=files, queued_bytes=nbytes)
    progress.phase(root_path, "hashing")
    progress.total(files, nbytes)
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(sync.hash_workers, thread_name_prefix="hash")
    # One core stays with this process: it walks and commits (a second worker process on two
    # cores made the first index of 100k small files slower, 4.2 s against 3.8 s).
    process_count = min(sync.hash_workers, len(os.sched_getaffinity(0)) - 1)
    procs = None
    try:
        if small_files >= PROCESS_MIN_FILES and process_count > 0:
            with contextlib.suppress(OSError):  # out of descriptors or processes: threads hash them
                procs = HashProcesses(process_count)
        _Stepper(index, root, scan_id, sync, report, progress, pool, procs, stop).run()
    finally:
        if procs is not None:
            procs.close()
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
    if report.interrupted:
        report.seconds = time.monotonic() - started
        return report

    progress.phase(root_path, "deleting")
    index.set_scan(scan_id, state="deleting")
    _delete_gone(index, root, scan_id, sync, report)
    if report.offline is None:
        index.finish_scan(scan_id, root.id, full=kind is ScanKind.FULL, counter=f"scans_{kind.value}")
    report.errors = {p: e for p, e in index.errors(root.id, limit=1_000_000) if p not in previous_errors}
    report.seconds = time.monotonic() - started
    return report
