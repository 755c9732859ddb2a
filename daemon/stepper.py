"""Step 2 of a scan: the queue, in path order, becomes rows of the index, in an order that a
consumer replaying the feed can follow.

Each queued entry gets its write: hashed (new and changed files, by hasher.hash_in_order),
renamed (matched by inode in step 1 or by content here), refreshed (metadata), or added. The
subtle part is the order of renames: a rename that frees a path is written before the one that
takes it (`mv b c; mv a b`), and a cycle parks one row under a name no kernel allows until its
turn (docs/scanning.md, "Renames keep identity"). Every `batch_size` entries commit together.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from daemon import fs
from daemon.config import SyncConfig
from daemon.hasher import HashProcesses, Pending, Unstable, hash_in_order
from daemon.journal import Batch, ScanJournal, Write
from daemon.model import LISTING_DIGEST_BYTES, Kind, Op, QueueRow, ScanReport, Stat, join, parent_of
from daemon.progress import Progress
from daemon.rules import HASH_SCHEME, VolumeGate, granularity_ns, is_racily_clean

# Commit at least this often while hashing, so progress and resume points stay fresh.
COMMIT_EVERY_S = 2.0
# How deep a chain of renames is written ahead of path order before falling back to parking.
MAX_EARLY_DEPTH = 100


@dataclasses.dataclass(slots=True)
class _Listing:
    """A new folder written by this scan, its listing digest waiting for its children."""

    digest: bytes  # walk.listing_digest and the child count, as stored in children_digest
    children: int
    written: int = 0


class CountedRows:
    """A first index's rows as they come from its walk, counted: `status` shows them as queued."""

    def __init__(self, rows: Iterable[QueueRow]) -> None:
        self.rows = rows
        self.files = self.bytes = 0

    def __iter__(self) -> Iterator[QueueRow]:
        for row in self.rows:
            if row.stat.kind is Kind.FILE:
                self.files += 1
                self.bytes += row.stat.size
            yield row


