"""The scheduler's worker against a real index, a real watcher and real scans: when rounds are taken.

The events are put into the root's aggregator with chosen (monotonic) times rather than made by
writing files at chosen moments, so what is asserted does not depend on how busy the machine is;
the scans themselves are real and are only observed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from daemon.aggregate import COALESCE_FRACTION
from daemon.config import Config, RootConfig, SyncConfig, WatchConfig
from daemon.index import Index
from daemon.model import ScanScope
from daemon.scheduler import RootRuntime, Scheduler

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
    rounds: list[tuple[float, list[bytes]]] = []

    async def scenario() -> None:
        scheduler = Scheduler(config, threading.Event())
        real_scan = scheduler._scan

        async def observed(rt: RootRuntime, scopes: list[ScanScope]) -> None:
            rounds.append((time.monotonic(), [s.subtree for s in scopes]))
            await real_scan(rt, scopes)

        scheduler._scan = observed  # type: ignore[method-assign]
        await scheduler.start()
        try:
            rt = scheduler.roots[os.fsencode(library)]
            t0 = time.monotonic()
            # The first event wakes the worker, which goes to sleep until its window closes
            # (t0 + 1.0); the rest arrive while it sleeps and do not wake it (Scheduler.on_event),
            # their windows closing at t0 + 1.04 and + 1.08: one burst. late.jpg's closes 0.15 s
            # after the first, beyond the slack: a round of its own.
            rt.aggregator.add(names[0], t0)
            rt.wake.set()
            while rt.sleep_until != t0 + DEBOUNCE_S and time.monotonic() < t0 + 0.5:
                await asyncio.sleep(0.001)
            assert rt.sleep_until == t0 + DEBOUNCE_S
            for name, at in zip(names[1:], (0.04, 0.08, 0.15), strict=True):
                rt.aggregator.add(name, t0 + at)
            deadline = time.monotonic() + 30
            while (len(rounds) < 2 or rt.scanning is not None) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            await scheduler.drain()
            await scheduler.close()
        assert [subtrees for _, subtrees in rounds] == [names[:3], names[3:]]
        # Nothing was scanned before its own quiet window closed.
        assert rounds[0][0] >= t0 + 0.08 + DEBOUNCE_S
        assert rounds[1][0] >= t0 + 0.15 + DEBOUNCE_S

    asyncio.run(scenario())
    index = Index(db)
    try:
        root = index.root(os.fsencode(library), create=False)
        assert root is not None
        assert all(index.entry(root.id, name) is not None for name in names)
    finally:
        index.close()
