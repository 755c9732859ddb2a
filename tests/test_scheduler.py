"""The scheduler's worker against a real index, a real watcher and real scans: when rounds are taken.

The events are put into the root's aggregator with chosen (monotonic) times rather than made by
writing files at chosen moments, so what is asserted does not depend on how busy the machine is;
the scans themselves are real and are only observed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import logs, queries
from daemon.aggregate import COALESCE_FRACTION
from daemon.config import Config, RootConfig, SyncConfig, WatchConfig
from daemon.events import EventKind, WatchEvent
from daemon.index import Index
from daemon.logs import MessageId
from daemon.scheduler import Scheduler

DEBOUNCE_S = 1.0  # the slack is then 0.1 s


def test_a_burst_is_one_scan_taken_when_its_last_window_closes(library: Path, db: Path) -> None:
    names = [b"a.jpg", b"b.jpg", b"c.jpg", b"late.jpg"]
    for name in names:
        (library / os.fsdecode(name)).write_bytes(name * 100)
    config = Config(
        database=db,
        roots=(RootConfig(path=library),),
        watch=WatchConfig(debounce_s=DEBOUNCE_S, max_delay_s=10.0),
        sync=SyncConfig(full_interval_s=0, startup=False),
    )
    assert 0.08 < DEBOUNCE_S * COALESCE_FRACTION < 0.15  # the times below straddle the slack
    started: list[float] = []

    async def scenario() -> None:
        scheduler = Scheduler(config, threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            t0 = time.monotonic()
            started.append(time.time())
            # The first event wakes the worker, which goes to sleep until its window closes
            # (t0 + 1.0); the rest arrive while it sleeps and do not wake it (Scheduler.on_event),
            # their windows closing at t0 + 1.04 and + 1.08: one burst. late.jpg's closes 0.15 s
            # after the first, beyond the slack: a round of its own.
            rt.aggregator.add(names[0], t0)
            rt.wake.set()
            await _until(lambda: rt.sleep_until == t0 + DEBOUNCE_S, 0.5, "the worker to sleep until the window")
            for name, at in zip(names[1:], (0.04, 0.08, 0.15), strict=True):
                rt.aggregator.add(name, t0 + at)
            await _until(lambda: rt.aggregator.pending == 0 and rt.scanning is None, 30, "both rounds")
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())
    index = Index(db)
    try:
        # Each round is one scan, recorded with its scopes and when it started.
        rounds = [(at, [os.fsencode(p) for p, _ in json.loads(scopes)])
                  for scopes, at in index.db.execute("SELECT scopes, started_at FROM scans ORDER BY id")]  # fmt: skip
        root = index.root(os.fsencode(library), create=False)
        assert root is not None
        assert all(index.entry(root.id, name) is not None for name in names)
    finally:
        index.close()
    assert [subtrees for _, subtrees in rounds] == [names[:3], names[3:]]
    # Nothing was scanned before its own quiet window closed (wall clock, as the table has it).
    assert rounds[0][0] >= started[0] + 0.08 + DEBOUNCE_S - 0.01
    assert rounds[1][0] >= started[0] + 0.15 + DEBOUNCE_S - 0.01


def _config(library: Path, db: Path, **watch: float) -> Config:
    window = {"debounce_s": 0.2, "max_delay_s": 1.0, **watch}
    return Config(
        database=db,
        roots=(RootConfig(path=library),),
        watch=WatchConfig(debounce_s=window["debounce_s"], max_delay_s=window["max_delay_s"]),
        sync=SyncConfig(full_interval_s=0, startup=False),
    )


async def _until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.01)


def _log_to(stream: io.StringIO) -> None:
    logs.configure("debug", stream=stream)


def test_status_never_keeps_a_pending_count_the_daemon_no_longer_has(library: Path, db: Path) -> None:
    """Torture seed 20261202: `status` said "pending 1" for 90 s with nothing pending. An event
    that arrived while `publish` awaited its first write was written, while the snapshot it
    recorded as published said 0; once the path was scanned the two matched again and the count
    was never rewritten. The event is delivered at exactly that point: right after the publish
    task's first step, which ends at that write."""
    (library / "a.jpg").write_bytes(b"a")

    async def scenario() -> None:
        scheduler = Scheduler(_config(library, db), threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            await scheduler.publish(os.getpid(), time.time(), "starting")  # nothing pending
            event = WatchEvent(EventKind.CHANGED, b"a.jpg")
            # A new state, so this publish writes; the event comes during its first write.
            publishing = asyncio.ensure_future(scheduler.publish(os.getpid(), time.time(), "watching"))
            asyncio.get_running_loop().call_soon(scheduler.on_event, rt, event)
            await publishing
            await _until(lambda: rt.aggregator.pending == 0 and rt.scanning is None, 30, "the event's scan")
            await scheduler.publish(os.getpid(), time.time(), "watching")
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())
    index = Index(db, readonly=True)
    try:
        root = queries.status(index, Config(database=db))["roots"][0]
    finally:
        index.close()
    assert (root["pending"], root["oldest_pending_s"], root["pending_paths"]) == (0, None, [])


