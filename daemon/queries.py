"""What the CLI's read commands show, assembled from the index as plain JSON-ready values."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from daemon.config import Config
from daemon.index import Index
from daemon.model import Entry, Kind, Op, RootState, VolumeState, join

# `ls` and `changes` use this module too: what only `status` needs (the daemon's lock, the
# rebuild's state, and with them the hasher) is imported by the functions that use it.


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def daemon_info(index: Index) -> dict[str, Any] | None:
    from daemon.fs import DaemonLock

    row = index.daemon_row()
    if row is None or not DaemonLock.held(index.path):
        return None
    pid, started_at, state, activity, _ = row
    return {"pid": pid, "state": state, "started_at": iso(started_at), "activity": activity}


def status(index: Index, config: Config) -> dict[str, Any]:
    import time

    from daemon.fs import pid_alive

    active = {s.root_id: s for s in index.active_scans() if pid_alive(s.pid)}
    roots = []
    observers = {os.fsencode(r.path): r.observer for r in config.roots}
    for root in index.roots():
        files, dirs, nbytes = index.totals(root.id)
        state = root.state
        if state is not RootState.OFFLINE and root.id in active:
            state = RootState.SCANNING
        scan = active.get(root.id)
        roots.append(
            {
                "path": os.fsdecode(root.path),
                "state": state.value,
                "offline_reason": root.offline_reason,
                "observer": root.observer or observers.get(root.path),
                "files": files,
                "dirs": dirs,
                "bytes": nbytes,
                "last_full_sync": iso(root.last_full_sync),
                "pending": root.pending,
                # How long the oldest pending path has waited, and the oldest few: a round that
                # is late shows here (the daemon's guard also logs and scans it).
                "oldest_pending_s": None
                if not root.pending or root.pending_since is None
                else round(max(0.0, time.time() - root.pending_since), 3),
                "pending_paths": json.loads(root.pending_paths) if root.pending and root.pending_paths else [],
                "errors": [{"path": os.fsdecode(join(root.path, p)), "error": e} for p, e in index.errors(root.id)],
                "overflows": root.overflows,
                "corrupt": index.corrupt_count(root.id),  # marked by `verify` (issue 6)
                "volumes": volumes(index, root.id, root.path),
                "scan": None
                if scan is None
                else {
                    "kind": scan.kind,
                    "step": scan.state,
                    "files_done": scan.done_files,
                    "files_queued": scan.queued_files,
                    "bytes_done": scan.done_bytes,
                    "bytes_queued": scan.queued_bytes,
                    "started_at": iso(scan.started_at),
                },
            }
        )
    c = index.counters()
    epoch, oldest_seq, seq = index.feed_state()
    feed = {"epoch": epoch, "oldest_seq": oldest_seq, "seq": seq}
    return {
        "daemon": daemon_info(index),
        "roots": roots,
        "counters": {
            "files_hashed": c["files_hashed"],
            "bytes_hashed": c["bytes_hashed"],
            "scans": {k: c[f"scans_{k}"] for k in ("full", "subtree", "folder", "file")},
            "events": c.get("events", 0),
            "escalations": c.get("escalations", 0),
        },
        "rebuild": _rebuild(index),
        "seq": feed["seq"],
        "feed": feed,
        "replicate": _replication(index, epoch, seq),
    }


def volumes(index: Index, root_id: int, root_path: bytes) -> list[dict[str, Any]]:
    """The filesystems mounted below a root (docs/scanning.md, "Offline, not deleted"); one that
    an upgrade found and no scan has looked at yet is not shown."""
    return [
        {
            "path": os.fsdecode(join(root_path, v.path)),
            "state": v.state.value,
            "offline_reason": v.offline_reason,
            "fs_type": v.fs_type,
            "source": v.source,
            "entries": index.count_below(root_id, v.path),
            "since": iso(v.changed_at),
        }
        for v in index.volumes(root_id)
        if v.state is not VolumeState.UNCONFIRMED
    ]


def _replication(index: Index, epoch: str, seq: int) -> dict[str, Any] | None:
    """Where the daemon's replication to the fleet catalogue stands; None when it does not replicate.
    The lag is what the catalogue has not taken: all of the feed when it holds another epoch."""
    r = index.replication()
    if r is None:
        return None
    held = r.applied_seq if r.epoch == epoch and r.applied_seq is not None else 0
    return {"url": r.url, "box": r.box, "applied_seq": r.applied_seq, "lag": max(0, seq - held),
            "last_ok": iso(r.last_ok), "error": r.error}  # fmt: skip


def _rebuild(index: Index) -> dict[str, Any] | None:
    """What `rebuild` (or the daemon after an upgrade) has left to do; None when nothing."""
    from daemon.rebuild import rebuild_status

    r = rebuild_status(index)
    if not r.pending_files and r.started_at is None:
        return None
    return {"pending_files": r.pending_files, "pending_bytes": r.pending_bytes, "done_files": r.done_files,
            "done_bytes": r.done_bytes, "started_at": iso(r.started_at)}  # fmt: skip


def entry_json(root: bytes, e: Entry) -> dict[str, Any]:
    s = e.stat
    return {
        "path": os.fsdecode(join(root, e.path)),
        "kind": s.kind.value,
        "size": s.size,
        "mtime_ns": s.mtime_ns,
        "ctime_ns": s.ctime_ns,
        "inode": s.inode,
        "dev": s.dev,
        "mode": s.mode,
        "uid": s.uid,
        "gid": s.gid,
        "nlink": s.nlink,
        "blake3": e.blake3.hex() if e.blake3 is not None else None,
        "target": os.fsdecode(e.target) if e.target is not None else None,
        "xattrs": json.loads(e.xattrs) if e.xattrs else {},
        "id": e.id,
        "seq": e.seq,
    }


def listing(index: Index, paths: Sequence[tuple[bytes, bytes]]) -> Iterator[dict[str, Any]]:
    """Entries under each (root, relative path), in path order."""
    for root_path, rel in paths:
        root = index.root(root_path, create=False)
        if root is None:
            continue
        corrupt = index.corrupt_ids(root.id)  # marked by `verify` (issue 6)
        for entry in index.entries_under(root.id, rel):
            yield {**entry_json(root_path, entry), "corrupt": entry.id in corrupt}


def changes(index: Index, since: int) -> Iterator[dict[str, Any]]:
    for row in index.changes_since(since):
        yield change_json(row)


def change_json(row: tuple[int, Op, Kind, bytes, bytes | None, bytes]) -> dict[str, Any]:
    """One row of `Index.changes_since` as `changes --json` prints it."""
    seq, op, kind, root, old_path, path = row
    return {
        "seq": seq,
        "op": op.value,
        "kind": kind.value,
        "path": os.fsdecode(join(root, path)),
        "old_path": os.fsdecode(join(root, old_path)) if old_path is not None else None,
    }
