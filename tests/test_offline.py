"""Offline roots: an unmounted, missing or emptied root deletes nothing, and coming back
re-syncs without re-hashing.

The mount cases run inside a private mount namespace (tests/mount_harness.py), so nothing leaks
to the host. The tmpfs is mounted at a hidden place and bind-mounted onto the root, so unmounting
the bind keeps the files for the remount.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine import settle
from tests.mount_harness import Namespace, needs_root
from tests.oracle import cli, diff, expected, indexed


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
