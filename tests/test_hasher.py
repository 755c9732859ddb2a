"""The hasher on real files: both read paths and the b3sum child give BLAKE3, and a file that
changes while it is hashed is never stored as hashed, whichever path hashed it."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import blake3
import pytest

from daemon import fs, hasher
from daemon.hasher import CHILD_HASH_BYTES, SMALL_FILE, Unstable, hash_file
from tests.conftest import wait_for

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
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if fields[1] == me and comm == "b3sum":
            found.append(int(pid))
    return found


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