class Stepper:
    """Step 2 for one scan: the queue becomes rows, files hashed by worker threads or processes."""

    def __init__(self, journal: ScanJournal, root_path: bytes, sync: SyncConfig, report: ScanReport,
                 progress: Progress, pool: ThreadPoolExecutor, procs: HashProcesses | None,
                 stop: threading.Event, *, gate: VolumeGate | None = None,
                 streamed: CountedRows | None = None) -> None:  # fmt: skip
        self.journal, self.root_path, self.sync = journal, root_path, sync
        self.report, self.progress, self.pool, self.procs, self.stop = report, progress, pool, procs, stop
        self.root_fs_type = fs.fs_type(root_path)
        self.granularity = granularity_ns(self.root_fs_type)
        self.gate = gate or VolumeGate()
        self.batch = Batch()
        # A first index's rows straight from its walk (walk.StreamedWalk), not from the queue
        # table: nothing to match, park or write early, and no queue rows to delete.
        self.streamed = streamed
        self.rows_in_batch = 0
        self.last_commit = time.monotonic()
        self.hash_matched: set[int] = set()
        self.any_gone = journal.any_gone()
        # Inode-matched renames of this scan: source entry id -> the path it moves to.
        self.rename_sources: dict[int, bytes] = {}
        self.moved: set[int] = set()  # sources whose rename is written
        self.parked: set[int] = set()  # sources moved aside to break a cycle (mv a t; mv b a; mv t b)
        self.in_progress: set[bytes] = set()
        self.done_early: set[bytes] = set()  # rows written ahead of path order (see _first)
        self.last_in_order = b""
        # New folders whose row was not written: what the walk found below them waits too.
        self.unwritten_folders: set[bytes] = set()
        # New folders by path, until each of their children is written (see _count_child).
        self.listings: dict[bytes, _Listing] = {}

    def commit(self) -> None:
        if self.streamed is not None:
            # The totals of a first index grow until its walk ends: the progress bar and
            # `status` show what was found so far.
            self.batch.found = (self.streamed.files, self.streamed.bytes)
            self.progress.total(*self.batch.found)
        if len(self.batch) or self.batch.counters or self.batch.errors:
            self.journal.commit(self.batch)
        self.batch = Batch()
        self.rows_in_batch = 0
        self.last_commit = time.monotonic()

    def run(self) -> None:
        rows: Iterable[QueueRow]
        if self.streamed is None:
            self.rename_sources.update(self.journal.rename_targets())
            rows = self.journal.queued()
        else:
            rows = self.streamed
        for row, pending in hash_in_order(rows, self._to_hash, self.pool, self.procs, self.stop.is_set):
            self._finish(row, pending)
        self.commit()
        if self.parked - self.moved:
            # A parked row whose rename was not written (it changed again meanwhile) goes back
            # to its path, or is deleted when that is taken: never left under a NUL name.
            self.journal.unpark()
        if self.stop.is_set():
            self.report.interrupted = True

    def _to_hash(self, row: QueueRow) -> tuple[bytes, Stat] | None:
        """A file whose content is to be read: new or changed, not a metadata refresh or a rename."""
        if row.stat.kind is Kind.FILE and row.reason != "metadata" and row.renamed_from is None:
            return join(self.root_path, row.path), row.stat
        return None

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
        early = self.journal.queued_row(path)
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
            if self.streamed is None and not self._ready(row, depth) and depth:
                return False
            self._write_row_now(row, future)
            return True
        finally:
            self.in_progress.discard(row.path)

    def _write_row_now(self, row: QueueRow, future: Pending | None) -> None:
        abs_path = join(self.root_path, row.path)
        if row.parent_id is None and parent_of(row.path) in self.unwritten_folders:
            # Its new folder's row was not written (it changed after the walk): neither is this
            # one, which would have no parent row; both are looked at again, as the folder is.
            self._unstable(row)
            write = None  # its hash, done (hash_in_order yields a row once it is), goes unused
        else:
            write = self._write_for(row, abs_path, future)
        if write is None and row.stat.kind is Kind.DIR and row.entry_id is None:
            self.unwritten_folders.add(row.path)
        self.rows_in_batch += 1
        if self.streamed is None:
            self.batch.queue_done.append(row.path)
        self._count_child(row, write)
        if row.listing is not None and _as_walked(row, write):
            listing = _Listing(row.listing, int.from_bytes(row.listing[LISTING_DIGEST_BYTES:], "little"))
            if listing.children == 0:
                self.batch.digests.append((row.path, listing.digest))
            else:
                self.listings[row.path] = listing
        if write is not None and write.quiet:
            self.batch.writes.append(write)
        elif write is not None:
            if row.entry_id is not None and row.reason in ("content", "replaced"):
                # The row this path had may be one name of a hard-linked file whose inode the
                # path no longer holds (`echo > b; rm b; echo > b`, b a hard link of a): written
                # through b first, out of sight of a's folder. Its other names are looked at
                # again, as for a name deleted (_delete_gone). Torture seed 1149277456.
                self.report.linked += self.journal.other_names(
                    [row.entry_id], unless_file=(write.stat.dev, write.stat.inode)
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
                self.report.linked += self.journal.stale_links(write.path, write.stat)
        # batch_size counts entries (len(batch) counts a write and its queue row).
        if self.rows_in_batch >= self.sync.batch_size or time.monotonic() - self.last_commit > COMMIT_EVERY_S:
            self.commit()

    def _count_child(self, row: QueueRow, write: Write | None) -> None:
        """Count a child of a new folder written as the walk found it; one written otherwise
        (changed since, racily clean, unreadable, renamed, not written) leaves the folder without
        a digest, and the next sync compares its children row by row.

        A digest stored in the index must describe children rows that are there as compared
        (ScanJournal.store_digests): the walk's digest of a new folder does once every child
        it counted has its row with the very stat it listed. Nothing else is below a folder this
        scan created: one walked twice (two scopes below it) carries no listing (walk.py,
        `WalkState.listed`), and the commit stores a digest only where the folder's child rows
        number what it counts (ScanJournal.commit).
        """
        parent = parent_of(row.path)
        listing = self.listings.get(parent)
        if listing is None:
            return
        if not _as_walked(row, write):
            del self.listings[parent]
            return
        listing.written += 1
        if listing.written == listing.children:
            del self.listings[parent]
            self.batch.digests.append((parent, listing.digest))

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
                old_path = self.journal.path_of(row.renamed_from)
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
            self._unstable(row)
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
                old = self.journal.entry(row.path)
                if old is not None and old.id == entry_id and old.blake3 is None and old.stat == st:
                    return None  # still unreadable, nothing else moved: no new feed entry per pass
            return Write(op, row.path, st, entry_id, row.parent_id, blake3=None)

    def _unstable(self, row: QueueRow) -> None:
        self.report.unstable.append(row.path)
        if row.renamed_from is not None:
            # Matching took the source off the gone list; its row stays where it was until
            # both ends are looked at again, together (the daemon adds them in one round).
            self.report.unstable.append(self.journal.path_of(row.renamed_from))

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
        # A file on a volume below the root is stamped by that volume's filesystem (a vfat
        # USB stick keeps mtimes in 2 s steps inside an ext4 root).
        granularity = (
            granularity_ns(self.gate.fs_type_of(row.path, self.root_fs_type)) if self.gate.online else self.granularity
        )
        racy = is_racily_clean(st.mtime_ns, result.read_started_ns, granularity)
        common = {"blake3": result.digest, "racy": racy, "scheme": HASH_SCHEME, "xattrs": result.xattrs}
        if row.reason == "content" and row.entry_id is not None:
            held = self.journal.as_indexed(row.entry_id)
            old, corrupt = held if held is not None else (None, True)
            same_content = old is not None and old.blake3 == result.digest
            if (
                old is not None
                and same_content
                and not corrupt
                and (old.path, old.stat, old.xattrs, old.scheme) == (row.path, st, result.xattrs, HASH_SCHEME)
            ):
                # A racily clean row checked again (rules.classify) and found as indexed: nothing
                # changed, so nothing goes to the feed, whose `metadata` says that something did
                # (docs/feed.md); only the racy flag moves. A row `verify` marked corrupt is not
                # quiet: the write that clears the mark is in the feed, which is how the
                # catalogue hears of it.
                return Write(Op.METADATA, row.path, st, row.entry_id, row.parent_id, quiet=True, **common)  # type: ignore[arg-type]
            op = Op.METADATA if same_content else Op.MODIFIED
            return Write(op, row.path, st, row.entry_id, row.parent_id, **common)  # type: ignore[arg-type]
        # New here: the last resort of rename matching is a gone file with the same content.
        # (A first index has nothing gone: skip the query, one per file, when there is none.)
        match = None
        if self.any_gone:
            match = self.journal.gone_with_hash(result.digest, st.size, self.hash_matched)
        if match is not None:
            self.hash_matched.add(match[0])
            # The gone row takes this file's inode. If it was one name of a hard-linked file,
            # that file's other names may have been written through it before it went, out of
            # sight of their folders: they are looked at again, as for a name deleted
            # (_delete_gone). Torture seed 268295807: `ln b c; echo >> b; rm b; touch d` made
            # d "renamed from b" (both empty as indexed), and c kept b's old size for good.
            self.report.linked += self.journal.other_names([match[0]], unless_file=(st.dev, st.inode))
            return Write(Op.RENAMED, row.path, st, match[0], row.parent_id, old_path=match[1], **common)  # type: ignore[arg-type]
        return Write(Op.ADDED, row.path, st, None, row.parent_id, **common)  # type: ignore[arg-type]


def _as_walked(row: QueueRow, write: Write | None) -> bool:
    """Whether ``write`` adds the entry exactly as the walk listed it, in a row the next sync
    finds unchanged (a file with its hash, not racily clean)."""
    return (
        write is not None
        and write.op is Op.ADDED
        and write.entry_id is None
        and write.stat == row.stat
        and not write.racy
        and (write.stat.kind is not Kind.FILE or write.blake3 is not None)
    )
