"""Pure event aggregation: a tree of pending paths -> the fewest ScanScopes once they are due.

No I/O and no clock: the caller passes ``now`` (monotonic seconds) to every call, so each rule is
tested with a fake clock. Modelled on Syncthing's lib/watchaggregator; see docs/aggregation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from daemon.config import WatchConfig
from daemon.model import ScanScope, is_within, parent_of

# Deletions wait longer than other changes so that, when a file is renamed and the watcher reports
# it as a delete plus a create, the create is seen in the same round and the scanner can keep the
# entry's identity. Syncthing releases removes last for the same reason (watchaggregator isOld:
# "Deletes should in general be scanned last, therefore they are delayed").
DELETE_HOLD_FACTOR = 1.5
# When the next round is due, it waits for every path that comes due within this fraction of
# debounce_s after the first, and takes them together. The events of a burst (100 photos copied
# into a folder) reach the loop a few milliseconds apart, so their quiet windows close a few
# milliseconds apart too: without this, each wake-up took the few that had just come due and
# one burst became two to four back-to-back scans, each paying a scan's fixed costs (P3).
# Waiting for the last window rather than taking the rest early keeps the rule that nothing is
# scanned before it has been quiet for debounce_s; the first path waits at most this fraction
# longer. Syncthing gets the same effect from its timer: what came due between two ticks goes
# out as one batch.
COALESCE_FRACTION = 0.1


@dataclass(slots=True)
class _Pending:
    """What is pending at one path: merged times of every event it holds."""

    first: float  # earliest event absorbed: bounds the wait by max_delay_s
    last: float  # latest event absorbed: the quiet window starts here
    recursive: bool
    deleted: bool  # the latest event was a deletion (merged: all were): held longer, emitted last
    at_once: bool = False  # a requested full sync: due immediately


class Aggregator:
    """Pending events of one root, debounced and escalated as they arrive."""

    def __init__(self, root: bytes, config: WatchConfig) -> None:
        self.root = root
        self._cfg = config
        self._events: dict[bytes, _Pending] = {}
        # Folder -> its children that are pending or have something pending below them. Nothing is
        # ever pending below a recursive pending path: it absorbs what arrives there.
        self._kids: dict[bytes, set[bytes]] = {}
        # The two ends of a move inside the root, by the pending path that holds each end: both
        # must reach the scanner in the same round.
        self._links: dict[bytes, set[bytes]] = {}
        self.escalations = 0

    @property
    def pending(self) -> int:
        """Pending paths (an escalated folder counts once), for `status`."""
        return len(self._events)

    def add(self, rel: bytes, now: float, *, is_dir: bool = False, deleted: bool = False) -> None:
        """One event for a root-relative path (b"" is the root). ``is_dir``: scan it recursively."""
        self._add(rel, now, recursive=is_dir, deleted=deleted)

    def add_move(self, src: bytes | None, dest: bytes | None, now: float, *, is_dir: bool) -> None:
        """A move; None for the end outside the root. Both ends are emitted in the same round."""
        # A moved folder is recursive at both ends: everything indexed below src is gone or moved.
        if src is not None:
            self._add(src, now, recursive=is_dir, deleted=True)
        if dest is not None:
            self._add(dest, now, recursive=is_dir, deleted=False)
        if src is not None and dest is not None:
            # Holders are looked up after both adds: adding dest may have escalated src's folder.
            a, b = self._holder(src), self._holder(dest)
            if a != b:
                self._links.setdefault(a, set()).add(b)
                self._links.setdefault(b, set()).add(a)

    def rescan_root(self, now: float) -> None:
        """Overflow or lost watch: one full sync of the root, due at once, absorbing all else."""
        self._collapse(b"")
        ev = self._events[b""]
        ev.first, ev.last = min(ev.first, now), max(ev.last, now)
        ev.deleted, ev.at_once = False, True

    def rescan(self, rel: bytes, now: float) -> None:
        """One subtree synced whole, due at once: a filesystem mounted or unmounted at ``rel``."""
        if not rel:
            self.rescan_root(now)
            return
        self._add(rel, now, recursive=True, deleted=False)
        self._events[self._holder(rel)].at_once = True

    def next_due(self) -> float | None:
        """When to take the next round; None when nothing is pending.

        The earliest time a path is due, moved later to the last time another path comes due
        within ``COALESCE_FRACTION`` of the window after it: a burst is one round. due() returns
        something from the earliest of these times on; the caller waits for this one. It is
        never later than any pending path's `deadline`: the wait for the rest of a burst does not
        carry a path past the bound that max_delay_s promises.
        """
        # Linear scans: at most max_pending entries, and this runs once per loop wake-up.
        if not self._events:
            return None
        times = [self._due_at(ev) for ev in self._events.values()]
        slack_ends = min(times) + self._cfg.debounce_s * COALESCE_FRACTION
        horizon = min(slack_ends, *(self._deadline(ev) for ev in self._events.values()))
        # Not empty: a path is due no later than its deadline, so min(times) <= horizon.
        return max(t for t in times if t <= horizon)

    def deadline(self, first: float) -> float:
        """The latest a path first seen at ``first`` is emitted: the promise of max_delay_s
        (a held deletion may wait its own longer hold when max_delay_s is shorter)."""
        return first + max(self._cfg.max_delay_s, self._cfg.debounce_s * DELETE_HOLD_FACTOR)

    def oldest(self, limit: int) -> list[tuple[bytes, float]]:
        """The ``limit`` pending paths seen first, with the time each was first seen."""
        return sorted(((p, ev.first) for p, ev in self._events.items()), key=lambda pf: (pf[1], pf[0]))[:limit]

    def late(self, now: float, margin: float) -> list[tuple[bytes, float]]:
        """Pending paths past their deadline by more than ``margin`` at ``now``, oldest first,
        with the time each was first seen. Empty while the caller takes rounds when told."""
        return sorted(
            ((p, ev.first) for p, ev in self._events.items() if now > self._deadline(ev) + margin),
            key=lambda pf: (pf[1], pf[0]),
        )

    def expedite(self, paths: list[bytes]) -> None:
        """Makes these pending paths due at once: the daemon's guard against a round that should
        have been taken and was not. Whatever went wrong in the timing, they go in the next round."""
        for p in paths:
            ev = self._events.get(p)
            if ev is not None:
                ev.at_once = True

    def due(self, now: float) -> list[ScanScope]:
        """Removes what is due at ``now``; returns the fewest scopes covering it, deletions last."""
        chosen = {p for p, ev in self._events.items() if now >= self._due_at(ev)}
        if not chosen:
            return []
        # A rename reported as delete + create: the delete rides along once it is quiet.
        chosen |= {p for p, ev in self._events.items() if ev.deleted and now - ev.last >= self._cfg.debounce_s}
        frontier = list(chosen)
        while frontier:
            for q in self._pulled_by(frontier.pop()):
                if q not in chosen:
                    chosen.add(q)
                    frontier.append(q)
        emitted: dict[bytes, ScanScope] = {}
        # Shallowest first: a folder scope covers its children but not its grandchildren, so a
        # child is dropped only when its parent is itself emitted.
        for p in sorted(chosen, key=lambda p: p.count(b"/") + bool(p)):
            scope = self._scope(p)
            parent = emitted.get(parent_of(p)) if p else None
            if parent is None or not parent.covers(scope):
                emitted[p] = scope
        # Deletions last, as Syncthing dispatches removes after other changes.
        order = sorted(emitted, key=lambda p: (self._events[p].deleted, p))
        out = [emitted[p] for p in order]
        for p in chosen:
            del self._events[p]
            self._links.pop(p, None)  # its partners are in `chosen` too
        for p in chosen:
            self._prune(p)
        return out

    def _due_at(self, ev: _Pending) -> float:
        if ev.at_once:
            return ev.first
        hold = self._cfg.debounce_s * (DELETE_HOLD_FACTOR if ev.deleted else 1.0)
        return min(ev.last + hold, ev.first + self._cfg.max_delay_s)

    def _deadline(self, ev: _Pending) -> float:
        return ev.first if ev.at_once else self.deadline(ev.first)

    def _scope(self, rel: bytes) -> ScanScope:
        return ScanScope(self.root, rel, self._events[rel].recursive)

    def _pulled_by(self, rel: bytes) -> Iterator[bytes]:
        """Pending paths that must go out in the same round as ``rel``."""
        yield from self._links.get(rel, ())
        if self._events[rel].recursive:
            return  # nothing is pending below it, and only a recursive scope could cover it
        if rel and parent_of(rel) in self._events:
            # A pending folder scope covers this path: scan the folder now instead of twice.
            yield parent_of(rel)
        for kid in self._kids.get(rel, ()):
            ev = self._events.get(kid)
            if ev is not None and not ev.recursive:
                yield kid

    def _holder(self, rel: bytes) -> bytes:
        """The pending path that holds an event for ``rel``: its recursive ancestor, or itself."""
        ancestor = self._recursive_ancestor(rel)
        return rel if ancestor is None else ancestor  # not `or`: the root is b""

    def _recursive_ancestor(self, rel: bytes) -> bytes | None:
        prefixes = [b""] + [rel[:i] for i, c in enumerate(rel) if c == ord("/")] + ([rel] if rel else [])
        for prefix in prefixes:
            ev = self._events.get(prefix)
            if ev is not None and ev.recursive:
                return prefix
        return None

    def _add(self, rel: bytes, now: float, *, recursive: bool, deleted: bool) -> None:
        holder = self._recursive_ancestor(rel)
        if holder is not None:
            # Absorbed, counted once; it still pushes the quiet time of what absorbed it.
            held = self._events[holder]
            held.last = max(held.last, now)
            held.deleted = held.deleted and deleted
            return
        ev = self._events.get(rel)
        grown: list[bytes] = []
        if ev is None:
            self._events[rel] = _Pending(now, now, recursive, deleted)
            grown = self._register(rel)
        else:
            ev.last = max(ev.last, now)
            ev.deleted = deleted  # the path's latest state decides: deleted, or there again
            ev.recursive = recursive
        if recursive and rel in self._kids:
            self._collapse(rel)
        for folder in grown:  # deepest first, so a burst escalates the smallest folder first
            # The root is exempt, as in Syncthing: its escalation is a full sync, left to max_pending.
            if folder and len(self._kids.get(folder, ())) > self._cfg.max_paths_per_dir:
                self._collapse(folder)
                self.escalations += 1
        if len(self._events) > self._cfg.max_pending:
            self._collapse(b"")
            self.escalations += 1

    def _register(self, rel: bytes) -> list[bytes]:
        """Records ``rel`` in its ancestors' child sets; returns the folders that gained a child."""
        grown: list[bytes] = []
        child = rel
        while child:
            parent = parent_of(child)
            kids = self._kids.setdefault(parent, set())
            if child in kids:
                break
            kids.add(child)
            grown.append(parent)
            child = parent
        return grown

    def _prune(self, rel: bytes) -> None:
        """Unregisters ``rel`` and then its ancestors while nothing is pending at or below them."""
        while rel and rel not in self._events and rel not in self._kids:
            parent = parent_of(rel)
            siblings = self._kids.get(parent)
            if siblings is not None:
                siblings.discard(rel)
                if not siblings:
                    del self._kids[parent]
            rel = parent

    def _collapse(self, top: bytes) -> None:
        """Turns ``top`` into one recursive event holding everything below it; the rest is dropped."""
        ev = self._events.get(top)
        first, last, deleted = (ev.first, ev.last, ev.deleted) if ev is not None else (math.inf, -math.inf, True)
        stack = list(self._kids.pop(top, ()))
        while stack:
            rel = stack.pop()
            stack.extend(self._kids.pop(rel, ()))
            sub = self._events.pop(rel, None)
            if sub is not None:
                first, last, deleted = min(first, sub.first), max(last, sub.last), deleted and sub.deleted
                self._relink(rel, top)
        self._events[top] = _Pending(first, last, True, deleted, ev.at_once if ev is not None else False)

    def _relink(self, old: bytes, new: bytes) -> None:
        for peer in self._links.pop(old, set()):
            peers = self._links.get(peer)
            if peers is None:
                continue
            peers.discard(old)
            if not is_within(peer, new):  # peers inside `new` are absorbed with it
                peers.add(new)
                self._links.setdefault(new, set()).add(peer)
            elif not peers:
                del self._links[peer]
