"""Offline roots: an unmounted, missing or emptied root deletes nothing, and coming back
re-syncs without re-hashing.

The mount cases run inside a private mount namespace (`unshare -m --propagation private`,
kept alive by a `sleep`; each step enters it with `nsenter`), so nothing leaks to the host.
The tmpfs is mounted at a hidden place and bind-mounted onto the root, so unmounting the
bind keeps the files for the remount.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.engine import settle
from tests.oracle import cli, diff, expected, indexed

REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root with unshare/nsenter: mounts a tmpfs in a private mount namespace",
)


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


class Namespace:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "600"])
        # Until unshare has run, the process is still in our namespace: entering it then
        # would mount on the host. Its namespace link differs from ours once it has.
        mine = os.readlink("/proc/self/ns/mnt")
        wait_for(lambda: _ns_of(self.proc.pid) not in (mine, None), timeout=10, what="the private namespace")

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "--", *cmd],
            capture_output=True, text=True, check=check, env=env, timeout=120,
        )  # fmt: skip

    def tw(self, db: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "daemon", "--db", str(db), *args, check=False)

    def status(self, db: Path) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.tw(db, "status", "--json").stdout)
        return out

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    n = Namespace()
    yield n
    n.close()


def make_files(ns: Namespace, where: Path) -> None:
    ns.run("sh", "-c", f"mkdir -p '{where}/sub' && head -c 300000 /dev/urandom > '{where}/big' && "
           f"echo hello > '{where}/sub/small' && ln -s big '{where}/link' && touch -d '1 hour ago' "
           f"'{where}/big' '{where}/sub/small' '{where}/sub'")  # fmt: skip


def entry_count(db: Path) -> int:
    return len(cli(db, "ls", "--json").stdout.splitlines())


@needs_root
def test_unmounted_root_is_offline_and_comes_back_without_rehash(tmp_path: Path, ns: Namespace) -> None:
    hidden, root, db = tmp_path / "hidden", tmp_path / "lib", tmp_path / "index.db"
    hidden.mkdir()
    root.mkdir()
    ns.run("mount", "-t", "tmpfs", "-o", "size=16m", "tw-test", str(hidden))
    make_files(ns, hidden)
    ns.run("mount", "--bind", str(hidden), str(root))
    first = ns.tw(db, "scan", "--root", str(root))
    assert first.returncode == 0, first.stderr
    before = ns.status(db)
    rows = entry_count(db)
    assert rows == 4
    seq = before["seq"]

    ns.run("umount", str(root))  # the mount point is now an empty folder on the parent's device
    gone = ns.tw(db, "scan", "--root", str(root))
    assert gone.returncode == 1
    assert "offline" in gone.stderr and "nothing was deleted" in gone.stderr
    st = ns.status(db)
    assert st["roots"][0]["state"] == "offline" and st["roots"][0]["offline_reason"]
    assert entry_count(db) == rows  # zero rows deleted
    assert st["seq"] == seq  # and nothing in the feed

    ns.run("mount", "--bind", str(hidden), str(root))
    back = ns.tw(db, "scan", "--root", str(root))
    assert back.returncode == 0, back.stderr
    after = ns.status(db)
    assert after["roots"][0]["state"] == "online"
    assert after["counters"]["files_hashed"] == before["counters"]["files_hashed"]
    assert after["counters"]["bytes_hashed"] == before["counters"]["bytes_hashed"]
    assert after["seq"] == seq  # nothing changed, so nothing in the feed either


@needs_root
def test_unmounted_between_walk_and_deletions_deletes_nothing(tmp_path: Path, ns: Namespace) -> None:
    """Step 3 re-checks the root: unmount it at the moment the scan enters its deleting phase
    (the scan's own progress hook) while deletions are pending."""
    hidden, root, db = tmp_path / "hidden", tmp_path / "lib", tmp_path / "index.db"
    hidden.mkdir()
    root.mkdir()
    ns.run("mount", "-t", "tmpfs", "-o", "size=16m", "tw-test", str(hidden))
    make_files(ns, hidden)
    ns.run("sh", "-c", f"mkdir '{hidden}/doomed' && for i in 1 2 3; do echo $i > '{hidden}/doomed/f'$i; done")
    ns.run("mount", "--bind", str(hidden), str(root))
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    rows = entry_count(db)
    ns.run("rm", "-r", str(root / "doomed"))  # four deletions pending for the next scan

    script = textwrap.dedent(f"""
        import json, subprocess
        from pathlib import Path
        from daemon.config import RootConfig, SyncConfig
        from daemon.index import Index
        from daemon.model import ScanScope
        from daemon.scan import NoProgress, scan

        class UnmountBeforeDeleting(NoProgress):
            def phase(self, root, phase):
                if phase == "deleting":
                    subprocess.run(["umount", {str(root)!r}], check=True)

        index = Index(Path({str(db)!r}))
        report = scan(index, RootConfig(Path({str(root)!r})), [ScanScope({os.fsencode(root)!r})],
                      SyncConfig(batch_size=2), progress=UnmountBeforeDeleting())
        print(json.dumps({{"offline": report.offline, "deleted": report.ops["deleted"]}}))
    """)
    out = ns.run(sys.executable, "-c", script)
    report = json.loads(out.stdout)
    assert report["offline"] and report["deleted"] == 0
    assert entry_count(db) == rows
    assert ns.status(db)["roots"][0]["state"] == "offline"

    ns.run("mount", "--bind", str(hidden), str(root))
    again = ns.tw(db, "scan", "--root", str(root))
    assert again.returncode == 0, again.stderr
    assert entry_count(db) == rows - 4  # mounted again: now the deletions are real


def test_root_renamed_away_is_offline(library: Path, db: Path, tmp_path: Path) -> None:
    (library / "a").write_bytes(b"a" * 1000)
    (library / "d").mkdir()
    (library / "d" / "b").write_bytes(b"b")
    settle(library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    hashed = json.loads(cli(db, "status", "--json").stdout)["counters"]["files_hashed"]
    os.rename(library, tmp_path / "away")
    result = cli(db, "scan", "--root", str(library), check=False)
    assert result.returncode == 1 and "offline" in result.stderr and "missing" in result.stderr
    status = json.loads(cli(db, "status", "--json").stdout)
    assert status["roots"][0]["state"] == "offline"
    assert entry_count(db) == 3
    os.rename(tmp_path / "away", library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    status = json.loads(cli(db, "status", "--json").stdout)
    assert status["roots"][0]["state"] == "online"
    assert status["counters"]["files_hashed"] == hashed
    assert diff(expected(library), indexed(db, library)) == []


def test_root_replaced_by_empty_folder_is_offline(library: Path, db: Path, tmp_path: Path) -> None:
    (library / "a").write_bytes(b"a" * 1000)
    settle(library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    os.rename(library, tmp_path / "away")
    library.mkdir()
    result = cli(db, "scan", "--root", str(library), check=False)
    assert result.returncode == 1 and "offline" in result.stderr and "empty" in result.stderr
    assert entry_count(db) == 1
    assert json.loads(cli(db, "status", "--json").stdout)["roots"][0]["state"] == "offline"
    library.rmdir()
    os.rename(tmp_path / "away", library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert json.loads(cli(db, "status", "--json").stdout)["counters"]["files_hashed"] == 1


def test_root_replaced_by_a_file_is_offline(library: Path, db: Path, tmp_path: Path) -> None:
    (library / "a").write_bytes(b"a")
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    os.rename(library, tmp_path / "away")
    library.write_bytes(b"not a folder")
    result = cli(db, "scan", "--root", str(library), check=False)
    assert result.returncode == 1 and "not a folder" in result.stderr
    assert entry_count(db) == 1