def test_a_round_the_worker_missed_is_logged_and_scanned_by_the_guard(library: Path, db: Path) -> None:
    """A stall of any cause: an event put into the aggregator without waking the worker, which
    sleeps with nothing else to do (for an hour). The guard finds the path past its deadline,
    says so once with its MESSAGE_ID, and has it scanned; `status` showed its age meanwhile."""
    (library / "late.jpg").write_bytes(b"late")
    out = io.StringIO()
    _log_to(out)
    shown: list[dict[str, object]] = []

    async def scenario() -> None:
        scheduler = Scheduler(_config(library, db), threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            await _until(lambda: rt.sleeping, 10, "the worker to sleep")
            first = time.monotonic()
            rt.aggregator.add(b"late.jpg", first)  # no wake: what a lost wake-up looks like
            await _until(lambda: time.monotonic() > first + 1.2, 5, "the path to be past its deadline")
            await scheduler.publish(os.getpid(), time.time(), "watching")
            index = Index(db, readonly=True)
            try:
                shown.append(queries.status(index, Config(database=db))["roots"][0])
            finally:
                index.close()
            # Past its deadline (1 s) plus the margin, the guard looks within GUARD_EVERY_S.
            await _until(lambda: rt.index.entry(1, b"late.jpg") is not None, 10, "the guard to have it scanned")
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())
    assert shown[0]["pending"] == 1 and shown[0]["pending_paths"] == [str(library / "late.jpg")]
    assert isinstance(shown[0]["oldest_pending_s"], float) and shown[0]["oldest_pending_s"] >= 1.0
    late = [line for line in out.getvalue().splitlines() if MessageId.ROUND_LATE in line]
    assert len(late) == 1 and "late.jpg" in late[0], out.getvalue()[-2000:]


def test_a_worker_that_ends_is_said_so_and_started_again(library: Path, db: Path) -> None:
    """Its task cancelled (any end but shutdown): logged with its MESSAGE_ID, started again with
    a full sync of the root, and events after that are scanned as before."""
    out = io.StringIO()
    _log_to(out)

    async def scenario() -> None:
        scheduler = Scheduler(_config(library, db), threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            ended = rt.task
            assert ended is not None
            ended.cancel()
            await _until(lambda: rt.task is not ended and rt.task is not None and not rt.task.done(), 10,
                         "the worker to be started again")  # fmt: skip
            (library / "after.jpg").write_bytes(b"after")
            await _until(lambda: rt.index.entry(1, b"after.jpg") is not None, 10, "the new file to be indexed")
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())
    ended_lines = [line for line in out.getvalue().splitlines() if MessageId.WORKER_ENDED in line]
    assert len(ended_lines) == 1 and "cancelled" in ended_lines[0], out.getvalue()[-2000:]


