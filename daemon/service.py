"""The daemon as a service: sd_notify, signals (SIGHUP reload, SIGTERM drain), the heartbeat.

systemd's notify protocol (sd_notify(3)): READY=1 once the watches are placed and the startup
sync has started (a first index can take hours; waiting for it would time the unit out),
STATUS= a one-line summary, WATCHDOG=1 from the event loop at half of WATCHDOG_USEC (a hung
loop is restarted; a busy hashing thread does not stop the loop from pinging), RELOADING=1
with MONOTONIC_USEC on SIGHUP, STOPPING=1 on SIGTERM.

A damaged database (docs/repair.md) stops the scheduler, is repaired in this process, and a new
scheduler starts; a fatal error ends the process within EXIT_GRACE_S, with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from daemon import fs, logs
from daemon.config import Config, ConfigError
from daemon.fs import DaemonLock
from daemon.logs import MessageId
from daemon.model import ExitCode
from daemon.scheduler import Scheduler

# While starting, systemd's start timeout is extended by three of these at a time.
START_EXTEND_S = 10.0
# How often `status` sees fresh numbers (pending events, activity) from the daemon.
PUBLISH_EVERY_S = 1.0
# The database file's identity is checked this often, as the roots' are (scheduler.ROOT_CHECK_S):
# a check runs in a thread (a hung disk must not stop the loop), and a thread's round trip
# costs the loop ~0.3 ms of CPU: once a second it was a third of an idle daemon's CPU (by
# schedstat, 25 ms against 15 ms per 30 s).
DATABASE_CHECK_S = 5.0
# A daemon that fails ends its process within this long, even if a thread will not stop.
EXIT_GRACE_S = 3.0
# More repairs than this within the window and the daemon gives up (exit 1): the disk is failing.
REPAIRS_MAX = 3
REPAIR_WINDOW_S = 3600.0


def notify(message: str) -> None:
    """sd_notify through systemd-python; a no-op when NOTIFY_SOCKET is not set."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd import daemon as sd

    sd.notify(message)


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6 / 2


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one scheduler's life ended: stopped (with the exit code), or on a damaged database."""

    config: Config  # the configuration in force at the end (SIGHUP may have replaced it)
    code: int = ExitCode.OK
    damage: str | None = None  # SQLite's words when the database was found damaged


async def _serve(config: Config, reload_config: Callable[[], Config]) -> int:
    """The daemon's life: schedulers one after the other, a repair between two when one finds
    the database damaged (in-process, docs/repair.md), until a signal or a fatal error."""
    log = logs.get()
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_signal_handler(signal.SIGINT, stopped.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
    life = _Life(reload_config, stopped, reloads)
    repairs: list[float] = []  # when this process repaired the database (monotonic)
    try:
        full_sync = False
        while True:
            outcome = await life.watch(config, full_sync=full_sync)
            config = outcome.config
            if outcome.damage is None:
                return outcome.code
            if stopped.is_set():
                log.info("stopping before the repair; the next start repairs the database")
                return ExitCode.OK
            repairs = [t for t in repairs if t > time.monotonic() - REPAIR_WINDOW_S] + [time.monotonic()]
            if len(repairs) > REPAIRS_MAX:
                # A disk that damages every new index as fast as it is made: repairing again
                # would only fill the folder with damaged copies. Say so and let the admin look.
                raise RuntimeError(f"the database was damaged again after {REPAIRS_MAX} repairs within"
                                   f" {REPAIR_WINDOW_S / 60:.0f} minutes: is the disk failing?")  # fmt: skip
            await life.repair(config, outcome.damage)
            if stopped.is_set():
                return ExitCode.OK  # SIGTERM during the repair, which finished: the next start syncs
            full_sync = True
    except Exception as e:
        # Whatever ends the daemon ends the process, soon, with one line saying why: systemd's
        # Restart= and the journal must tell the truth. A thread left running (an observer, a
        # connection's) once kept a daemon whose start had failed alive, doing nothing.
        exit_guard(ExitCode.FAILURE)
        log.error("treewatch cannot go on; exiting", reason=f"{type(e).__name__}: {e}",
                  database=str(config.database))  # fmt: skip
        log.debug("the failure in full", exc_info=e)
        return ExitCode.FAILURE
    finally:
        if life.pinger is not None:
            life.pinger.cancel()


async def _watchdog(ping: float) -> None:
    # Its own task, doing nothing but ping: the ping must prove that the loop runs, and
    # nothing more. It used to share the heartbeat's loop, which awaits database writes;
    # with another writer holding the lock (busy_timeout is 60 s, as long as WatchdogSec=)
    # the pings stopped and systemd killed a daemon that was merely waiting.
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(ping)


async def _extend_start_timeout(what: str) -> None:
    # Placing inotify watches on a tree of a million folders, or repairing a damaged database,
    # can outlast TimeoutStartSec=: while it goes on, ask systemd for more time (sd_notify(3),
    # EXTEND_TIMEOUT_USEC).
    while True:
        notify(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_S * 3 * 1e6)}\nSTATUS={what}")
        await asyncio.sleep(START_EXTEND_S)


