"""One scan of one root: the three steps (walk, hash and write, delete) over a set of scopes.

Step 1 is walk.py, step 2 stepper.py, step 3 `_delete_gone` below; the scan's bookkeeping is
its journal (journal.py). The index itself is the scan's progress record: every batch commits
its rows together with the queue rows it consumed, so a scan interrupted at any point (SIGTERM,
kill -9, power cut) is resumed by scanning again — what was committed now matches the disk and
is not queued, so nothing committed is hashed twice. A first index (a full scan of a root with
nothing indexed) runs steps 1 and 2 side by side instead, without the queue (`_first_index`).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from daemon import fs, volumes
from daemon.config import RootConfig, SyncConfig
from daemon.filters import Excluder
from daemon.hasher import GROUP_FILE_MAX, PROCESS_MIN_FILES, open_processes
from daemon.index import Index, RootRow
from daemon.journal import Batch, ScanJournal
from daemon.listers import Listers, Setup, open_listers
from daemon.model import Kind, Op, QueueRow, RootState, ScanKind, ScanReport, ScanScope, is_within, join
from daemon.progress import NoProgress, Progress
from daemon.rules import RootProbe, offline_reason
from daemon.stepper import CountedRows, Stepper
from daemon.walk import StreamedWalk, WalkState, digest_seed, walk_scope


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


def _note_volumes(report: ScanReport, found: volumes.Volumes, scopes: Sequence[ScanScope]) -> None:
    report.volumes_offline = dict(found.offline)
    report.volumes_online = list(found.online)
    report.volumes_back += [p for p in found.came_online if p not in report.volumes_back]
    # What the scan was asked to bring in line and could not: an offline volume inside a scope,
    # or a scope inside an offline volume.
    report.volumes_missed = sorted(
        p for p in found.offline if any(is_within(p, s.subtree) or is_within(s.subtree, p) for s in scopes)
    )


def _delete_gone(journal: ScanJournal, root: RootRow, sync: SyncConfig, report: ScanReport,
                 check_volumes: Callable[[], volumes.Volumes], found: volumes.Volumes,
                 scopes: Sequence[ScanScope]) -> None:  # fmt: skip
    """Step 3: delete what the walk did not find, re-checking before each batch that the root
    is still online and that each volume below it is still the one the walk saw — a disk
    unmounted mid-scan deletes nothing (Syncthing checks its folder marker at the same points)."""
    # A row that step 2 wrote below a folder that step 1 found gone (it came back between the
    # two, or went after its child was walked) goes with it: never a row whose folder's row is
    # deleted (torture seed 777001).
    journal.mark_gone_below_gone()
    while True:
        chunk = journal.gone(sync.batch_size)
        if not chunk:
            return
        reason, _ = check_online(journal.index, root)
        if reason is not None:
            report.offline = reason
            journal.index.set_root(root.id, state=RootState.OFFLINE.value, offline_reason=reason)
            return
        moved = volumes.changed(root, found)
        if moved:
            # Unmounted (or replaced) since the walk: what the walk found gone below it is what
            # the unmount hid. It stays; the check records the volume as it is now.
            for path in moved:
                journal.unmark_gone_under(path)
            found = check_volumes()
            _note_volumes(report, found, scopes)
            continue
        # A hard-linked file deleted or moved out under one name may have been written through
        # it first, out of sight of the other names' folders: those are looked at again
        # (torture seed 2, burst 12: `ln a d/b; echo >> d/b; mv d /elsewhere` left a stale).
        gone_paths = {path for _, path, _ in chunk}
        linked = journal.other_names([i for i, _, kind in chunk if kind is Kind.FILE])
        report.linked += [p for p in linked if p not in gone_paths]
        journal.commit(Batch(deletes=chunk))
        report.ops[Op.DELETED] += len(chunk)


def _step2(index: Index, journal: ScanJournal, root_path: bytes, sync: SyncConfig, report: ScanReport,
           progress: Progress, pool: ThreadPoolExecutor | None, small_files: int, stop: threading.Event,
           found: volumes.Volumes, streamed: CountedRows | None) -> None:  # fmt: skip
    """Step 2 with its hashers: the threads of ``pool`` (or its own), worker processes when
    ``small_files`` make them pay off (open_processes), all gone when it ends however it ends.
    With nothing indexed yet, the content-hash index is built once after the writes."""
    own_pool = pool is None
    pool = pool or ThreadPoolExecutor(sync.hash_workers, thread_name_prefix="hash")
    procs = open_processes(sync.hash_workers, small_files)
    content_index_dropped = index.defer_content_index()
    try:
        Stepper(journal, root_path, sync, report, progress, pool, procs, stop, gate=found.gate,
                streamed=streamed).run()  # fmt: skip
    finally:
        if procs is not None:
            procs.close()
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
        if content_index_dropped:
            index.build_content_index()


def _first_index(index: Index, journal: ScanJournal, root_path: bytes, scope: ScanScope, sync: SyncConfig,
                 excluded: Excluder, found: volumes.Volumes, report: ScanReport, progress: Progress,
                 stop: threading.Event, pool: ThreadPoolExecutor | None) -> None:  # fmt: skip
    """Steps 1 and 2 side by side for a root with nothing indexed (walk.StreamedWalk); there is
    no step 3. Resumed like any scan: killed, the next one finds the root no longer empty and
    takes the queued path, in which all that was committed compares unchanged."""
    progress.phase(root_path, "walking")
    walk = StreamedWalk(lambda j: WalkState(j, sync.batch_size, gate=found.gate), root_path, scope, excluded,
                        stop.is_set)  # fmt: skip
    try:
        # Worker processes pay off from PROCESS_MIN_FILES small files on (open_processes): read
        # that far ahead of step 2 to know. The queued path counts them in its queue instead.
        rows = walk.rows()
        ahead: list[QueueRow] = []
        small_files = 0
        for row in rows:
            ahead.append(row)
            if row.stat.kind is Kind.FILE and row.stat.size <= GROUP_FILE_MAX:
                small_files += 1
                if small_files >= PROCESS_MIN_FILES:
                    break
        # Under PROCESS_MIN_FILES small files, the walk is over before step 2 begins.
        journal.set_state("hashing")
        progress.phase(root_path, "hashing")
        counted = CountedRows(itertools.chain(ahead, rows))
        _step2(index, journal, root_path, sync, report, progress, pool, small_files, stop, found, counted)
        journal.set_state("hashing", queued_files=counted.files, queued_bytes=counted.bytes)  # all found
    finally:
        walk.close()
    report.walked = walk.state.seen
    if walk.state.errors:
        journal.record_errors(walk.state.errors)
        report.error_count += len(walk.state.errors)


def _listers(index: Index, root_id: int, root_path: bytes, scopes: Sequence[ScanScope], sync: SyncConfig,
             excluded: Excluder, found: volumes.Volumes, stop: threading.Event) -> Listers | None:  # fmt: skip
    """Lister processes for a walk of a whole root (a sync: every folder known, most unchanged),
    as many as ``hash_workers`` (the hash workers have nothing to do while the walk runs), none
    for a scoped scan: a few folders are listed sooner than a process starts (~45 ms)."""
    whole_root = len(scopes) == 1 and scopes[0].subtree == b"" and scopes[0].recursive
    if not whole_root or sync.hash_workers < 2:
        return None
    setup = Setup(str(index.path), root_id, root_path, digest_seed(excluded), excluded.patterns, found.gate.points)
    return open_listers(sync.hash_workers, setup, stop.is_set)


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

    excluded = Excluder(root_config.exclude)
    found = volumes.check(index, root, root_config, excluded)
    _note_volumes(report, found, scopes)

    scopes_json = json.dumps([[os.fsdecode(s.subtree), s.recursive] for s in scopes])
    journal = ScanJournal.begin(index, root.id, kind.value, scopes_json)
    previous_errors = {p for p, _ in index.errors(root.id, limit=1_000_000)}
    for scope in scopes:
        journal.clear_errors_under(scope.subtree)

    if kind is ScanKind.FULL and len(scopes) == 1 and not index.has_entries(root.id):
        _first_index(index, journal, root_path, scopes[0], sync, excluded, found, report, progress, stop, pool)
        if not report.interrupted:
            journal.finish(full=True, counter=f"scans_{kind.value}")
        report.errors = {p: e for p, e in index.errors(root.id, limit=1_000_000) if p not in previous_errors}
        report.seconds = time.monotonic() - started
        return report

    progress.phase(root_path, "walking")
    walk = WalkState(journal, sync.batch_size, gate=found.gate, listed=set() if len(scopes) > 1 else None)
    listers = _listers(index, root.id, root_path, scopes, sync, excluded, found, stop)
    try:
        for scope in scopes:
            walk_scope(walk, root_path, scope, excluded, stop.is_set, listers)
    finally:
        if listers is not None:
            listers.close()
            report.listers_lost = listers.lost
    walk.flush()
    report.walked = walk.seen
    if walk.errors:
        journal.record_errors(walk.errors)
        report.error_count += len(walk.errors)
    if stop.is_set():
        report.interrupted = True
        report.seconds = time.monotonic() - started
        return report

    journal.match_renames_by_inode()
    files, nbytes, small_files = journal.queue_totals(GROUP_FILE_MAX)
    journal.set_state("hashing", queued_files=files, queued_bytes=nbytes)
    progress.phase(root_path, "hashing")
    progress.total(files, nbytes)
    _step2(index, journal, root_path, sync, report, progress, pool, small_files, stop, found, None)
    if report.interrupted:
        report.seconds = time.monotonic() - started
        return report

    progress.phase(root_path, "deleting")
    journal.set_state("deleting")
    _delete_gone(journal, root, sync, report, lambda: volumes.check(index, root, root_config, excluded), found, scopes)
    if report.offline is None:
        journal.finish(full=kind is ScanKind.FULL, counter=f"scans_{kind.value}")
    report.errors = {p: e for p, e in index.errors(root.id, limit=1_000_000) if p not in previous_errors}
    report.seconds = time.monotonic() - started
    return report
