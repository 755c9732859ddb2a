"""`treewatch verify`: re-hash files the index calls unchanged and report silent corruption.

A file whose size, mtime_ns and inode still match its index row should still have the
indexed hash; when it does not, its content changed behind the filesystem's back (bit rot,
a bad disk, a tool that restored the mtime). Such a file is reported and *marked* in the
index (``corrupt_blake3``: the hash seen on disk), never silently re-hashed: the mark shows
in `status` and `ls --json` until the file changes again (the scanner's next write clears
it) or its owner accepts the new content with `verify --accept PATH`.

Entries a scan would re-hash anyway are skipped, since their indexed hash proves nothing:
racily clean rows, rows of an older hash scheme (`rebuild`'s), and files whose stat no
longer matches the row (the scanner's). The run is rate-limited (a token bucket on bytes)
and resumable: a cursor (the last verified path per root and scope) is stored with the
`verified_*` counters in one transaction, so a rerun continues after it and counts nothing
twice; a completed pass deletes it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon import fs
from daemon.hasher import hash_if_unchanged
from daemon.index import Index, RootRow
from daemon.model import Entry, RootState, join
from daemon.progress import NoProgress, Progress
from daemon.rules import HASH_SCHEME, granularity_ns, is_racily_clean
from daemon.toolstore import JobRow, ToolStore

JOB = "verify"
# Files read from the index per query, and how often the cursor is saved.
CHUNK = 256
SAVE_EVERY_S = 2.0
# The token bucket holds at most this many seconds of the rate: a pause never lets a burst
# through that is bigger than that.
BURST_S = 1.0


class TokenBucket:
    """Bytes per second on average, with a burst of ``burst`` bytes; debt is paid by waiting.

    Pure: the caller passes the clock's time and does the waiting, so it is tested without
    sleeping.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, nbytes: int, now: float) -> float:
        """Spend ``nbytes``; return how long to wait before reading them (0 when in budget)."""
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


@dataclass(frozen=True, slots=True)
class Finding:
    """A file whose content no longer has its indexed hash, though its stat says unchanged."""

    path: bytes  # absolute
    old_blake3: bytes
    new_blake3: bytes
    size: int
    mtime_ns: int


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    checked_bytes: int = 0
    skipped: int = 0  # changed since indexed, racy, older scheme: the scanner's or rebuild's
    found: list[Finding] = field(default_factory=list)  # marked by this run
    cleared: int = 0  # marked before, and matching their indexed hash again
    corrupt: list[Finding] = field(default_factory=list)  # every mark in the scopes at the end
    errors: dict[bytes, str] = field(default_factory=dict)
    offline: list[bytes] = field(default_factory=list)
    resumed: bool = False
    interrupted: bool = False
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Accepted:
    path: bytes
    old_blake3: bytes
    new_blake3: bytes
    seq: int


class VerifyError(Exception):
    """`verify --accept` cannot accept what it was given; the message says why."""


