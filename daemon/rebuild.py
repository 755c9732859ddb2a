"""`treewatch rebuild`: re-derive what an upgrade changed, for entries already in the index.

PhotoStructure separates *sync* (follow the filesystem) from *rebuild* (re-derive what is
indexed when the algorithm improves). Here the derivation is versioned by
``rules.HASH_SCHEME``: what a file's row holds beyond its stat (its hash, its extended
attributes) was derived under the scheme in its ``scheme`` column. When the scheme is
bumped, `rebuild` visits exactly the files with an older one (no walk of the tree: the
index says which), re-reads them, and stores the new derivation:

- only where the file's stat still matches its row (size, mtime_ns, inode): a file that
  changed is the scanner's, which re-hashes it and tells the feed;
- without touching the change feed or the rows' ``seq``: consumers were already told about
  this content;
- in batches of ``batch_size``, each one transaction with its counters, so a rebuild killed
  at any point resumes by running again: stored rows have the new scheme and are not
  selected again, so nothing committed is hashed twice.

Every scheme so far hashes with plain BLAKE3-256, so a digest that differs from the stored
one is content that changed behind an unchanged stat: the row is marked corrupt, as
`verify` would (see verify.py), rather than silently taking the new hash. A future scheme
that changes the digest algorithm sets ``COMPARABLE_DIGESTS = False``.

What cannot be rebuilt is left for the next scan: unhashed files (their error stands),
missing files, files on offline roots.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon import fs
from daemon.hasher import hash_if_unchanged
from daemon.index import Index
from daemon.model import Entry, RootState, join
from daemon.rules import HASH_SCHEME, granularity_ns, is_racily_clean
from daemon.toolstore import JobRow, Rebuilt, ToolStore

if TYPE_CHECKING:  # `status` imports this module for rebuild_status: it needs no scanner
    from daemon.progress import Progress

JOB = "rebuild"
DEFAULT_BATCH = 1000
DEFAULT_WORKERS = 2
# True while a new scheme's digest of unchanged content equals the old scheme's.
COMPARABLE_DIGESTS = True


@dataclass(slots=True)
class RebuildReport:
    needed: int = 0  # files with an older scheme when the run started
    rebuilt: int = 0
    rebuilt_bytes: int = 0
    skipped: int = 0  # changed, missing or offline: the next scan re-hashes them
    corrupt: list[bytes] = field(default_factory=list)  # digest changed under an unchanged stat
    errors: dict[bytes, str] = field(default_factory=dict)
    resumed: bool = False
    interrupted: bool = False
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class RebuildStatus:
    """For `status` and the daemon's log: what is left, and what a running rebuild has done."""

    pending_files: int
    pending_bytes: int
    done_files: int
    done_bytes: int
    started_at: float | None
    pid: int | None


def needs_rebuild(index: Index) -> int:
    """How many files hold a derivation older than this version's (0: nothing to do)."""
    return ToolStore(index).rebuild_count(HASH_SCHEME)[0]


def rebuild_status(index: Index) -> RebuildStatus:
    tools = ToolStore(index)
    files, nbytes = tools.rebuild_count(HASH_SCHEME)
    job = tools.job(JOB, 0, b"")
    if job is None:
        return RebuildStatus(files, nbytes, 0, 0, None, None)
    return RebuildStatus(files, nbytes, job.done_files, job.done_bytes, job.started_at, job.pid)


def _derive(root: bytes, entry: Entry, granularity: int) -> Rebuilt | str | None:
    """The new derivation of one file; None when it changed (the scanner's); text on error."""
    try:
        hashed = hash_if_unchanged(join(root, entry.path), entry.stat)
    except OSError as e:
        return e.strerror or str(e)
    if hashed is None:
        return None
    racy = is_racily_clean(hashed.stat.mtime_ns, hashed.read_started_ns, granularity)
    if COMPARABLE_DIGESTS and entry.blake3 is not None and hashed.digest != entry.blake3:
        return Rebuilt(entry, entry.blake3, hashed.digest, racy, HASH_SCHEME, hashed.xattrs)
    return Rebuilt(entry, hashed.digest, None, racy, HASH_SCHEME, hashed.xattrs)


def rebuild(
    index: Index,
    batch_size: int = DEFAULT_BATCH,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
) -> RebuildReport:
    """Re-derive every file whose scheme is older than ``HASH_SCHEME``; see the module doc."""
    from concurrent.futures import ThreadPoolExecutor

    from daemon.progress import NoProgress

    started = time.monotonic()
    stop = stop or threading.Event()
    progress = progress or NoProgress()
    report = RebuildReport()
    tools = ToolStore(index)
    report.needed, nbytes = tools.rebuild_count(HASH_SCHEME)
    job = tools.job(JOB, 0, b"")
    report.resumed = job is not None
    if job is None:
        job = JobRow(JOB, 0, b"", 0, 0, 0, time.time(), os.getpid())
        if report.needed:
            tools.save_job(job)  # from here on `status` can show it, and a rerun is a resume
    roots = {r.id: r for r in index.roots()}
    granularity = {r.id: granularity_ns(fs.fs_type(r.path)) for r in roots.values()}
    progress.phase(os.fsencode(str(index.path)), "rebuilding")
    progress.total(report.needed, nbytes)
    # Rows skipped in this run are still selected by the query: the cursor steps over them.
    # A new run starts from the first id again, so what was skipped is tried once more.
    after = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="rebuild") as pool:
        while not stop.is_set():
            batch = tools.rebuild_batch(HASH_SCHEME, after, batch_size)
            if not batch:
                break
            after = batch[-1][1].id
            todo = []
            for root_path, entry in batch:
                root = roots.get(entry.root_id)
                if root is None or root.state is RootState.OFFLINE:
                    report.skipped += 1
                else:
                    todo.append((root_path, entry))
            results = list(pool.map(lambda t: _derive(t[0], t[1], granularity[t[1].root_id]), todo))
            stored: list[Rebuilt] = []
            for (root_path, entry), result in zip(todo, results, strict=True):
                if isinstance(result, Rebuilt):
                    stored.append(result)
                    if result.corrupt_blake3 is not None:
                        report.corrupt.append(join(root_path, entry.path))
                elif result is None:
                    report.skipped += 1
                else:
                    report.errors[join(root_path, entry.path)] = result
            files, nbytes = len(stored), sum(r.entry.stat.size for r in stored)
            job = JobRow(JOB, 0, b"", after, job.done_files + files, job.done_bytes + nbytes, job.started_at, 0)
            counters = {"files_hashed": files, "bytes_hashed": nbytes, "rebuilt_files": files, "rebuilt_bytes": nbytes}
            tools.store_rebuilt(stored, job, counters)
            report.rebuilt += files
            report.rebuilt_bytes += nbytes
            progress.advance(len(batch), sum(e.stat.size for _, e in batch))
    if stop.is_set():
        report.interrupted = True
    else:
        tools.end_job(JOB, 0, b"")
    report.seconds = time.monotonic() - started
    return report
