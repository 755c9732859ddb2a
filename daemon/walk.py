"""Step 1 of a scan: walk the scope on disk, compare each entry with the index, queue what differs.

Memory holds one folder's listing and its index rows at a time, plus the folders still to
visit; what differs goes to the scan's queue table in the database, not into a list.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat as stat_mod
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import blake3

from daemon import fs
from daemon.filters import Excluder
from daemon.model import (
    LISTING_DIGEST_BYTES,
    Entry,
    EntryRow,
    FolderState,
    Kind,
    QueueRow,
    ScanScope,
    Stat,
    entry_of,
    join,
    parent_of,
)
from daemon.rules import HASH_SCHEME, Change, VolumeGate, classify, row_unchanged


class WalkJournal(Protocol):
    """All the walk asks of the index, and where it hands what it found (journal.ScanJournal).

    The walk reads the rows of one root and never writes them: saving is the caller's job, as
    Syncthing's walker sees the database only through its CurrentFiler.
    """

    def entry(self, path: bytes) -> Entry | None: ...
    def id_of(self, path: bytes) -> int | None: ...
    def folder_state(self, path: bytes) -> FolderState | None: ...
    def children_rows(self, parent_id: int) -> dict[bytes, EntryRow]: ...
    def queue(self, rows: Iterable[QueueRow]) -> None: ...
    def mark_gone(self, paths: Iterable[bytes]) -> None: ...
    def store_digests(self, digests: Iterable[tuple[bytes, int, int]]) -> None: ...


class FolderListers(Protocol):
    """Processes that go below known folders whose listing is unchanged (daemon.listers)."""

    @property
    def pending(self) -> bool: ...
    def submit(self, rel: bytes, st: Stat) -> None: ...
    def answers(self, stopping: Callable[[], bool]) -> tuple[int, list[tuple[bytes, Stat]]]: ...


@dataclass(slots=True)
class WalkState:
    """What one walk found, handed to its journal in chunks."""

    journal: WalkJournal
    flush_every: int
    queued: list[QueueRow] = field(default_factory=list)
    gone: list[bytes] = field(default_factory=list)
    errors: dict[bytes, str] = field(default_factory=dict)
    digests: list[tuple[bytes, int, int]] = field(default_factory=list)  # see ScanJournal.store_digests
    refreshed: set[bytes] = field(default_factory=set)  # folders whose own row this walk compared
    # New folders listed so far, when one scan walks several scopes: two scopes below the same
    # new folder walk it twice (from the highest unknown ancestor), and the second listing can
    # differ from the first, whose children are queued too. Such a folder keeps no digest.
    # None for one scope, which lists each folder once (torture seed 20261202, 600 s).
    listed: set[bytes] | None = None
    gate: VolumeGate = field(default_factory=VolumeGate)  # the volumes below the root (volumes.check)
    seen: int = 0

    def queue(self, row: QueueRow) -> None:
        self.queued.append(row)
        if len(self.queued) >= self.flush_every:
            self.flush()

    def mark_gone(self, rel: bytes) -> None:
        self.gone.append(rel)
        if len(self.gone) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.queued:
            self.journal.queue(self.queued)
            self.queued = []
        if self.gone:
            self.journal.mark_gone(self.gone)
            self.gone = []
        if self.digests:
            self.journal.store_digests(self.digests)
            self.digests = []


# Stored after the digest (LISTINGLISTING_DIGEST_BYTES): how many children the folder had once excludes
# applied, so a skipped folder still counts what it holds without matching each child against the globs.


# A folder the walk is still to list: its path, whether it has a row, its stat from its parent's
# listing, whether to go below it, and a new folder's own queue row (queued when it is listed).
_Folder = tuple[bytes, bool, "Stat | None", bool, "QueueRow | None"]


def listing_digest(seed: bytes, children: Sequence[tuple[bytes, os.stat_result]]) -> bytes:
    """BLAKE3 of a folder's listing: every name with every lstat field the index compares.

    Equal to the digest stored with the folder (and no child row written since, which clears
    it) means every child would compare unchanged: a sync then skips the folder's index rows.
    A digest that differs only costs the full comparison, so the listing's order (the
    filesystem's) is used as it comes, and a collision needs two 128-bit BLAKE3 outputs equal.
    """
    unsigned: list[int] = []
    signed: list[int] = []
    for _name, st in children:
        # st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size: the stat tuple's first seven
        # items (os.stat_result's documented order), one slice in C where reading the seven
        # attributes cost ~100 of the digest's ~400 ns per entry.
        unsigned += st[:7]
        signed += (st.st_mtime_ns, st.st_ctime_ns)  # before 1970 is negative
    hasher = blake3.blake3(seed)
    hasher.update(b"\0".join([name for name, _st in children]))
    hasher.update(array("Q", unsigned).tobytes())
    hasher.update(array("q", signed).tobytes())
    return hasher.digest(LISTING_DIGEST_BYTES)


def digest_seed(excluded: Excluder) -> bytes:
    """What else decides a folder's comparison: the excludes (the digest covers excluded
    children too) and the hash scheme (an upgrade compares every folder once more)."""
    # -2: the fields in the stat tuple's order (-1 read them one by one, in another order).
    return b"\0".join([b"treewatch-listing-2", str(HASH_SCHEME).encode(), *(os.fsencode(p) for p in excluded.patterns)])


def _reason(entry: Entry | None, st: Stat) -> tuple[str | None, bool]:
    """(queue reason or None, whether the old row and what was below it are gone)."""
    if entry is None:
        return "new", False
    change = classify(entry, st)
    if change is Change.NONE:
        return None, False
    if change is Change.REPLACED:
        return "replaced", True
    return ("content" if change is Change.CONTENT else "metadata"), False


def _error_text(e: OSError) -> str:
    return f"{errno.errorcode.get(e.errno or 0, 'error')}: {e.strerror or e}"


# A volume found at a mount point is not the one the scan's check found there (unmounted or
# replaced since): nothing below it is compared, and the next scan decides it again.
VOLUME_CHANGED = "the filesystem mounted here changed during the scan; looked at again by the next scan"


def _volume_child(state: WalkState, child: bytes, raw: os.stat_result, indexed: dict[bytes, EntryRow]) -> bool:
    """Whether the walk compares (and enters) ``child``, a mount point below the root.

    An offline volume stays as indexed, its own row and all below it, and so does one that
    changed since the scan began: taken out of ``indexed``, they are not marked gone. A mount
    point left out (one_filesystem) stays in ``indexed``, and its rows go, as an excluded name's.
    """
    gate = state.gate
    if child in gate.left_out:
        return False
    if child in gate.offline:
        indexed.pop(child, None)
        return False
    if not gate.enters(child, raw.st_dev, raw.st_ino):
        indexed.pop(child, None)
        state.errors[child] = VOLUME_CHANGED
        return False
    return True


def _refresh_own_entry(state: WalkState, root_path: bytes, rel: bytes) -> None:
    """Compare a folder's own row (times, mode) without listing it.

    Creating, deleting or renaming a child moves its folder's mtime; the watcher reports the
    child, not the folder (watchdog's synthetic parent events are dropped in events.py, since
    listing a folder of 100k files for every write in it would cost work proportional to the
    folder, not to the change).
    """
    entry = state.journal.entry(rel)
    if entry is None:
        return
    try:
        st = fs.lstat(join(root_path, rel))
    except OSError:
        return  # gone or unreadable: its own scope (or the parent's) deals with it
    reason, old_gone = _reason(entry, st)
    if reason == "metadata" and not old_gone:
        parent = parent_of(rel)
        parent_id = state.journal.id_of(parent) if parent else 0
        state.queue(QueueRow(rel, reason, entry.id, parent_id, st, None))


def walk_scope(
    state: WalkState,
    root_path: bytes,
    scope: ScanScope,
    excluded: Excluder,
    stopping: Callable[[], bool],
    listers: FolderListers | None = None,
) -> None:
    """Walk one scope, queueing new and changed entries and marking vanished ones gone.

    With ``listers``, each known folder other than the root is handed to them; the walk reads
    only what they hand back (a listing that differs, an error) and what is new."""
    journal = state.journal
    rel = scope.subtree
    if rel:
        # An event below a folder the index does not know yet (its own creation event may
        # still be pending): walk from the highest unknown ancestor, so parents come first.
        # Known as a folder: a row that is a symlink or a file (`mv d away; ln -s x d`, then
        # back) would take the children of the folder now on disk, rows below a symlink that
        # no later walk descends to, and that collide with the folder's own children later.
        parent = parent_of(rel)
        while parent and journal.folder_state(parent) is None:
            rel, parent = parent, parent_of(parent)
            scope = ScanScope(scope.root, rel, True)
        if state.gate.frozen(rel) or state.gate.outside(rel):
            return  # in an offline volume (left as indexed) or on a filesystem left out
        # lstat(root/a/b) follows a symlink at a: a scope below a folder that is now a symlink
        # (or a file) would index what lies outside the root. Start at that component instead.
        parts = rel.split(b"/")
        for i in range(1, len(parts)):
            ancestor = b"/".join(parts[:i])
            try:
                is_dir = stat_mod.S_ISDIR(os.lstat(join(root_path, ancestor)).st_mode)
            except OSError:
                is_dir = False
            if not is_dir:
                rel, parent = ancestor, parent_of(ancestor)
                scope = ScanScope(scope.root, rel, True)
                break
        volume = state.gate.volume_of(rel)
        if volume is not None and volume != rel:
            # A scope inside a volume: it must still be the volume the scan's check found, or
            # an unmounted disk's empty mount point would say that all below it is gone (and
            # the mount point's own row, refreshed next, would take the bare folder's stat).
            try:
                top = os.lstat(join(root_path, volume))
                same = state.gate.enters(volume, top.st_dev, top.st_ino)
            except OSError:
                same = False
            if not same:
                state.errors[volume] = VOLUME_CHANGED
                return
        if parent and parent not in state.refreshed:
            # Once per walk: a burst of 100 new files in one folder is 100 scopes of one scan.
            state.refreshed.add(parent)
            _refresh_own_entry(state, root_path, parent)
        if excluded.any_component(rel):
            # Excluded: not indexed, but made or removed it moved its folder's mtime, refreshed
            # above (events.map_event reports such a name for that; seed 268295807, `rm -r
            # vol/lost+found`, left the volume's own row with its old mtime).
            return
        entry = journal.entry(rel)
        try:
            st = fs.lstat(join(root_path, rel))
        except (FileNotFoundError, NotADirectoryError):
            # Whatever is indexed at or below a path that is not on disk is gone, whether or not
            # the path itself has a row: a folder's row may already be deleted while a row below
            # it survived (torture seed 777001; scan._delete_gone now prevents that, and this
            # still clears any such row the folder's own round meets).
            state.mark_gone(rel)
            return
        except OSError as e:
            state.errors[rel] = _error_text(e)
            return
        if rel in state.gate.points and not state.gate.enters(rel, st.dev, st.inode):
            state.errors[rel] = VOLUME_CHANGED
            return
        state.seen += 1
        reason, old_gone = _reason(entry, st)
        if old_gone:
            state.mark_gone(rel)
        known = entry is not None and not old_gone
        row = None
        if reason is not None:
            parent_id = journal.id_of(parent) if parent else 0
            row = QueueRow(rel, reason, entry.id if entry else None, parent_id, st, None)
            if known or st.kind is not Kind.DIR:
                state.queue(row)
                row = None
        if st.kind is not Kind.DIR:
            return
        stack: list[_Folder] = [(rel, known, st, scope.recursive or not known, row)]
    else:
        stack = [(b"", True, None, scope.recursive, None)]

    seed = digest_seed(excluded)
    points = state.gate.points  # mount points below the root: most walks have none
    handed_back: set[bytes] = set()  # by the listers: read here, never handed to them again
    while stack or (listers is not None and listers.pending):
        if stopping():
            return
        if not stack:
            assert listers is not None
            seen, back = listers.answers(stopping)
            state.seen += seen
            for back_rel, back_stat in back:
                handed_back.add(back_rel)
                stack.append((back_rel, True, back_stat, True, None))
            continue
        # known: the folder has a row (b"" is the root, whose children have parent_id 0).
        # own_row: a new folder's own queue row, queued here with its listing, before its children.
        dir_rel, known, dir_stat, recursive, own_row = stack.pop()
        handed = listers is not None and known and recursive and own_row is None and dir_stat is not None
        if handed and dir_rel and dir_rel not in handed_back:
            assert listers is not None and dir_stat is not None
            listers.submit(dir_rel, dir_stat)
            continue
        folder = journal.folder_state(dir_rel) if known and dir_rel else None
        dir_id = 0 if not dir_rel else folder.id if folder is not None else None
        dir_abs = join(root_path, dir_rel)
        try:
            listing = fs.list_dir(dir_abs, dir_stat)
        except (FileNotFoundError, NotADirectoryError, fs.Moved):
            # It went away (or was swapped) after its parent was listed: the next scan of the
            # parent sees what is there now; nothing below it is deleted on this evidence.
            state.errors[dir_rel] = "changed while being walked"
            if own_row is not None:
                state.queue(own_row)
            continue
        except OSError as e:
            # Unreadable is not empty: what the index holds below it stays.
            state.errors[dir_rel] = _error_text(e)
            if own_row is not None:
                state.queue(own_row)
            continue
        digest = None
        new_folder = dir_id is None
        if (folder is not None or new_folder) and not listing.vanished:
            digest = listing_digest(seed, listing.children)
            if folder is not None and folder.digest is not None and folder.digest[:LISTING_DIGEST_BYTES] == digest:
                # The common case of a sync: nothing in this folder changed. Only its
                # subfolders are looked at (their own children may have).
                state.seen += int.from_bytes(folder.digest[LISTING_DIGEST_BYTES:], "little")
                if recursive:
                    for name, raw in listing.children:
                        if stat_mod.S_ISDIR(raw.st_mode):
                            child = dir_rel + b"/" + name if dir_rel else name
                            if excluded(child) or (child in points and not _volume_child(state, child, raw, {})):
                                continue
                            stack.append((child, True, Stat.of(raw), True, None))
                continue
        indexed = journal.children_rows(dir_id) if dir_id is not None else {}
        all_unchanged = not listing.vanished
        compared = 0
        # A new folder's children wait for its own row, which waits for their count (its digest).
        rows_here: list[QueueRow] = []
        for name, raw in sorted(listing.children, key=_by_name):
            child = dir_rel + b"/" + name if dir_rel else name
            if excluded(child):
                continue
            if child in points:
                if new_folder:
                    digest = None  # a new folder holding a volume is compared in full next time
                if not _volume_child(state, child, raw, indexed):
                    continue
            compared += 1
            st = Stat.of(raw)
            indexed_row = indexed.pop(child, None)
            if indexed_row is not None and row_unchanged(indexed_row, st):
                # Decided without building the Entry (see row_unchanged).
                if recursive and st.kind is Kind.DIR:
                    stack.append((child, True, st, True, None))
                continue
            all_unchanged = False
            entry = None if indexed_row is None else entry_of(indexed_row)
            reason, old_gone = _reason(entry, st)
            if old_gone:
                state.mark_gone(child)
            known_child = entry is not None and not old_gone
            row = None if reason is None else QueueRow(child, reason, entry.id if entry else None, dir_id, st, None)
            if st.kind is Kind.DIR and not known_child:
                stack.append((child, False, st, True, row))  # a new one is walked whole, its row queued then
                continue
            if row is not None:
                if own_row is None:
                    state.queue(row)
                else:
                    rows_here.append(row)
            if st.kind is Kind.DIR and recursive:
                stack.append((child, True, st, True, None))
        state.seen += compared
        for child in indexed:
            all_unchanged = False
            state.mark_gone(child)
        if all_unchanged and folder is not None and digest is not None:
            state.digests.append((digest + compared.to_bytes(4, "little"), folder.id, folder.generation))
            if len(state.digests) >= state.flush_every:
                state.flush()
        if own_row is not None:
            # Every child is queued as new: the digest holds once step 2 has written them all
            # as found here (Stepper._count_child). Without it, the first sync after a first
            # index compared every row: 3.9 s against 1.5 s for the syncs after (200k entries).
            listed_before = False
            if state.listed is not None:
                listed_before = dir_rel in state.listed
                state.listed.add(dir_rel)
            if new_folder and digest is not None and not listed_before:
                own_row = dataclasses.replace(own_row, listing=digest + compared.to_bytes(4, "little"))
            state.queue(own_row)
            for row in rows_here:
                state.queue(row)


def _by_name(child: tuple[bytes, os.stat_result]) -> bytes:
    return child[0]


class _NothingIndexed:
    """The journal of a walk over a root with nothing indexed: nothing to read, no digest to
    store, nothing that can be gone; each chunk of rows goes to ``hand_on``."""

    def __init__(self, hand_on: Callable[[list[QueueRow]], None]) -> None:
        self.hand_on = hand_on

    def entry(self, path: bytes) -> Entry | None:
        return None

    def id_of(self, path: bytes) -> int | None:
        return None

    def folder_state(self, path: bytes) -> FolderState | None:
        return None

    def children_rows(self, parent_id: int) -> dict[bytes, EntryRow]:
        return {}

    def queue(self, rows: Iterable[QueueRow]) -> None:
        self.hand_on(list(rows))

    def mark_gone(self, paths: Iterable[bytes]) -> None:
        if paths:
            raise AssertionError(f"gone below a root with nothing indexed: {list(paths)[:3]!r}")

    def store_digests(self, digests: Iterable[tuple[bytes, int, int]]) -> None:
        if digests:
            raise AssertionError("a digest stored for a folder of a root with nothing indexed")


class StreamedWalk:
    """The walk of a first index, in a thread of its own, its rows handed straight to step 2.

    A root with nothing indexed has no renames to match and nothing to delete, so what the
    walk finds needs no queue table: writing 100k rows into it, reading them back in path order
    and deleting them as they were committed was a fifth of the scan thread's work in a first
    index of 100k small files. The walk's lstat and getdents calls release the GIL, so it runs
    beside step 2 rather than before it. Rows come in the walk's order, which puts a folder's
    row before its children's (walk_scope), and step 2 writes them in that order.
    """

    def __init__(self, state_of: Callable[[WalkJournal], WalkState], root_path: bytes, scope: ScanScope,
                 excluded: Excluder, stopping: Callable[[], bool], *, chunks: int = 8) -> None:  # fmt: skip
        import queue  # here: only a first index takes this path
        import threading

        self._chunks: queue.Queue[list[QueueRow] | BaseException | None] = queue.Queue(chunks)
        self._abandoned = threading.Event()
        self._stopping = stopping
        self.state = state_of(_NothingIndexed(self._put))
        self._thread = threading.Thread(target=self._walk, args=(root_path, scope, excluded), name="walk", daemon=True)
        self._thread.start()

    def _put(self, item: list[QueueRow] | BaseException | None) -> None:
        import queue

        while not self._abandoned.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _walk(self, root_path: bytes, scope: ScanScope, excluded: Excluder) -> None:
        try:
            walk_scope(self.state, root_path, scope, excluded, lambda: self._stopping() or self._abandoned.is_set())
            self.state.flush()
            self._put(None)
        except BaseException as e:  # handed to the scan's thread, which raises it
            self._put(e)

    def rows(self) -> Iterator[QueueRow]:
        """The rows in the walk's order, until the walk ends; its exception is raised here."""
        while True:
            item = self._chunks.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        """Stop the walk if it is still going (step 2 ended early) and wait for its thread."""
        self._abandoned.set()
        self._thread.join()
