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


class _QueueLock:
    depth = 0  # holds by this process: the first takes the lock, the last lets it go


@contextlib.contextmanager
def queue_sysctl_held() -> Iterator[None]:
    """No other run of this suite on the machine changes fs.inotify.max_queued_events meanwhile.

    The value is global, and every run takes this lock before changing it: a test that checks
    the value a message names, or that the value was put back, holds it until it has checked.
    Nested holds in one process take the lock once (a second flock, on a new descriptor of the
    same file, would wait for the first forever).
    """
    with contextlib.ExitStack() as stack:
        if not _QueueLock.depth:
            lock = stack.enter_context(open(QUEUE_LOCK, "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)
        _QueueLock.depth += 1
        try:
            yield
        finally:
            _QueueLock.depth -= 1


@contextlib.contextmanager
def lowered_queue(limit: int) -> Iterator[None]:
    """fs.inotify.max_queued_events applies per instance at inotify_init: lower it just for that.

    It is global, so concurrent test runs take a lock first: otherwise one could read another's
    lowered value as the "original" and leave the machine with a 16-event queue.
    """
    with queue_sysctl_held():
        original = MAX_QUEUED.read_text()
        MAX_QUEUED.write_text(str(limit))
        try:
            yield
        finally:
            MAX_QUEUED.write_text(original)


def pytest_addoption(parser: pytest.Parser) -> None:
    # `make torture SEED=… DURATION=…` (tests/test_torture.py); without a seed one is drawn and printed.
    group = parser.getgroup("torture", "the differential torture suite (tests/test_torture.py)")
    group.addoption("--torture-seed", type=int, default=None, help="seed of the random operation sequences")
    group.addoption("--torture-duration", type=float, default=20.0, help="seconds of random operations")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.torture_ops import FIGURES

    if FIGURES.used:
        for line in FIGURES.table():
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The torture tests run for --torture-duration: their timeout grows with it.
    budget = 3 * float(config.getoption("--torture-duration")) + 600
    for item in items:
        if item.nodeid.startswith("tests/test_torture.py"):
            item.add_marker(pytest.mark.timeout(budget))