class _Life:
    """What the schedulers of one daemon process share: signals, the start time, READY."""

    def __init__(self, reload_config: Callable[[], Config], stopped: asyncio.Event,
                 reloads: asyncio.Queue[None]) -> None:  # fmt: skip
        self.reload_config = reload_config
        self.stopped = stopped
        self.reloads = reloads
        self.started_at = time.time()
        self.pid = os.getpid()
        self.ready = False  # READY=1 was sent: systemd's start timeout no longer applies
        # From READY on, the watchdog is pinged for the rest of the life, repairs included.
        self.pinger: asyncio.Task[None] | None = None
        self.log = logs.get()

    async def repair(self, config: Config, damage: str) -> None:
        from daemon.repair import repair  # the salvage's imports are needed only now

        notify("STATUS=repairing the damaged database")
        extending = None if self.ready else asyncio.create_task(_extend_start_timeout("repairing the database"))
        try:
            report = await asyncio.to_thread(repair, config.database, damage)
        finally:
            if extending is not None:
                extending.cancel()
        self.log.warning("the database was repaired; a full sync of every root follows", **report.fields(),
                         message_id=MessageId.REPAIRED)  # fmt: skip

    async def watch(self, config: Config, *, full_sync: bool) -> Outcome:
        """One scheduler, from its start to a signal or a damaged database; always shut down."""
        scheduler = Scheduler(config, threading.Event(), full_sync=full_sync)
        started = False
        try:
            try:
                await self._start(scheduler)
            except Exception as e:
                if scheduler.note_damage(e, "start"):
                    return Outcome(config, damage=scheduler.damage)
                raise
            started = True
            return await self._run(scheduler)
        finally:
            await scheduler.shutdown(last=self._stopped_row if started else None)

    async def _start(self, scheduler: Scheduler) -> None:
        extending = None if self.ready else asyncio.create_task(_extend_start_timeout("placing watches"))
        try:
            await scheduler.start()
        finally:
            if extending is not None:
                extending.cancel()
        await scheduler.publish(self.pid, self.started_at, "watching")

    async def _stopped_row(self, scheduler: Scheduler) -> None:
        await scheduler.db.heartbeat(self.pid, self.started_at, "stopped", "stopped")

    async def _run(self, scheduler: Scheduler) -> Outcome:
        log = self.log
        config = scheduler.config
        db_identity = fs.identity(config.database)
        exit_code = ExitCode.OK
        notify("READY=1\nSTATUS=" + scheduler.summary())
        self.ready = True
        ping = watchdog_interval()
        if ping is not None and self.pinger is None:
            self.pinger = asyncio.create_task(_watchdog(ping))
        log.info("treewatch started", roots=len(scheduler.roots), database=str(config.database),
                 message_id=MessageId.STARTED)  # fmt: skip

        async def heartbeat() -> None:
            nonlocal exit_code
            last_status = ""
            next_database_check = time.monotonic() + DATABASE_CHECK_S
            while True:
                if time.monotonic() >= next_database_check:
                    next_database_check = time.monotonic() + DATABASE_CHECK_S
                    if await asyncio.to_thread(fs.identity, config.database) != db_identity:
                        # SQLite keeps writing to a deleted (or replaced) file through its open
                        # descriptors without a word: every commit would go nowhere, and `status`
                        # would read another file. Exit 1 so the service manager restarts the
                        # daemon, whose next start rebuilds the index from disk (torture: database
                        # deleted).
                        log.error("the database was deleted or replaced under the running daemon; exiting",
                                  database=str(config.database))  # fmt: skip
                        exit_code = ExitCode.FAILURE
                        self.stopped.set()
                        return
                try:
                    await scheduler.publish(self.pid, self.started_at, "watching")
                except Exception as e:  # a locked or failing database must not end the publishing for good
                    if scheduler.note_damage(e, "publishing the status"):
                        return
                    log.warning("cannot publish the daemon's status", reason=str(e))
                status = "STATUS=" + scheduler.summary()
                if status != last_status:  # the manager needs no copy of an unchanged line every second
                    notify(status)
                    last_status = status
                await asyncio.sleep(PUBLISH_EVERY_S)

        async def reloader() -> None:
            while True:
                await self.reloads.get()
                notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
                try:
                    new = self.reload_config()
                except ConfigError as e:
                    log.error("the new configuration is invalid; keeping the old one", reason=str(e))
                else:
                    try:
                        await scheduler.reload(new)
                    except Exception as e:
                        if scheduler.note_damage(e, "reload"):
                            return
                        raise
                notify("READY=1\nSTATUS=" + scheduler.summary())

        tasks = [asyncio.create_task(heartbeat()), asyncio.create_task(reloader())]
        waits = [asyncio.create_task(self.stopped.wait()), asyncio.create_task(scheduler.damaged.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, *waits):
                task.cancel()
            await asyncio.gather(*tasks, *waits, return_exceptions=True)
        if scheduler.damage is not None and not self.stopped.is_set():
            log.info("stopping the scans to repair the database")
            return Outcome(scheduler.config, damage=scheduler.damage)
        notify("STOPPING=1\nSTATUS=draining: committing the batch in flight")
        log.info("stopping: draining scans")
        await scheduler.drain()
        log.info("treewatch stopped", message_id=MessageId.STOPPED)
        return Outcome(scheduler.config, exit_code)


def exit_guard(code: int) -> None:
    """End the process with ``code`` in EXIT_GRACE_S, whatever still runs by then.

    An orderly exit waits for every non-daemon thread (and asyncio.run for every to_thread
    call): one stuck in a dead NFS mount's stat, or a connection's thread that a failed start
    left open, would keep a failed daemon alive forever. This daemon thread does not wait."""

    def _exit() -> None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(code)

    timer = threading.Timer(EXIT_GRACE_S, _exit)
    timer.daemon = True
    timer.start()


def run_daemon(config: Config, reload_config: Callable[[], Config]) -> int:
    logs.configure(config.log.level, journald=logs.under_journald())
    lock = DaemonLock(config.database)
    if not lock.acquire():
        logs.get().error("another treewatch daemon runs on this database", database=str(config.database))
        return ExitCode.FAILURE
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_serve(config, reload_config))
    except Exception as e:  # from the loop's own teardown: _serve has its own guard
        exit_guard(ExitCode.FAILURE)
        logs.get().error("treewatch cannot go on; exiting", reason=f"{type(e).__name__}: {e}",
                         database=str(config.database))  # fmt: skip
        return ExitCode.FAILURE
    return ExitCode.OK
