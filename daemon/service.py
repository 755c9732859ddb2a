"""The daemon as a service: sd_notify, signals (SIGHUP reload, SIGTERM drain), the heartbeat.

systemd's notify protocol (sd_notify(3)): READY=1 once the watches are placed and the startup
sync has started (a first index can take hours; waiting for it would time the unit out),
STATUS= a one-line summary, WATCHDOG=1 from the event loop at half of WATCHDOG_USEC (a hung
loop is restarted; a busy hashing thread does not stop the loop from pinging), RELOADING=1
with MONOTONIC_USEC on SIGHUP, STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable

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


async def _serve(config: Config, reload_config: Callable[[], Config]) -> int:
    log = logs.get()
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    stopped = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGTERM, stopped.set)
    loop.add_signal_handler(signal.SIGINT, stopped.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)

    scheduler = Scheduler(config, stop)
    started_at = time.time()
    pid = os.getpid()

    # Placing inotify watches on a tree of a million folders can outlast TimeoutStartSec=:
    # while it goes on, ask systemd for more time (sd_notify(3), EXTEND_TIMEOUT_USEC).
    async def extend_start_timeout() -> None:
        while True:
            notify(f"EXTEND_TIMEOUT_USEC={int(START_EXTEND_S * 3 * 1e6)}\nSTATUS=placing watches")
            await asyncio.sleep(START_EXTEND_S)

    extending = asyncio.create_task(extend_start_timeout())
    try:
        await scheduler.start()
    finally:
        extending.cancel()
    await scheduler.publish(pid, started_at, "watching")
    db_identity = fs.identity(config.database)
    exit_code = ExitCode.OK
    notify("READY=1\nSTATUS=" + scheduler.summary())
    log.info("treewatch started", roots=len(scheduler.roots), database=str(config.database),
             message_id=MessageId.STARTED)  # fmt: skip

    async def watchdog(ping: float) -> None:
        # Its own task, doing nothing but ping: the ping must prove that the loop runs, and
        # nothing more. It used to share the heartbeat's loop, which awaits database writes;
        # with another writer holding the lock (busy_timeout is 60 s, as long as WatchdogSec=)
        # the pings stopped and systemd killed a daemon that was merely waiting.
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(ping)

    async def heartbeat() -> None:
        nonlocal exit_code
        last_status = ""
        while True:
            if await asyncio.to_thread(fs.identity, config.database) != db_identity:
                # SQLite keeps writing to a deleted (or replaced) file through its open
                # descriptors without a word: every commit would go nowhere, and `status`
                # would read another file. Exit 1 so the service manager restarts the daemon,
                # whose next start rebuilds the index from disk (torture: database deleted).
                log.error("the database was deleted or replaced under the running daemon; exiting",
                          database=str(config.database))  # fmt: skip
                exit_code = ExitCode.FAILURE
                stopped.set()
                return
            try:
                await scheduler.publish(pid, started_at, "watching")
            except Exception as e:  # a locked or failing database must not end the publishing for good
                log.warning("cannot publish the daemon's status", reason=str(e))
            status = "STATUS=" + scheduler.summary()
            if status != last_status:  # the manager needs no copy of an unchanged line every second
                notify(status)
                last_status = status
            await asyncio.sleep(PUBLISH_EVERY_S)

    async def reloader() -> None:
        while True:
            await reloads.get()
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
            try:
                new = reload_config()
            except ConfigError as e:
                log.error("the new configuration is invalid; keeping the old one", reason=str(e))
            else:
                await scheduler.reload(new)
            notify("READY=1\nSTATUS=" + scheduler.summary())

    tasks = [asyncio.create_task(heartbeat()), asyncio.create_task(reloader())]
    ping = watchdog_interval()
    if ping is not None:
        tasks.append(asyncio.create_task(watchdog(ping)))
    await stopped.wait()
    notify("STOPPING=1\nSTATUS=draining: committing the batch in flight")
    log.info("stopping: draining scans")
    await scheduler.drain()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await scheduler.db.heartbeat(pid, started_at, "stopped", "stopped")
    await scheduler.close()
    log.info("treewatch stopped", message_id=MessageId.STOPPED)
    return exit_code


def run_daemon(config: Config, reload_config: Callable[[], Config]) -> int:
    logs.configure(config.log.level, journald=logs.under_journald())
    lock = DaemonLock(config.database)
    if not lock.acquire():
        logs.get().error("another treewatch daemon runs on this database", database=str(config.database))
        return ExitCode.FAILURE
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_serve(config, reload_config))
    return ExitCode.OK
