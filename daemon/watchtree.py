"""The folders one inotify instance watches, as a tree of (parent's watch descriptor, name) in flat arrays.

inotify names a folder's events by its watch descriptor (wd) and the entry's name; the
watcher needs the folder's path. watchdog keeps two dicts of full paths and an object per
watch: ~340 bytes of Python per watched folder, 405 MiB for a share of 1,000,000 folders
(W1, docs/benchmarks.md). Here each wd is an index into three arrays (parent's wd, where the
name starts, its length) and the names sit in one bytearray: about 10 bytes per wd plus the
name. A path is rebuilt by walking up to the root (a few steps per event), and a folder moved
or renamed is one entry rewritten, whatever lies below it.

The kernel hands out wds in increasing order for the life of an inotify instance
(``idr_alloc_cyclic`` in fs/notify/inotify/inotify_user.c), so the arrays grow with every
folder ever watched by the instance, not only the ones watched now: ~10 bytes each, 10 MB
per million folders made and removed while the daemon ran. A new session starts from wd 1.

Pure bookkeeping: no system calls, no locking (the watch group holds its lock around every use).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

# parent[wd] for the root; 0 marks a wd not watched (the kernel's wds start at 1).
ROOT_PARENT = -1
_ABSENT = 0
# Names are compacted once this many bytes of replaced names accumulate and they are over
# half of the store.
_COMPACT_AFTER = 1 << 20


class WatchTree:
    """wd -> (parent wd, name), with the path of a wd rebuilt from its ancestors' names."""

    def __init__(self, top: bytes) -> None:
        self.top = top
        self._prefix = top.rstrip(b"/") + b"/"
        self._parent = array("i")
        self._start = array("I")
        self._length = array("B")  # NAME_MAX is 255 on Linux
        self._names = bytearray()
        self._garbage = 0
        self._marks: bytearray | None = None
        self.count = 0

    def __contains__(self, wd: int) -> bool:
        return 0 < wd < len(self._parent) and self._parent[wd] != _ABSENT

    def __len__(self) -> int:
        return self.count

    def wds(self) -> list[int]:
        parent = self._parent
        return [wd for wd in range(1, len(parent)) if parent[wd] != _ABSENT]

    def name(self, wd: int) -> bytes:
        start = self._start[wd]
        return bytes(self._names[start : start + self._length[wd]])

    def place(self, wd: int, parent: int, name: bytes) -> bool:
        """Record that ``wd`` is the folder ``name`` in the folder ``parent`` (ROOT_PARENT: the
        root). False, and nothing recorded, if ``wd`` is ``parent`` or above it: a folder met
        again below itself (a bind mount of an ancestor) would make a cycle with no path."""
        if wd >= len(self._parent):
            self._grow(wd)
        if self._parent[wd] == _ABSENT:
            self.count += 1
        elif self._above(wd, parent):
            return False
        elif self.name(wd) == name:
            self._parent[wd] = parent
            return True
        else:
            self._garbage += self._length[wd]
        self._parent[wd] = parent
        self._start[wd] = len(self._names)
        self._length[wd] = len(name)
        self._names += name
        if self._garbage > _COMPACT_AFTER and self._garbage * 2 > len(self._names):
            self._compact()
        return True

    def _above(self, wd: int, below: int) -> bool:
        """Is ``wd`` the folder ``below`` or one of its ancestors? (Only asked of a wd already
        placed: a new one is above nothing.)"""
        parent, steps = self._parent, 0
        while below > 0 and steps <= self.count:
            if below == wd:
                return True
            below = parent[below] if below < len(parent) else _ABSENT
            steps += 1
        return False

    def remove(self, wd: int) -> bool:
        """Forget ``wd``; False if it was not there."""
        if wd not in self:
            return False
        self._parent[wd] = _ABSENT
        self._garbage += self._length[wd]
        self.count -= 1
        return True

    def path(self, wd: int) -> bytes | None:
        """The folder's path, or None if it or a folder above it is no longer watched."""
        parent, start, length, names = self._parent, self._start, self._length, self._names
        if not 0 < wd < len(parent) or parent[wd] == _ABSENT:
            return None
        parts: list[bytearray] = []
        while (up := parent[wd]) != ROOT_PARENT:
            # An ancestor gone, or a cycle that only broken bookkeeping could make.
            if up == _ABSENT or len(parts) > self.count:
                return None
            first = start[wd]
            parts.append(names[first : first + length[wd]])
            wd = up
        if not parts:
            return self.top
        parts.reverse()
        return self._prefix + b"/".join(parts)

    def find(self, path: bytes) -> list[int]:
        """Every wd recorded at ``path`` (more than one only while a stale entry awaits its
        event): a scan of all names, for the rare callers (a folder moved out, a mount)."""
        if path == self.top:
            return [wd for wd in self.wds() if self._parent[wd] == ROOT_PARENT]
        if not path.startswith(self._prefix):
            return []
        name = path.rpartition(b"/")[2]
        size, names, start, length, parent = len(name), self._names, self._start, self._length, self._parent
        found = []
        for wd in range(1, len(parent)):
            same_name = parent[wd] != _ABSENT and length[wd] == size and names[start[wd] : start[wd] + size] == name
            if same_name and self.path(wd) == path:
                found.append(wd)
        return found

    def below(self, tops: Iterable[int]) -> list[int]:
        """``tops`` and every wd whose ancestors include one of them; one pass over all wds."""
        parent = self._parent
        # 0: not known yet, 1: below a top, 2: not below one (or its ancestors are gone).
        verdict = bytearray(len(parent))
        for wd in tops:
            if wd in self:
                verdict[wd] = 1
        found = []
        for wd in range(1, len(parent)):
            if parent[wd] == _ABSENT:
                continue
            chain, up = [], wd
            while not verdict[up]:
                chain.append(up)
                up = parent[up]
                if up <= 0 or len(chain) > self.count:  # the root's parent, a gone ancestor, a cycle
                    break
            answer = verdict[up] if up > 0 and verdict[up] else 2
            for step in chain:
                verdict[step] = answer
            if verdict[wd] == 1:
                found.append(wd)
        return found

    def start_marking(self) -> None:
        """Begin a pass that marks the wds it meets (``mark``); ``unmarked`` ends it."""
        self._marks = bytearray(len(self._parent))

    def mark(self, wd: int) -> None:
        marks = self._marks
        if marks is not None:
            if wd >= len(marks):
                marks.extend(bytes(wd + 1 - len(marks)))
            marks[wd] = 1

    def unmarked(self) -> list[int]:
        marks, self._marks = self._marks, None
        if marks is None:
            return []
        return [wd for wd in self.wds() if wd >= len(marks) or not marks[wd]]

    def _grow(self, wd: int) -> None:
        more = max(wd + 1, 2 * len(self._parent), 1024) - len(self._parent)
        self._parent.frombytes(bytes(more * self._parent.itemsize))
        self._start.frombytes(bytes(more * self._start.itemsize))
        self._length.frombytes(bytes(more))

    def _compact(self) -> None:
        names = bytearray()
        for wd in self.wds():
            start = self._start[wd]
            self._start[wd] = len(names)
            names += self._names[start : start + self._length[wd]]
        self._names, self._garbage = names, 0

    def __iter__(self) -> Iterator[int]:
        return iter(self.wds())