def verify(
    index: Index,
    scopes: Sequence[tuple[RootRow, bytes]],
    *,
    max_rate: float | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> VerifyReport:
    """Verify every hashed file under each (root, relative path); ``max_rate`` in bytes/s."""
    started = clock()
    progress = progress or NoProgress()
    stop = stop or threading.Event()
    bucket = TokenBucket(max_rate, max_rate * BURST_S, clock()) if max_rate else None
    report = VerifyReport()
    tools = ToolStore(index)
    for root, scope in scopes:
        if root.state is RootState.OFFLINE:
            report.offline.append(root.path)
            continue
        _verify_scope(tools, root, scope, report, bucket, progress, stop, clock)
        report.corrupt += [
            Finding(join(root.path, c.path), c.blake3, c.corrupt_blake3, c.size, c.mtime_ns)
            for c in tools.corrupt_under(root.id, scope)
        ]
        if report.interrupted:
            break
    report.seconds = clock() - started
    return report


def _verify_scope(
    tools: ToolStore,
    root: RootRow,
    scope: bytes,
    report: VerifyReport,
    bucket: TokenBucket | None,
    progress: Progress,
    stop: threading.Event,
    clock: Callable[[], float],
) -> None:
    previous = tools.job(JOB, root.id, scope)
    report.resumed = report.resumed or previous is not None
    job = previous or JobRow(JOB, root.id, scope, None, 0, 0, time.time(), 0)
    after = job.cursor if isinstance(job.cursor, bytes) else None
    marked = tools.index.corrupt_ids(root.id)
    files, nbytes = tools.file_totals_after(root.id, scope, after)
    progress.phase(join(root.path, scope), "verifying")
    progress.total(files, nbytes)
    done_files = done_bytes = 0
    last_save = clock()

    def save() -> None:
        nonlocal job, done_files, done_bytes, last_save
        job = JobRow(JOB, root.id, scope, after, job.done_files + done_files, job.done_bytes + done_bytes,
                     job.started_at, 0)  # fmt: skip
        tools.save_job(job, {"verified_files": done_files, "verified_bytes": done_bytes})
        done_files = done_bytes = 0
        last_save = clock()

    while True:
        chunk = tools.files_after(root.id, scope, after, CHUNK)
        for entry in chunk:
            if stop.is_set():
                save()
                report.interrupted = True
                return
            if bucket is not None:
                wait = bucket.take(entry.stat.size, clock())
                if wait > 0 and stop.wait(wait):
                    continue  # stopped while waiting: the loop's top saves and returns
            checked = _verify_one(tools, root, entry, entry.id in marked, report)
            if checked:
                done_files += 1
                done_bytes += entry.stat.size
            progress.advance(1, entry.stat.size)
            after = entry.path
            if clock() - last_save > SAVE_EVERY_S:
                save()
        if len(chunk) < CHUNK:
            break
    save()
    tools.end_job(JOB, root.id, scope)


def _verify_one(tools: ToolStore, root: RootRow, entry: Entry, marked: bool, report: VerifyReport) -> bool:
    """Re-hash one file if its indexed hash should still hold; True when it was checked."""
    path = join(root.path, entry.path)
    if entry.racy or entry.scheme < HASH_SCHEME or entry.blake3 is None:
        report.skipped += 1
        return False
    try:
        hashed = hash_if_unchanged(path, entry.stat)
    except OSError as e:
        report.errors[path] = e.strerror or str(e)
        return False
    if hashed is None:
        report.skipped += 1  # it changed, or is changing: the scanner's to look at
        return False
    report.checked += 1
    report.checked_bytes += entry.stat.size
    if hashed.digest != entry.blake3:
        if tools.set_corrupt(entry, hashed.digest):
            report.found.append(Finding(path, entry.blake3, hashed.digest, entry.stat.size, entry.stat.mtime_ns))
    elif marked and tools.set_corrupt(entry, None):
        report.cleared += 1  # the content came back (restored from a backup, mtime kept)
    return True


def accept(index: Index, root: RootRow, scope: bytes) -> list[Accepted]:
    """Accept the content now on disk of every corrupt-marked file at or below ``scope``.

    Each file is hashed again (what is stored is what is there now, not what `verify` saw),
    its hash stored, its mark cleared, and a `modified` change appended to the feed.
    """
    tools = ToolStore(index)
    marks = tools.corrupt_under(root.id, scope)
    if not marks:
        raise VerifyError(f"{os.fsdecode(join(root.path, scope))}: nothing there is marked corrupt")
    granularity = granularity_ns(fs.fs_type(root.path))
    accepted = []
    for mark in marks:
        entry = index.entry(root.id, mark.path)
        path = join(root.path, mark.path)
        shown = os.fsdecode(path)
        if entry is None:
            continue
        try:
            hashed = hash_if_unchanged(path, entry.stat)
        except OSError as e:
            raise VerifyError(f"{shown}: {e.strerror or e}") from None
        if hashed is None:
            raise VerifyError(f"{shown}: changed since it was verified; `treewatch scan` indexes it again")
        racy = is_racily_clean(hashed.stat.mtime_ns, hashed.read_started_ns, granularity)
        seq = tools.accept_content(entry, hashed.digest, racy)
        if seq is None:
            raise VerifyError(f"{shown}: changed in the index meanwhile (a scan ran); verify it again")
        assert entry.blake3 is not None
        accepted.append(Accepted(path, entry.blake3, hashed.digest, seq))
    return accepted
