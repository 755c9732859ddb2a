"""A private mount namespace for tests that mount and unmount (tmpfs, loop images, bind mounts).

`unshare -m --propagation private`, kept alive by a `sleep`; each step enters it with `nsenter`,
so nothing leaks to the host. A process started inside it (`prefix`) sees its mounts; the test
itself sees the tree as that process does through ``/proc/<pid>/root``.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.oracle import Row, expected

REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root with unshare/nsenter: mounts filesystems in a private mount namespace",
)
CLONE_FS, CLONE_NEWNS = 0x00000200, 0x00020000
_libc = ctypes.CDLL(None, use_errno=True)
# What a freshly made ext4 holds that the index leaves out by default (config.DEFAULT_EXCLUDE).
FS_JUNK = (b"lost+found",)


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class Namespace:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "3600"])
        # Until unshare has run, the process is still in our namespace: entering it then
        # would mount on the host. Its namespace link differs from ours once it has.
        mine = os.readlink("/proc/self/ns/mnt")
        wait_for(lambda: _ns_of(self.proc.pid) not in (mine, None), timeout=10, what="the private namespace")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", *cmd],
            capture_output=True, text=True, check=False, env=env, timeout=120,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: exit {result.returncode}: {result.stderr}")
        return result

    def sh(self, script: str) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script)

    @property
    def prefix(self) -> list[str]:
        """Run a command inside this namespace (a daemon the test starts)."""
        return ["nsenter", "-t", str(self.proc.pid), "-m", "--"]

    def enter_this_thread(self) -> None:
        """Move the calling thread into the namespace, as a user's shell on the box would be.

        Through /proc/<pid>/root a mount point of the namespace is a plain folder: renaming or
        removing it from outside detaches the mount (Linux since 3.18 lazily unmounts what is
        unlinked from another namespace). Inside, it is busy (EBUSY), as for the daemon. setns()
        into a mount namespace needs a thread that shares no filesystem attributes: unshare
        CLONE_FS first (Python 3.11's os has neither call)."""
        if _libc.unshare(CLONE_FS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_FS)")
        fd = os.open(f"/proc/{self.proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNS) != 0:
                raise OSError(ctypes.get_errno(), "setns(CLONE_NEWNS)")
        finally:
            os.close(fd)

    def view(self, path: Path) -> Path:
        """``path`` as a process of the namespace sees it, from outside."""
        return Path(f"/proc/{self.proc.pid}/root{path}")

    def expected(self, root: Path) -> dict[bytes, Row]:
        """The oracle's rows for ``root`` as the namespace sees it, under the root's own path."""
        view = os.fsencode(self.view(root))
        rows = expected(self.view(root), exclude_names=FS_JUNK)
        return {os.fsencode(root) + k[len(view) :]: v for k, v in rows.items()}

    def tw(self, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "daemon", "--db", str(db), *args, check=False)

    def status(self, db: Path) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.tw(db, "status", "--json").stdout)
        return out

    def ext4(self, image: Path, size_mb: int = 16) -> Path:
        """A fresh ext4 image file (mounted with `mount -o loop`, which takes a free loop device)."""
        with image.open("wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        return image

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