_rel = st.sampled_from([b"a", b"b", b"a/x", b"a/y", b"b/x", b"c/d/e"])
_event = st.one_of(
    st.builds(WatchEvent, st.just(EventKind.CHANGED), _rel),
    st.builds(WatchEvent, st.just(EventKind.CREATED_DIR), _rel, is_dir=st.just(True)),
    st.builds(WatchEvent, st.just(EventKind.DELETED), _rel, is_dir=st.booleans()),
    # The watcher reports a move with one end outside the root as a change or a deletion.
    st.builds(WatchEvent, st.just(EventKind.MOVED), _rel, _rel, is_dir=st.booleans()),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(_event, st.sampled_from([0.0, 0.001, 0.01])), min_size=1, max_size=25))
def test_after_every_event_the_worker_sleeps_no_later_than_the_next_round(
    tmp_path_factory: pytest.TempPathFactory, events: list[tuple[WatchEvent, float]]
) -> None:
    """Whatever arrives, through the watcher's own entry point (`on_event`), a sleeping worker
    has set its alarm no later than the aggregator's next round: a wake-up is never lost. The
    window (2 s) is shorter than the worker's other alarm (the root's identity check, 5 s) and
    longer than an example, so the round is what it must wake for, and rarely comes."""
    work = tmp_path_factory.mktemp("wake")
    library = work / "library"
    library.mkdir()

    async def scenario() -> None:
        scheduler = Scheduler(_config(library, work / "index.db", debounce_s=2.0, max_delay_s=4.0), threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            await _until(lambda: rt.sleeping, 10, "the worker to sleep")
            for event, gap in events:
                await asyncio.sleep(gap)
                scheduler.on_event(rt, event)
                # Woken or not, it is asleep again with its wake event consumed (it clears it
                # before it sleeps): what it set its alarm to is now what it will do.
                await _until(lambda: rt.sleeping and not rt.wake.is_set(), 10, "the worker to sleep again")
                next_due = rt.aggregator.next_due()
                assert next_due is not None and rt.sleep_until <= next_due
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())


def test_an_overflow_storm_is_one_line_a_minute_and_every_overflow_counts(library: Path, db: Path) -> None:
    """Through a storm the queue overflows every few seconds: the first is logged with the
    sysctl to raise, the others within the minute are counted, and `status` counts them all."""
    out = io.StringIO()
    _log_to(out)
    counted: list[int] = []

    async def scenario() -> None:
        scheduler = Scheduler(_config(library, db), threading.Event())
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            for _ in range(5):
                scheduler.on_event(rt, WatchEvent(EventKind.OVERFLOW, detail="the inotify event queue overflowed"))
            counted.append(rt.overflows)
        finally:
            await scheduler.drain()
            await scheduler.close()

    asyncio.run(scenario())
    assert counted == [5]
    lines = [line for line in out.getvalue().splitlines() if MessageId.OVERFLOW in line]
    assert len(lines) == 1 and "overflows_not_logged" not in lines[0], out.getvalue()[-2000:]


@pytest.mark.parametrize(
    ("times", "logged"),
    [
        ([0.0], [0]),  # the first is logged
        ([0.0, 1.0, 59.9], [0, None, None]),  # the rest of the minute counted
        ([0.0, 1.0, 59.9, 60.0], [0, None, None, 2]),  # the next line says how many it stands for
        ([0.0, 30.0, 61.0, 90.0, 125.0], [0, None, 1, None, 1]),  # a minute from the last line logged
        ([100.0, 500.0], [0, 0]),  # apart: each its own line
    ],
)
def test_a_throttled_line_is_logged_once_per_interval_with_the_count_it_stands_for(
    times: list[float], logged: list[int | None]
) -> None:
    throttle = logs.Throttle(60.0)
    assert [throttle.tell(now) for now in times] == logged
