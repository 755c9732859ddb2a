"""The daemon's scheduling: events into aggregators, due scopes into scans, the periodic syncs.

One worker task per root: scans of a root run one at a time (in a thread, with the root's own
database connection), while its watcher keeps feeding the aggregator, so events that arrive
during a scan wait for the next round instead of being lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from daemon import fs, logs, upkeep
from daemon.aggregate import Aggregator
from daemon.config import Config, RootConfig
from daemon.events import EventKind, WatchEvent
from daemon.index import AsyncIndex, DamagedError, Index, ReplicationRow, is_damage
from daemon.logs import MessageId
from daemon.model import Mount, Op, ScanKind, ScanReport, ScanScope, is_within, join
from daemon.mountwatch import MountWatcher
from daemon.rebuild import needs_rebuild, rebuild
from daemon.rules import HASH_SCHEME
from daemon.runtime import PENDING_PATHS_SHOWN, RootRuntime, mount_identity, read_mount_table
from daemon.scan import scan
from daemon.watch import RootWatcher

if TYPE_CHECKING:
    from daemon.replication import Replication

# How often an offline root is looked at again (its watches are gone with the mount).
OFFLINE_RECHECK_S = 30.0
# How often a watched root's own folder is checked to still be the one its watches sit on.
# An unmount that leaves the filesystem mounted elsewhere (a bind mount, a lazy umount of a
# busy disk) sends inotify nothing: the watches stay on the old inodes and the root would
# show "online" over an empty mount point forever (torture: bind-mounted tmpfs unmounted).
ROOT_CHECK_S = 5.0
# A scan that failed (database full, read-only, locked for a minute) is retried after this
# delay, doubled for each failure in a row up to the maximum; events keep being collected.
# It used to be retried after one quiet window, i.e. five full-root rescans a second with
# the tests' 0.2 s window (torture: database folder on a full tmpfs).
SCAN_RETRY_S = 1.0
SCAN_RETRY_MAX_S = 300.0
# Errors of one scan shown one by one in the log; the rest are counted in one line.
ERRORS_LOGGED = 10
# The stall guard (docs/aggregation.md, "Stalls"): a worker asleep while a pending path is past
# its deadline (Aggregator.deadline) by more than the margin has missed a round. Checked every
# GUARD_EVERY_S; the late paths are then scanned at once and the journal is told.
STALL_MARGIN_S = 1.0
GUARD_EVERY_S = 1.0
# A root's worker task that ends for any reason but shutdown is started again after this delay,
# doubled for each end in a row up to the maximum, with one full sync of its root.
WORKER_RESTART_S = 1.0
WORKER_RESTART_MAX_S = 60.0


class Scheduler:
    def __init__(self, config: Config, stop: threading.Event, *, full_sync: bool = False) -> None:
        self.config = config
        self.stop = stop
        # Every root gets a full sync at start, whatever [sync] startup says: the index was just
        # rebuilt from a salvage and only a sync makes it true again (docs/repair.md).
        self.full_sync = full_sync
        self.log = logs.get()
        self.roots: dict[bytes, RootRuntime] = {}
        self.pool = ThreadPoolExecutor(config.sync.hash_workers, thread_name_prefix="hash")
        self.db = AsyncIndex(config.database)
        self.pending_counters: dict[str, int] = {"events": 0, "escalations": 0}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.rebuild_task: asyncio.Task[None] | None = None
        self.metrics_task: asyncio.Task[None] | None = None
        self.guard_task: asyncio.Task[None] | None = None
        self.prune_task: asyncio.Task[None] | None = None
        self.replication: Replication | None = None  # [replicate]: the thread that feeds the catalogue
        # Monotonic event times -> wall-clock times for `status`: one offset, so a published
        # time does not move (and cause a write) every time it is computed.
        self.wall_offset = time.time() - time.monotonic()
        self.rebuilding = False
        self.published: tuple[Any, ...] = ()
        self.mount_watcher: MountWatcher | None = None
        self.table: list[Mount] = []  # the mount table as last read
        self.mount_tasks: set[asyncio.Task[None]] = set()
        # Set once a read or a commit finds the database damaged: the service stops this
        # scheduler, repairs the database and starts a new one (service._serve).
        self.damage: str | None = None
        self.damaged = asyncio.Event()
        self.check_task: asyncio.Task[None] | None = None
        self.drained = False

    # --- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.db.open()
        self.table = await asyncio.to_thread(read_mount_table)
        for root in self.config.roots:
            await self.add_root(root)
        self.mount_watcher = MountWatcher(self.loop, self.on_mounts)
        if not await asyncio.to_thread(self.mount_watcher.start):
            self.mount_watcher = None
            self.log.warning("the mount table cannot be watched; it is read again every "
                             f"{OFFLINE_RECHECK_S:g} s", path=str(fs.MOUNTINFO))  # fmt: skip
            task = asyncio.create_task(self._read_mounts_every(OFFLINE_RECHECK_S), name="mounts")
            self.mount_tasks.add(task)
            task.add_done_callback(self.mount_tasks.discard)
        self.rebuild_task = asyncio.create_task(self._rebuild(), name="rebuild")
        self.metrics_task = asyncio.create_task(self._metrics(), name="metrics")
        self.guard_task = asyncio.create_task(self._guard(), name="guard")
        self.prune_task = asyncio.create_task(self._prune(), name="prune")
        self.check_task = asyncio.create_task(self._check_database(), name="check")
        await self._start_replication()

    async def add_root(self, root: RootConfig) -> None:
        index = await asyncio.to_thread(Index, self.config.database)
        rt = RootRuntime(root, Aggregator(os.fsencode(root.path), self.config.watch), index)
        rt.mounts = rt.mounts_in(self.table)
        self.roots[rt.path] = rt
        row = index.root(rt.path)
        assert row is not None
        now = time.monotonic()
        interrupted = index.interrupted_scan(row.id)
        if interrupted is not None:
            kind, _, done, queued = interrupted
            self.log.info("resuming an interrupted scan", root=rt.path, kind=kind, files_done=done, files_queued=queued)
            rt.aggregator.rescan_root(now)
        elif self.config.sync.startup or self.full_sync:
            rt.aggregator.rescan_root(now)
        if self.config.sync.full_interval_s > 0:
            # Count from the last full sync the database remembers, so a daemon restarted
            # every few hours still syncs once a day; a root never synced counts from now.
            since_last = time.time() - (row.last_full_sync or time.time())
            rt.next_full = now + max(0.0, self.config.sync.full_interval_s - since_last)
        rt.files = index.totals(row.id)[0]
        await self._start_watcher(rt)
        self._start_worker(rt)

    async def remove_root(self, path: bytes) -> None:
        rt = self.roots.pop(path)
        if rt.watcher is not None:
            await asyncio.to_thread(rt.watcher.stop)
        if rt.task is not None:
            rt.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rt.task
        rt.index.close()
        self.log.info("root removed from the configuration; its index is kept", root=path)

    async def reload(self, config: Config) -> None:
        """Apply a new configuration: roots added or removed, windows changed, no restart."""
        old = self.config
        self.config = config
        wanted = {os.fsencode(r.path): r for r in config.roots}
        for path in list(self.roots):
            if path not in wanted or wanted[path] != self.roots[path].config:
                await self.remove_root(path)
        for path, root in wanted.items():
            if path not in self.roots:
                await self.add_root(root)
        if config.replicate != old.replicate or (config.replicate.url and config.feed != old.feed):
            await self._stop_replication()
            await self._start_replication()
        if config.watch != old.watch:
            for rt in self.roots.values():
                # A new window applies to what arrives from now on; what was pending is covered
                # by one sync of the root rather than dropped.
                rt.aggregator = Aggregator(rt.path, config.watch)
                rt.aggregator.rescan_root(time.monotonic())
                rt.wake.set()
        self.log.info("configuration reloaded", roots=len(self.roots), source=config.source)

    def note_damage(self, error: BaseException, where: str) -> bool:
        """Whether ``error`` says the database is damaged. The first such error stops the scans
        (each at its next file, so nothing more is written to a damaged file) and tells the
        service, which repairs it; retrying would only meet the same broken page again."""
        if not is_damage(error):
            return False
        if self.damage is None:
            self.damage = error.said if isinstance(error, DamagedError) else str(error)
            self.log.error("the database is damaged; stopping to repair it", database=str(self.config.database),
                           reason=self.damage, where=where, message_id=MessageId.DAMAGED)  # fmt: skip
            self.stop.set()
            self.damaged.set()
        return True

    async def drain(self) -> None:
        """SIGTERM: the scans in flight commit their batch and stop; watchers stop. Once."""
        if self.drained:
            return
        self.drained = True
        self.stop.set()
        if self.mount_watcher is not None:
            await asyncio.to_thread(self.mount_watcher.stop)
        for rt in self.roots.values():
            rt.wake.set()
        helpers = (self.metrics_task, self.guard_task, self.prune_task, self.check_task)
        for task in (*helpers, *self.mount_tasks):
            if task is not None:
                task.cancel()  # they only sleep between runs; a rebuild stops at its next batch
        tasks = [rt.task for rt in self.roots.values() if rt.task is not None]
        tasks += [t for t in (self.rebuild_task, *helpers) if t is not None]
        tasks += list(self.mount_tasks)
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.replication is not None:
            await asyncio.to_thread(self.replication.close)  # a batch in flight rolls back
        for rt in self.roots.values():
            if rt.watcher is not None:
                await asyncio.to_thread(rt.watcher.stop)
            rt.index.close()
        if self.damage is None:
            await self.flush_counters()  # not into a damaged file: the repair starts them again
        self.pool.shutdown(wait=True, cancel_futures=True)

    async def close(self) -> None:
        await self.db.close()

    async def shutdown(self, last: Callable[[Scheduler], Awaitable[None]] | None = None) -> None:
        """Drain, write ``last`` (the daemon's final row) unless the database is damaged, close:
        also after a start that failed half-way. Each step is tried, so that no thread (the
        watchers' observers, the aiosqlite connection's, the hash pool's) is left running to
        keep the process alive."""

        async def last_words() -> None:
            if last is not None and self.damage is None:
                await last(self)

        for step in (self.drain, last_words, self.close):
            try:
                await step()
            except Exception as e:
                self.log.warning("while shutting down", step=step.__name__, reason=f"{type(e).__name__}: {e}")

    # --- background work ---------------------------------------------------------------

    async def _rebuild(self) -> None:
        """After an upgrade that changed what the index derives, re-derive it by itself."""
        try:
            await self._rebuild_once()
        except Exception as e:
            if not self.note_damage(e, "rebuild"):
                self.log.exception("rebuild failed; it resumes at the next start", reason=str(e))

    async def _rebuild_once(self) -> None:
        index = await asyncio.to_thread(Index, self.config.database)
        try:
            pending = await asyncio.to_thread(needs_rebuild, index)
            if not pending:
                return
            self.log.info("the index was made by an older hash scheme: rebuilding", files=pending,
                          reason=f"hash scheme {HASH_SCHEME}")  # fmt: skip
            self.rebuilding = True
            report = await asyncio.to_thread(
                rebuild, index, self.config.sync.batch_size, self.stop, workers=self.config.sync.hash_workers
            )
            self.log.info("rebuild finished" if not report.interrupted else "rebuild interrupted; resumes at start",
                          rebuilt=report.rebuilt, rebuilt_bytes=report.rebuilt_bytes, skipped=report.skipped,
                          seconds=round(report.seconds, 3))  # fmt: skip
            for path in report.corrupt[:ERRORS_LOGGED]:
                self.log.error("content changed while size and mtime did not", path=path,
                               message_id=MessageId.SCAN_ERROR)  # fmt: skip
        finally:
            self.rebuilding = False
            index.close()

    async def _check_database(self) -> None:
        await upkeep.check_database(self.config, self.note_damage, self.log)

    async def _metrics(self) -> None:
        await upkeep.write_metrics(self.config, self.stop, self.note_damage, self.log)

    async def _start_replication(self) -> None:
        """`[replicate]`: a thread that keeps the fleet catalogue caught up (replication.py)."""
        if self.config.replicate.url is None:
            self.replication = None
            await self.db.set_replication(None)  # what `status` showed of an earlier configuration
            return
        from daemon.replication import Replication  # with it the catalogue's modules, only when asked for

        published = await asyncio.to_thread(self._published_replication)
        self.replication = Replication(self.config, published)
        self.replication.start()

    def _published_replication(self) -> ReplicationRow | None:
        index = Index(self.config.database)
        try:
            return index.replication()
        finally:
            index.close()

    async def _stop_replication(self) -> None:
        if self.replication is not None:
            await asyncio.to_thread(self.replication.close)
            self.replication = None

    async def _prune(self) -> None:
        await upkeep.prune_feed(self.config, self.stop, self.note_damage, self.log, self._feed_hold)

    def _feed_hold(self) -> tuple[str, int] | None:
        """The cursor the fleet catalogue has taken up to: retention keeps what follows (docs/fleet.md)."""
        return self.replication.hold() if self.replication is not None else None

    # --- events ------------------------------------------------------------------------

    async def _start_watcher(self, rt: RootRuntime) -> None:
        assert self.loop is not None
        watcher = RootWatcher(
            rt.config, self.config.watch, self.loop, lambda ev: self.on_event(rt, ev), left_out=rt.left_out
        )
        rt.watcher = watcher
        await asyncio.to_thread(watcher.start)
        rt.next_poll = time.monotonic() + self.config.watch.poll_interval_s
        rt.identity = await asyncio.to_thread(fs.identity, rt.path)
        rt.next_identity_check = time.monotonic() + ROOT_CHECK_S
        self.log.info("watching", root=rt.path, observer=watcher.mode, folders=watcher.watched_dirs)

    def on_event(self, rt: RootRuntime, ev: WatchEvent) -> None:
        """Runs on the loop thread for every event of a root's watcher."""
        if self.roots.get(rt.path) is not rt:
            return  # a watcher of a root removed by a reload
        now = time.monotonic()
        agg = rt.aggregator
        before = agg.escalations
        self.pending_counters["events"] += 1
        urgent = False
        if ev.kind is EventKind.CHANGED and ev.rel is not None:
            agg.add(ev.rel, now)
        elif ev.kind is EventKind.CREATED_DIR and ev.rel is not None:
            agg.add(ev.rel, now, is_dir=True)
        elif ev.kind is EventKind.DELETED and ev.rel is not None:
            # A deleted folder is recursive (docs/aggregation.md): it absorbs what arrives below it.
            agg.add(ev.rel, now, is_dir=ev.is_dir, deleted=True)
        elif ev.kind is EventKind.MOVED:
            agg.add_move(ev.rel, ev.dest, now, is_dir=ev.is_dir)
        elif ev.kind is EventKind.UNMOUNTED:
            # Not a change of the tree: which volume went is the mount table's to say (a scan of
            # its mount point then finds it offline, and deletes nothing below it).
            with contextlib.suppress(OSError):
                self.on_mounts(fs.mounts())
        else:
            urgent = True
            self._on_watch_problem(rt, ev, now)
        self.pending_counters["escalations"] += agg.escalations - before
        if urgent or now + self.config.watch.debounce_s < rt.sleep_until:
            rt.wake.set()

    def _on_watch_problem(self, rt: RootRuntime, ev: WatchEvent, now: float) -> None:
        if ev.kind is EventKind.OVERFLOW:
            rt.overflows += 1  # every one counts in `status`, logged or not
            untold = rt.overflow_lines.tell(now)
            if untold is not None:
                more = {"overflows_not_logged": untold} if untold else {}
                self.log.warning("events were lost; full sync scheduled", root=rt.path, reason=ev.detail,
                                 message_id=MessageId.OVERFLOW, **more)  # fmt: skip
        elif ev.kind is EventKind.WATCH_LIMIT:
            self.log.warning("not every folder can be watched; polling instead", root=rt.path, reason=ev.detail,
                             message_id=MessageId.WATCH_LIMIT)  # fmt: skip
            rt.overflows += 1
        elif ev.kind is EventKind.OBSERVER_DIED:
            self.log.error("the watcher died and was restarted; full sync scheduled", root=rt.path, reason=ev.detail)
        elif ev.kind is EventKind.INOTIFY_RESTORED:
            self.log.info("inotify watches placed again; full sync scheduled", root=rt.path)
        elif ev.kind is EventKind.ROOT_GONE:
            self.log.warning("the root folder went away; checking it", root=rt.path)
        rt.aggregator.rescan_root(now)

    # --- mounts below the roots -----------------------------------------------------------

    def on_mounts(self, table: list[Mount]) -> None:
        """The mount table changed (MountWatcher, or IN_UNMOUNT below a root): for each root, the
        mount points whose mount came, went or was replaced are watched afresh and synced at once.
        The scan decides whether each volume is online (daemon/volumes.py)."""
        self.table = table
        for rt in self.roots.values():
            now = rt.mounts_in(table)
            changed = {
                rel
                for rel in now.keys() | rt.mounts.keys()
                if mount_identity(now.get(rel)) != mount_identity(rt.mounts.get(rel))
            }
            rt.mounts = now
            # A change below another changed mount point is covered by that one's.
            top = sorted(rel for rel in changed if not any(o != rel and is_within(rel, o) for o in changed))
            if top:
                task = asyncio.create_task(self._mounts_changed(rt, top), name=f"mounts {rt.config.path}")
                self.mount_tasks.add(task)
                task.add_done_callback(self.mount_tasks.discard)

    async def _read_mounts_every(self, period: float) -> None:
        """Without a poll() on the mount table (no /proc at start): read it now and then."""
        while not self.stop.is_set():
            await asyncio.sleep(period)
            self.on_mounts(await asyncio.to_thread(read_mount_table))

    async def _mounts_changed(self, rt: RootRuntime, mount_points: list[bytes]) -> None:
        self.log.info("mounts changed below the root; syncing there", root=rt.path,
                      paths=" ".join(os.fsdecode(join(rt.path, p)) for p in mount_points))  # fmt: skip
        if rt.watcher is not None:
            # Watches first, then the scan: nothing written meanwhile falls between the two.
            await asyncio.to_thread(rt.watcher.rewatch, mount_points, rt.left_out)
        if self.roots.get(rt.path) is not rt or self.stop.is_set():
            return
        now = time.monotonic()
        for rel in mount_points:
            rt.aggregator.rescan(rel, now)
        rt.wake.set()

    def _note_volumes(self, rt: RootRuntime, report: ScanReport) -> None:
        """One journal entry per volume that went offline or came back (MESSAGE_IDs in README)."""
        for rel, reason in sorted(report.volumes_offline.items()):
            if rel not in rt.volumes_offline:
                self.log.warning("volume is offline: nothing below it is deleted while it is away",
                                 root=rt.path, path=join(rt.path, rel), reason=reason,
                                 message_id=MessageId.VOLUME_OFFLINE)  # fmt: skip
        for rel in sorted((rt.volumes_offline.keys() | set(report.volumes_back)) - report.volumes_offline.keys()):
            if rel in report.volumes_online:
                self.log.info("volume is back online", root=rt.path, path=join(rt.path, rel),
                              message_id=MessageId.VOLUME_ONLINE)  # fmt: skip
        rt.volumes_offline = dict(report.volumes_offline)

    # --- scans -------------------------------------------------------------------------

    def _timers(self, rt: RootRuntime, now: float) -> None:
        interval = self.config.sync.full_interval_s
        if now >= rt.next_full:
            self.log.info("periodic full sync", root=rt.path)
            rt.aggregator.rescan_root(now)
            rt.next_full = now + interval if interval > 0 else float("inf")
        if rt.observer_state in ("polling", "offline") and now >= rt.next_poll:
            rt.aggregator.rescan_root(now)
            rt.poll_pass = True
            period = self.config.watch.poll_interval_s
            rt.next_poll = now + (min(period, OFFLINE_RECHECK_S) if rt.offline else period)
        polled = rt.polled
        if polled and now >= rt.next_volume_poll:
            if rt.next_volume_poll:  # the first pass is the startup sync's
                for rel in polled:
                    rt.aggregator.rescan(rel, now)
            rt.next_volume_poll = now + self.config.watch.poll_interval_s

    def _start_worker(self, rt: RootRuntime) -> None:
        rt.task = asyncio.create_task(self._worker(rt), name=f"root {rt.config.path}")
        rt.task.add_done_callback(lambda task: self._worker_ended(rt, task))

    def _worker_ended(self, rt: RootRuntime, task: asyncio.Task[None]) -> None:
        """A worker that ends for any reason but shutdown is said so and started again: a root
        whose worker is gone would keep its watches and collect events that are never scanned."""
        if self.stop.is_set() or self.roots.get(rt.path) is not rt or task is not rt.task:
            return  # shutdown, or a root that a reload removed
        error = None if task.cancelled() else task.exception()
        reason = "cancelled" if task.cancelled() else f"{type(error).__name__}: {error}" if error else "returned"
        rt.worker_ends += 1
        delay = min(WORKER_RESTART_MAX_S, WORKER_RESTART_S * 2 ** min(rt.worker_ends - 1, 16))
        self.log.error("the worker of a root ended; it is started again with a full sync of the root",
                       root=rt.path, reason=reason, restart_in_s=delay, message_id=MessageId.WORKER_ENDED,
                       exc_info=error)  # fmt: skip
        # What was pending may be what it failed on: one full sync of the root covers all of it.
        rt.aggregator = Aggregator(rt.path, self.config.watch)
        rt.aggregator.rescan_root(time.monotonic())
        rt.scanning, rt.sleeping = None, False
        asyncio.get_running_loop().call_later(delay, self._restart_worker, rt)

    def _restart_worker(self, rt: RootRuntime) -> None:
        if self.stop.is_set() or self.roots.get(rt.path) is not rt or (rt.task is not None and not rt.task.done()):
            return
        if rt.in_flight is not None and not rt.in_flight.done():
            # The ended worker's scan still runs in its thread, on the root's connection: a
            # second scan must not start beside it.
            asyncio.get_running_loop().call_later(WORKER_RESTART_S, self._restart_worker, rt)
            return
        self._start_worker(rt)

    async def _guard(self) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(GUARD_EVERY_S)
            self.check_rounds(time.monotonic())

    def check_rounds(self, now: float) -> None:
        """The stall guard: a worker asleep while pending paths are past their deadline has missed
        a round (a wake-up lost, a deadline miscomputed). Log it once per occurrence, with the
        paths and their age, and scan them now. Never true while the worker scans or backs off
        after a failed scan: those waits are its own and already logged."""
        for rt in self.roots.values():
            if not rt.sleeping or now < rt.retry_after:
                continue
            late = rt.aggregator.late(now, STALL_MARGIN_S)
            if not late:
                continue
            shown = " ".join(os.fsdecode(join(rt.path, p)) for p, _ in late[:PENDING_PATHS_SHOWN])
            self.log.error("pending changes were not scanned in time; scanning them now", root=rt.path,
                           paths=shown, count=len(late), oldest_age_s=round(now - late[0][1], 3),
                           message_id=MessageId.ROUND_LATE)  # fmt: skip
            rt.aggregator.expedite([p for p, _ in late])
            rt.wake.set()

    async def _worker(self, rt: RootRuntime) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            self._timers(rt, now)
            if now >= rt.next_identity_check:
                await self._check_identity(rt, now)
            # Not due() as soon as something is due: next_due() waits for the rest of a burst
            # whose windows close within a few milliseconds, so that the burst is one scan.
            next_due = rt.aggregator.next_due()
            ready = next_due is not None and now >= max(next_due, rt.retry_after)
            scopes = rt.aggregator.due(now) if ready else []
            if scopes:
                await self._scan(rt, scopes)
                continue
            deadlines = [rt.next_full, rt.next_poll if rt.observer_state in ("polling", "offline") else float("inf")]
            deadlines.append(rt.next_identity_check)
            if rt.polled:
                deadlines.append(rt.next_volume_poll)
            if next_due is not None:
                deadlines.append(max(next_due, rt.retry_after))
            rt.sleep_until = min(deadlines)
            rt.wake.clear()
            rt.sleeping = True
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(rt.wake.wait(), timeout=min(max(rt.sleep_until - now, 0.0), 3600.0))
            finally:
                rt.sleeping = False

    async def _check_identity(self, rt: RootRuntime, now: float) -> None:
        rt.next_identity_check = now + ROOT_CHECK_S
        if rt.offline is not None or rt.watcher is None:
            return  # an offline root is rechecked by its scans; its watches are already gone
        current = await asyncio.to_thread(fs.identity, rt.path)
        if current == rt.identity:
            return
        self.log.warning("the root folder is no longer the one being watched (unmounted or replaced); checking it",
                         root=rt.path, message_id=MessageId.ROOT_OFFLINE)  # fmt: skip
        await asyncio.to_thread(rt.watcher.stop)
        rt.watcher = None  # placed again by _after_scan once the root is found online
        rt.next_identity_check = float("inf")
        rt.aggregator.rescan_root(now)

    async def _scan(self, rt: RootRuntime, scopes: list[ScanScope]) -> None:
        kind = ScanKind.FULL if any(s.recursive and not s.subtree for s in scopes) else ScanKind.SUBTREE
        rt.scanning = kind
        self.log.debug("scan", root=rt.path, scope=" ".join(os.fsdecode(s.subtree) or "/" for s in scopes))
        try:
            rt.in_flight = asyncio.ensure_future(
                asyncio.to_thread(
                    scan,
                    rt.index,
                    rt.config,
                    scopes,
                    self.config.sync,
                    progress=rt.progress,
                    stop=self.stop,
                    pool=self.pool,
                )
            )
            # Shielded: a worker cancelled here leaves the thread running, and _restart_worker
            # waits for it through rt.in_flight.
            report = await asyncio.shield(rt.in_flight)
        except Exception as e:  # a bug or a database failure must not kill the other roots
            if self.note_damage(e, f"scan of {os.fsdecode(rt.path)}"):
                return
            self.log.exception("scan failed", root=rt.path, reason=str(e), message_id=MessageId.SCAN_ERROR)
            rt.failures += 1
            delay = min(SCAN_RETRY_MAX_S, SCAN_RETRY_S * 2 ** min(rt.failures - 1, 16))
            rt.retry_after = time.monotonic() + delay
            self.log.warning("scan will be retried", root=rt.path, retry_in_s=delay, failures=rt.failures)
            rt.aggregator.rescan_root(time.monotonic())
            return
        finally:
            rt.scanning = None
            rt.progress.phase(rt.path, "idle")
        try:
            await self._after_scan(rt, report)
        except Exception as e:  # the worker must outlive a failure to log or re-place watches
            if self.note_damage(e, f"after a scan of {os.fsdecode(rt.path)}"):
                return
            self.log.exception("after a scan", root=rt.path, reason=str(e), message_id=MessageId.SCAN_ERROR)

    async def _after_scan(self, rt: RootRuntime, report: ScanReport) -> None:
        now = time.monotonic()
        rt.failures = rt.worker_ends = 0
        if report.offline is None and report.busy_pid is None:
            self._note_volumes(rt, report)
        if report.offline:
            if rt.offline is None:
                self.log.warning("root is offline: nothing is deleted while it is away", root=rt.path,
                                 reason=report.offline, message_id=MessageId.ROOT_OFFLINE)  # fmt: skip
                if rt.watcher is not None:
                    await asyncio.to_thread(rt.watcher.stop)
            rt.offline = report.offline
            rt.next_poll = now + min(self.config.watch.poll_interval_s, OFFLINE_RECHECK_S)
            return
        if rt.watcher is None and rt.offline is None and not report.came_online:
            await self._start_watcher(rt)  # the root's folder was replaced (see _check_identity)
            rt.aggregator.rescan_root(now)
        if rt.offline is not None or report.came_online:
            self.log.info("root is back online", root=rt.path, message_id=MessageId.ROOT_ONLINE)
            rt.offline = None
            await self._start_watcher(rt)
            rt.aggregator.rescan_root(now)  # what changed while the watches were away
        for path in report.unstable:
            rt.aggregator.add(path, now)  # changed while hashed: again once it is quiet
        for path in report.linked:
            rt.aggregator.add(path, now)  # another name of a file that changed: no event of its own
        for path, error in sorted(report.errors.items())[:ERRORS_LOGGED]:
            self.log.warning("cannot index", root=rt.path, path=rt.path + b"/" + path, reason=error,
                             message_id=MessageId.SCAN_ERROR)  # fmt: skip
        if len(report.errors) > ERRORS_LOGGED:
            self.log.warning("more entries cannot be indexed", root=rt.path, count=len(report.errors) - ERRORS_LOGGED,
                             message_id=MessageId.SCAN_ERROR)  # fmt: skip
        if report.listers_lost:
            self.log.warning("lister processes ended early; the walk listed their folders itself (slower, "
                             "nothing missed)", root=rt.path, reasons="; ".join(report.listers_lost))  # fmt: skip
        changed = {op.value: n for op, n in report.ops.items() if n}
        poll_pass, rt.poll_pass = rt.poll_pass, False
        if report.interrupted:
            # What it committed stays; the next scan finds only the rest.
            rt.files += report.ops[Op.ADDED] - report.ops[Op.DELETED]
            self.log.info("scan interrupted; the next one resumes it", root=rt.path, kind=report.kind.value,
                          seconds=round(report.seconds, 3), **changed)  # fmt: skip
        elif report.kind is ScanKind.FULL and poll_pass and not changed:
            # A polled root is fully synced every poll_interval_s: 1440 alerts a day otherwise.
            self.log.debug("polling pass found nothing new", root=rt.path, seconds=round(report.seconds, 3))
        elif report.kind is ScanKind.FULL:
            rt.files = await asyncio.to_thread(rt.count_files)
            self.log.info("full sync finished", root=rt.path, seconds=round(report.seconds, 3), files=rt.files,
                          hashed_bytes=report.bytes_hashed, message_id=MessageId.FULL_SYNC_FINISHED,
                          **changed)  # fmt: skip
        elif changed:
            rt.files += report.ops[Op.ADDED] - report.ops[Op.DELETED]
            self.log.info("scan finished", root=rt.path, kind=report.kind.value, seconds=round(report.seconds, 3),
                          **changed)  # fmt: skip

    # --- what the daemon is doing --------------------------------------------------------

    def activity(self) -> str:
        busy = [
            f"{rt.scanning.value} sync of {os.fsdecode(rt.path)} ({rt.progress.describe()})"
            for rt in self.roots.values()
            if rt.scanning is not None
        ]
        if self.rebuilding:
            busy.append("rebuilding the index")
        return "; ".join(busy) if busy else "idle"

    def summary(self) -> str:
        files = sum(rt.files for rt in self.roots.values())
        offline = sum(1 for rt in self.roots.values() if rt.offline)
        pending = sum(rt.aggregator.pending for rt in self.roots.values())
        text = f"{len(self.roots)} roots, {files} files, {pending} pending"
        if offline:
            text += f", {offline} offline"
        return f"{text}; {self.activity()}"

    async def flush_counters(self) -> None:
        counters, self.pending_counters = self.pending_counters, {"events": 0, "escalations": 0}
        await self.db.add_counters(counters)

    async def publish(self, pid: int, started_at: float, state: str) -> None:
        """Write what `status` shows — the daemon's row, each root's pending count and observer —
        when it changed since the last write: an idle daemon writes nothing (disks spin down)."""
        # Exactly the snapshot's values are written: the writes await, and an event arriving
        # meanwhile must not put into the database a value that `published` does not record.
        # (It did: a pending count read after the await was written while the snapshot said 0,
        # so once that path was scanned the snapshot equalled `published` again and `status`
        # showed "1 pending" forever. Torture seed 20261202.)
        activity = self.activity()
        roots = tuple((rt.path, *rt.pending_state(self.wall_offset)) for rt in self.roots.values())
        replication = self.replication.state if self.replication is not None else None
        snapshot = (state, activity, roots, replication)
        if snapshot != self.published:
            await self.db.heartbeat(pid, started_at, state, activity)
            if replication is not None and (not self.published or self.published[3] != replication):
                await self.db.set_replication(replication)
            for path, pending, observer, since, paths in roots:
                await self.db.root_runtime(
                    path, pending=pending, observer=observer, pending_since=since, pending_paths=paths
                )
            self.published = snapshot
        for rt in self.roots.values():
            if rt.overflows:
                await self.db.count_overflows(rt.path, rt.overflows)
                rt.overflows = 0
        if any(self.pending_counters.values()):
            await self.flush_counters()
