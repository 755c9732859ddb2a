"""The hasher on real files: both read paths and the b3sum child give BLAKE3, and a file that
changes while it is hashed is never stored as hashed, whichever path hashed it. Worker
processes give exactly what hashing in this process gives, survive being killed and never
deadlock on full pipes."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import blake3
import pytest
import xattr

from daemon import fs, hasher
from daemon.hasher import (
    CHILD_HASH_BYTES,
    PROCESS_MIN_FILES,
    SMALL_FILE,
    Hashed,
    HashProcesses,
    Unstable,
    hash_file,
    hash_group,
)
from daemon.index import Index
from daemon.model import Stat
from tests.conftest import wait_for
from tests.engine import HASH_WORKER, counters, many_small_files, processes, run_scan
from tests.oracle import diff, expected, indexed

needs_b3sum = pytest.mark.skipif(shutil.which("b3sum") is None, reason="b3sum is not installed")


def _hash(path: Path) -> bytes:
    return hash_file(os.fsencode(path), fs.lstat(os.fsencode(path))).digest


@pytest.mark.parametrize("size", [0, 1, SMALL_FILE, SMALL_FILE + 1, 5 * 1024 * 1024 + 7, CHILD_HASH_BYTES + 3])
def test_every_size_hashes_to_blake3(tmp_path: Path, size: int) -> None:
    data = os.urandom(min(size, 1 << 20)) * (size // (1 << 20) + 1)
    path = tmp_path / "f"
    path.write_bytes(data[:size])
    assert _hash(path) == blake3.blake3(data[:size]).digest()


@needs_b3sum
def test_a_large_file_is_hashed_by_b3sum_in_a_child(tmp_path: Path) -> None:
    path = tmp_path / "large"
    with path.open("wb") as f:
        f.truncate(CHILD_HASH_BYTES)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hasher._hash_in_child(fd, os.fsencode(path)) == blake3.blake3(bytes(CHILD_HASH_BYTES)).digest()
    finally:
        os.close(fd)


def _b3sum_children() -> list[int]:
    return processes(b"b3sum\0--raw", os.getpid())


def _hash_workers() -> list[int]:
    return processes(HASH_WORKER, os.getpid())


@needs_b3sum
def test_a_file_truncated_while_b3sum_maps_it_is_unstable_and_nothing_else_dies(tmp_path: Path) -> None:
    # 8 GiB of holes: long enough to hash (seconds) that the truncation lands mid-read, when
    # b3sum's next page access is beyond the new end of file: SIGBUS, in the child only.
    path = tmp_path / "sparse"
    with path.open("wb") as f:
        f.truncate(8 << 30)
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            outcome.append(_hash(path))
        except BaseException as e:  # what the test asserts on
            outcome.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    wait_for(_b3sum_children, what="b3sum child started")
    os.truncate(path, 4096)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Unstable), outcome
    assert _hash(path) == blake3.blake3(bytes(4096)).digest()  # and the process hashes on


# --- worker processes ---------------------------------------------------------------------


def _comparable(outcome: Hashed | Exception) -> object:
    if isinstance(outcome, Exception):
        return type(outcome), getattr(outcome, "errno", None)
    return outcome.digest, outcome.stat, outcome.xattrs


def _group(folder: Path, sizes: list[int], name: str = "f") -> list[tuple[bytes, Stat]]:
    folder.mkdir(exist_ok=True)
    group = []
    for i, size in enumerate(sizes):
        path = os.fsencode(folder / f"{name}{i:03d}")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        group.append((path, fs.lstat(path)))
    return group


def test_worker_processes_give_what_this_process_gives(tmp_path: Path) -> None:
    group = _group(tmp_path / "d", [0, 1, 4096, SMALL_FILE + 1, 70_000])
    xattr.set(group[2][0], b"user.rating", b"5")
    group[2] = (group[2][0], fs.lstat(group[2][0]))  # setting it moved the ctime
    vanished, fifo = group[3][0], group[4][0]
    os.unlink(vanished)
    os.unlink(fifo)
    os.mkfifo(fifo)  # same name, now a FIFO: never read, reported as moved
    procs = HashProcesses(2)
    try:
        answers = [procs.submit(group) for _ in range(4)]  # two for each worker
        assert len(_hash_workers()) == 2
        here = [_comparable(o) for o in hash_group(group)]
        assert here[2][2] == '{"user.rating": "5"}'  # type: ignore[index]
        assert here[3] == (FileNotFoundError, 2) and here[4] == (fs.Moved, None)
        for answer in answers:
            assert [_comparable(o) for o in answer.result()] == here
    finally:
        procs.close()
    assert _hash_workers() == []


def test_a_killed_worker_costs_only_time(tmp_path: Path) -> None:
    group = _group(tmp_path / "d", [1000 + i for i in range(64)])
    digests = [blake3.blake3(Path(os.fsdecode(p)).read_bytes()).digest() for p, _ in group]
    procs = HashProcesses(1)
    try:
        assert [o.digest for o in procs.submit(group).result() if isinstance(o, Hashed)] == digests
        (worker,) = _hash_workers()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not _hash_workers(), what="the worker to die")
        # Sent to a dead worker, or waited for from one: hashed here instead, all of them.
        answers = [procs.submit(group) for _ in range(3)]
        for answer in answers:
            assert [o.digest for o in answer.result() if isinstance(o, Hashed)] == digests
    finally:
        procs.close()


def test_workers_run_this_treewatch_whatever_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -c` puts the current folder first on sys.path: run from another checkout, the
    # workers would import its `daemon` and hash by its rules.
    other = tmp_path / "checkout" / "daemon"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("")
    marker = tmp_path / "other-code-ran"
    (other / "hasher.py").write_text(f"def serve(*fds):\n    open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(other.parent)
    group = _group(tmp_path / "d", [10, 20])
    procs = HashProcesses(1)
    try:
        assert [_comparable(o) for o in procs.submit(group).result()] == [_comparable(o) for o in hash_group(group)]
    finally:
        procs.close()
    assert not marker.exists()


@pytest.mark.timeout(120)
def test_full_pipes_both_ways_do_not_deadlock(tmp_path: Path) -> None:
    # Long names make each group ~17 KB to send; a 2 KB xattr on every file makes each answer
    # ~140 KB. All groups are sent before any answer is read: the worker fills the result pipe
    # within a few groups and blocks; the scan then fills the request pipe and must read.
    group = _group(tmp_path / "d", [100] * 64, name="n" * 200)
    for path, _ in group:
        xattr.set(path, b"user.note", b"x" * 2048)
    group = [(path, fs.lstat(path)) for path, _ in group]
    here = [_comparable(o) for o in hash_group(group)]
    procs = HashProcesses(1)
    try:
        answers = [procs.submit(group) for _ in range(150)]
        for answer in answers:
            assert [_comparable(o) for o in answer.result()] == here
    finally:
        procs.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="worker processes leave one core to the scan")
def test_a_first_index_of_many_small_files_hashes_in_workers_and_resumes(
    library: Path, db: Path, tmp_path: Path
) -> None:
    files = PROCESS_MIN_FILES + 3000
    total = many_small_files(library, files)
    index = Index(db)
    stop = threading.Event()
    outcome: list[object] = []

    def first_scan() -> None:
        from daemon.config import RootConfig, SyncConfig
        from daemon.model import ScanScope
        from daemon.scan import scan

        rb = os.fsencode(library)
        outcome.append(
            scan(Index(db), RootConfig(path=library), [ScanScope(rb, b"")], SyncConfig(hash_workers=2), stop=stop)
        )

    scanning = threading.Thread(target=first_scan)
    scanning.start()
    wait_for(lambda: _hash_workers() or not scanning.is_alive(), interval=0.002, what="a worker process")
    assert _hash_workers(), "the scan finished before a worker was seen: make the corpus larger"
    stop.set()  # as on SIGTERM: the scan stops, its workers end with it
    scanning.join(timeout=60)
    assert not scanning.is_alive() and outcome[0].interrupted  # type: ignore[attr-defined]
    assert _hash_workers() == []

    report = run_scan(index, library)
    assert report.clean and _hash_workers() == []
    assert diff(expected(library), indexed(db, library)) == []
    assert counters(index)["files_hashed"] == files
    assert counters(index)["bytes_hashed"] == total  # nothing committed was hashed again
