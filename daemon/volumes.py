"""The volumes below a root: which filesystems are mounted inside it, and which of them are online.

A volume is a mount point below a root, as /proc/self/mountinfo lists it (`rules.mounts_below`):
a USB disk, an NFS share, a bind mount. At the start of every scan `check` reads the mount
table, probes each volume the table shows or the index records, decides with
`rules.volume_offline_reason`, records what it found (schema 7) and hands the scan a
`rules.VolumeGate`: the walk enters the online volumes and leaves the offline ones as indexed.
Before each batch of deletions `changed` says which online volumes are no longer what the scan
began with (unmounted meanwhile), so that nothing below them is deleted. Why:
docs/scanning.md, "Offline, not deleted".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field

from daemon import fs
from daemon.config import RootConfig
from daemon.filters import Excluder
from daemon.index import Index, RootRow, VolumeRow
from daemon.model import Kind, Mount, Stat, VolumeState, join, parent_of
from daemon.rules import VolumeGate, VolumeProbe, VolumeRecord, mounts_below, sample_matches, volume_offline_reason


@dataclass(frozen=True, slots=True)
class _Seen:
    """An online volume as the scan found it at its start: what must not change under it."""

    mount_id: int
    devno: str
    fs_root: bytes
    source: str
    dev: int
    inode: int
    fsid: str


@dataclass(slots=True)
class Volumes:
    """What `check` found: the gate for the walk, and what changed since the last look."""

    gate: VolumeGate = field(default_factory=VolumeGate)
    offline: dict[bytes, str] = field(default_factory=dict)  # every offline volume -> why
    online: list[bytes] = field(default_factory=list)
    came_online: list[bytes] = field(default_factory=list)  # recorded offline, online now
    went_offline: list[bytes] = field(default_factory=list)  # recorded online, offline now
    seen: dict[bytes, _Seen] = field(default_factory=dict)


def _table() -> tuple[list[Mount], str | None]:
    try:
        return fs.mounts(), None
    except OSError as e:
        return [], f"the mount table cannot be read ({fs.MOUNTINFO}: {e.strerror or e})"


def _lstat(path: bytes) -> Stat | None:
    try:
        return fs.lstat(path)
    except OSError:
        return None


def _probe(index: Index, root: RootRow, rel: bytes, mount: Mount | None, st: Stat | None,
           recorded: VolumeRow | None) -> VolumeProbe:  # fmt: skip
    path = join(root.path, rel)
    if mount is None or st is None:
        return VolumeProbe(None, st is not None, "", False, 0, 0)
    fsid = fs.fs_id(path)
    sampled = matching = 0
    empty = False
    if recorded is not None and recorded.state is not VolumeState.UNCONFIRMED:
        samples = index.volume_samples(root.id, rel)
        sampled = len(samples)
        if sampled:
            with contextlib.suppress(OSError):
                empty = st.kind is Kind.DIR and fs.is_empty_dir(path)
            if not (fsid and fsid == recorded.fsid and mount.fs_root == recorded.fs_root):
                matching = sum(sample_matches(s, _lstat(join(root.path, p))) for p, s in samples)
    return VolumeProbe(mount, True, fsid, empty, sampled, matching)


def _unmounted_folder(root: RootRow, rel: bytes, st: Stat | None) -> bool:
    """A folder on the same device as its parent: what a mount point is once unmounted."""
    parent = _lstat(join(root.path, parent_of(rel)))
    return st is not None and st.kind is Kind.DIR and parent is not None and parent.dev == st.dev


def check(index: Index, root: RootRow, config: RootConfig, excluded: Excluder) -> Volumes:
    """Decide every volume below the root, record the result, and return the scan's gate."""
    now = time.time()
    table, table_error = _table()
    real = os.fsencode(os.path.realpath(root.path))
    below = {rel: m for rel, m in mounts_below(real, table).items() if not excluded.any_component(rel)}
    recorded = {v.path: v for v in index.volumes(root.id)}
    if config.one_filesystem:
        # Other filesystems are not part of this root: not indexed, not watched, not volumes.
        if recorded:
            index.save_volumes(root.id, [], dropped=list(recorded))
        return Volumes(VolumeGate(left_out=frozenset(below)))
    found = Volumes()
    online: dict[bytes, tuple[int, int]] = {}
    fs_types: dict[bytes, str] = {}
    dropped = [p for p in recorded if excluded.any_component(p)]
    rows: list[VolumeRow] = []
    for rel in sorted(set(below) | set(recorded) - set(dropped)):
        mount, rec = below.get(rel), recorded.get(rel)
        st = _lstat(join(root.path, rel))
        if (
            rec is not None
            and rec.state is VolumeState.UNCONFIRMED
            and mount is None
            and not _unmounted_folder(root, rel, st)
        ):
            # From an index made before volumes were known: a mount point only if it is now a
            # plain folder of the filesystem around it (a btrfs subvolume keeps its own st_dev,
            # and one that is gone was deleted).
            dropped.append(rel)
            continue
        probe = _probe(index, root, rel, mount, st, rec)
        record = None if rec is None or rec.state is VolumeState.UNCONFIRMED else VolumeRecord(
            rec.fs_type, rec.fs_root, rec.fsid, rec.dev
        )  # fmt: skip
        reason = table_error if table_error is not None and rec is not None else volume_offline_reason(record, probe)
        if reason is None and mount is not None and st is not None:
            if rec is not None and rec.dev != st.dev:
                index.move_volume_dev(root.id, rel, rec.dev, st.dev)
            since = rec.changed_at if rec is not None and rec.state is VolumeState.ONLINE else now
            rows.append(VolumeRow(rel, VolumeState.ONLINE, None, mount.fs_type, mount.source, mount.fs_root,
                                  probe.fsid, st.dev, since))  # fmt: skip
            online[rel] = (st.dev, st.inode)
            fs_types[rel] = mount.fs_type
            found.online.append(rel)
            found.seen[rel] = _Seen(mount.mount_id, mount.devno, mount.fs_root, mount.source, st.dev, st.inode,
                                    probe.fsid)  # fmt: skip
            if rec is not None and rec.state is VolumeState.OFFLINE:
                found.came_online.append(rel)
        elif rec is not None:
            reason = reason or "not mounted"
            was_online = rec.state is not VolumeState.OFFLINE
            rows.append(dataclasses.replace(rec, state=VolumeState.OFFLINE, offline_reason=reason,
                                            fs_type=rec.fs_type or "unknown",
                                            changed_at=now if was_online else rec.changed_at))  # fmt: skip
            found.offline[rel] = reason
            if rec.state is VolumeState.ONLINE:
                found.went_offline.append(rel)
    changed = [r for r in rows if recorded.get(r.path) != r]
    if changed or dropped:
        index.save_volumes(root.id, changed, dropped)
    found.gate = VolumeGate(online=online, offline=frozenset(found.offline), fs_types=fs_types)
    return found


def changed(root: RootRow, volumes: Volumes) -> list[bytes]:
    """The volumes that were online when the scan began and are not the same mount now."""
    if not volumes.seen:
        return []
    table, table_error = _table()
    below = mounts_below(os.fsencode(os.path.realpath(root.path)), table)
    out = []
    for rel, seen in volumes.seen.items():
        m = below.get(rel)
        st = _lstat(join(root.path, rel))
        same = (
            table_error is None
            and m is not None
            and st is not None
            and (m.mount_id, m.devno, m.fs_root, m.source) == (seen.mount_id, seen.devno, seen.fs_root, seen.source)
            and (st.dev, st.inode) == (seen.dev, seen.inode)
            and fs.fs_id(join(root.path, rel)) == seen.fsid
        )
        if not same:
            out.append(rel)
    return out
