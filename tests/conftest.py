"""Shared fixtures: everything real (files in tmp_path, SQLite, subprocesses); no mocks."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def library(tmp_path: Path) -> Path:
    root = tmp_path / "library"
    root.mkdir()
    return root


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "index.db"


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> object:
    """Poll ``condition`` until it is truthy or ``timeout`` passes (then fail, saying what)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(interval)


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")
QUEUE_LOCK = "/tmp/treewatch-max_queued_events.lock"


@contextlib.contextmanager
def lowered_queue(limit: int) -> Iterator[None]:
    """fs.inotify.max_queued_events applies per instance at inotify_init: lower it just for that.

    It is global, so concurrent test runs take a lock first: otherwise one could read another's
    lowered value as the "original" and leave the machine with a 16-event queue.
    """
    with open(QUEUE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        original = MAX_QUEUED.read_text()
        MAX_QUEUED.write_text(str(limit))
        try:
            yield
        finally:
            MAX_QUEUED.write_text(original)
