"""`treewatch dupes`: groups of files with the same content, from the index alone.

A group is a (size, blake3) pair held by more than one inode. Hard links (several names of
one dev+inode) are one copy: deleting one of them reclaims nothing. The space a group wastes
is ``size * (copies - 1)``; groups come largest waste first.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from daemon.model import join

if TYPE_CHECKING:  # imported by every CLI command (for DEFAULT_MIN_SIZE): no SQLite module here
    from daemon.index import Index

# Empty files are all "the same content" and waste nothing: skipped unless asked for.
DEFAULT_MIN_SIZE = 1


class Copy(NamedTuple):
    """One inode of a group, with every indexed name it has (more than one: hard links)."""

    dev: int
    inode: int
    paths: tuple[bytes, ...]  # absolute


class Group(NamedTuple):
    size: int
    blake3: bytes
    copies: tuple[Copy, ...]

    @property
    def wasted(self) -> int:
        return self.size * (len(self.copies) - 1)


@dataclass(slots=True)
class DupesReport:
    groups: list[Group] = field(default_factory=list)

    @property
    def reclaimable(self) -> int:
        return sum(g.wasted for g in self.groups)


def find(index: Index, min_size: int = DEFAULT_MIN_SIZE, scopes: Sequence[tuple[int, bytes]] = ()) -> DupesReport:
    """Duplicate groups in the whole index, or within each (root id, relative path) scope.

    With several scopes, each is searched on its own (a file in one and its copy in another
    are not reported): `dupes PATH` answers "what is duplicated inside PATH".
    """
    with _no_gc():
        return _find(index, min_size, scopes)


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: grouping builds ~10 containers per duplicate and
    creates no cycles, and on a 1M-entry index the collector's passes over them took 40% of
    the time (docs/benchmarks.md, "dupes")."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _find(index: Index, min_size: int, scopes: Sequence[tuple[int, bytes]]) -> DupesReport:
    from daemon.toolstore import ToolStore  # with SQLite: not at import (see above)

    report = DupesReport()
    tools = ToolStore(index)
    chosen: Sequence[tuple[int | None, bytes]] = scopes or [(None, b"")]
    for root_id, path in chosen:
        # (size, blake3) -> (dev, inode) -> names
        groups: dict[tuple[int, bytes], dict[tuple[int, int], list[bytes]]] = {}
        for size, digest, root, rel, dev, inode in tools.dupe_groups(min_size, root_id, path):
            groups.setdefault((size, digest), {}).setdefault((dev, inode), []).append(join(root, rel))
        for (size, digest), inodes in groups.items():
            if len(inodes) > 1:  # names of one inode only: hard links, nothing to reclaim
                copies = sorted(
                    (Copy(dev, ino, tuple(sorted(n))) for (dev, ino), n in inodes.items()), key=lambda c: c.paths
                )
                report.groups.append(Group(size, digest, tuple(copies)))
    report.groups.sort(key=lambda g: (-g.wasted, -g.size, g.blake3))
    return report
