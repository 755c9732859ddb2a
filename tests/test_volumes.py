"""Volumes: filesystems mounted below a root (a loop-mounted ext4 image, a tmpfs, a bind mount).
Unmounted, replaced or emptied, a volume is offline: no scan deletes anything below it, the feed
says nothing, `status` shows it; mounted again, it is synced without re-hashing.

Real mounts in a private mount namespace (tests/mount_harness.py); the index is read from
outside it, the disk through /proc/<pid>/root.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.logs import MessageId
from tests.daemon_harness import Daemon, write_config
from tests.mount_harness import Namespace, needs_root
from tests.oracle import diff, indexed

pytestmark = needs_root


@pytest.fixture
def ns() -> Iterator[Namespace]:
    n = Namespace()
    yield n
    n.close()


def fill(ns: Namespace, where: Path, tag: str, files: int = 10) -> None:
    """Files an hour old (none racily clean), in a subfolder too."""
    ns.sh(f"mkdir -p '{where}/sub' && for i in $(seq 1 {files}); do head -c $((i * 1000)) /dev/urandom > "
          f"'{where}/{tag}'$i; done && echo {tag} > '{where}/sub/{tag}.txt' && "
          f"touch -d '1 hour ago' '{where}'/* '{where}/sub/{tag}.txt'")  # fmt: skip


def rows(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT count(*) FROM entries").fetchone()[0])


def volume(status: dict[str, Any], path: Path) -> dict[str, Any]:
    found: list[dict[str, Any]] = [v for v in status["roots"][0]["volumes"] if v["path"] == str(path)]
    assert len(found) == 1, status["roots"][0]["volumes"]
    return found[0]


def hashed(status: dict[str, Any]) -> tuple[int, int]:
    return status["counters"]["files_hashed"], status["counters"]["bytes_hashed"]


def matches_disk(ns: Namespace, db: Path, root: Path) -> list[str]:
    return diff(ns.expected(root), indexed(db, root))


def library_with_usb(ns: Namespace, tmp_path: Path, root_files: int | None = 2) -> tuple[Path, Path, Path, Path]:
    """A library whose folder `usb` is an ext4 image loop-mounted and filled with photos, and
    ``root_files`` files beside it: (root, database path, mount point, image)."""
    root, db = tmp_path / "lib", tmp_path / "index.db"
    usb = root / "usb"
    usb.mkdir(parents=True)
    image = ns.ext4(tmp_path / "usb.img")
    ns.run("mount", "-o", "loop", str(image), str(usb))
    fill(ns, usb, "photo")
    if root_files is not None:
        fill(ns, root, "root", files=root_files)
    return root, db, usb, image


def test_ext4_volume_unmounted_is_offline_and_comes_back_on_another_loop_device_without_rehash(
    tmp_path: Path, ns: Namespace
) -> None:
    root, db, usb, image = library_with_usb(ns, tmp_path)
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    before = ns.status(db)
    v = volume(before, usb)
    assert (v["state"], v["fs_type"], v["entries"]) == ("online", "ext4", 12)
    count, seq = rows(db), before["seq"]

    ns.run("umount", str(usb))
    gone = ns.tw(db, "scan", "--root", str(root))
    assert gone.returncode == 1, gone.stderr
    assert "volume is offline: nothing below it was deleted" in gone.stderr and str(usb) in gone.stderr
    assert "0 deleted" in gone.stdout
    st = ns.status(db)
    v = volume(st, usb)
    assert v["state"] == "offline" and "not mounted" in v["offline_reason"] and v["entries"] == 12
    assert st["roots"][0]["state"] == "online"
    assert rows(db) == count and st["seq"] == seq, "rows deleted or announced while the volume was away"
    metrics = ns.tw(db, "status", "--prometheus").stdout
    assert f'treewatch_volume_online{{root="{root}",path="{usb}",fs_type="ext4"}} 0' in metrics, metrics
    # A scan of the volume alone, or of a folder in it, finds nothing to delete either.
    for scope in (usb, usb / "sub"):
        scoped = ns.tw(db, "scan", "--root", str(root), str(scope))
        assert scoped.returncode == 1 and "0 deleted" in scoped.stdout, scoped.stdout + scoped.stderr
    # What is written into the bare mount point meanwhile is not the volume's: left alone.
    ns.sh(f"echo stray > '{usb}/stray' && echo new > '{root}/while-away' && touch -d '1 hour ago' '{root}/while-away'")
    again = ns.tw(db, "scan", "--root", str(root))
    assert again.returncode == 1 and "1 added, 0 modified, 0 deleted" in again.stdout, again.stdout
    ns.run("rm", str(usb / "stray"))
    assert rows(db) == count + 1
    seq, hashed_before = ns.status(db)["seq"], hashed(ns.status(db))

    # Back on another loop device (another st_dev): the same filesystem id, nothing re-hashed,
    # and not one row in the feed (the rows take the new device number before the walk).
    busy = tmp_path / "busy.img"
    busy.write_bytes(b"\0" * 1024 * 1024)
    holder = ns.run("losetup", "--find", "--show", str(busy)).stdout.strip()
    try:
        ns.run("mount", "-o", "loop", str(image), str(usb))
        assert os.stat(ns.view(usb)).st_dev != v_dev(db, usb)
        back = ns.tw(db, "scan", "--root", str(root))
        assert back.returncode == 0, back.stderr
        assert "volume is back online" in back.stderr
        after = ns.status(db)
        assert volume(after, usb)["state"] == "online"
        assert hashed(after) == hashed_before, "unchanged files were hashed again"
        assert after["seq"] == seq, "the remount changed the feed"
        assert matches_disk(ns, db, root) == []
        ns.run("umount", str(usb))
    finally:
        ns.run("losetup", "-d", holder, check=False)


def v_dev(db: Path, path: Path) -> int:
    """The device number the index recorded for a volume."""
    with sqlite3.connect(db) as con:
        rel = os.fsencode(path.name)
        return int(con.execute("SELECT dev FROM volumes WHERE path = ?", (rel,)).fetchone()[0])


def test_tmpfs_volume_replaced_by_another_filesystem_or_an_empty_one_stays_offline(
    tmp_path: Path, ns: Namespace
) -> None:
    root, db = tmp_path / "lib", tmp_path / "index.db"
    t = root / "t"
    t.mkdir(parents=True)
    ns.run("mount", "-t", "tmpfs", "-o", "size=8m", "tw-vol", str(t))
    fill(ns, t, "a")
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    count, seq = rows(db), ns.status(db)["seq"]
    ns.run("umount", str(t))  # before volumes: "10 deleted", and 10 `deleted` rows in the feed
    away = ns.tw(db, "scan", "--root", str(root))
    assert away.returncode == 1 and "0 deleted" in away.stdout, away.stdout
    deleted = [c for c in ns.tw(db, "changes", "--since", "0", "--json").stdout.splitlines() if '"deleted"' in c]
    assert deleted == [] and rows(db) == count
    # A fresh tmpfs takes the freed anonymous device number again: only its filesystem id and its
    # entries tell it apart from the one recorded.
    ns.run("mount", "-t", "tmpfs", "-o", "size=8m", "tw-vol", str(t))
    empty = ns.tw(db, "scan", "--root", str(root))
    assert empty.returncode == 1 and "0 deleted" in empty.stdout
    assert "empty" in volume(ns.status(db), t)["offline_reason"]
    fill(ns, t, "b", files=3)
    other = ns.tw(db, "scan", "--root", str(root))
    assert other.returncode == 1 and "0 added" in other.stdout and "0 deleted" in other.stdout, other.stdout
    reason = volume(ns.status(db), t)["offline_reason"]
    assert "another filesystem" in reason, reason
    assert rows(db) == count and ns.status(db)["seq"] == seq
    ns.run("umount", str(t))


def test_bind_mount_volume_unmounted_and_bound_again(tmp_path: Path, ns: Namespace) -> None:
    """A folder of the root's own filesystem bound below the root: the same st_dev as the root,
    so only the mount table tells the unmounted folder from the volume."""
    root, src, other, db = tmp_path / "lib", tmp_path / "src", tmp_path / "other", tmp_path / "index.db"
    b = root / "b"
    for p in (b, src, other):
        p.mkdir(parents=True)
    fill(ns, src, "s")
    fill(ns, other, "o")
    ns.run("mount", "--bind", str(src), str(b))
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    before = ns.status(db)
    assert volume(before, b)["state"] == "online"
    count, seq = rows(db), before["seq"]
    ns.run("umount", str(b))
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 1
    assert volume(ns.status(db), b)["state"] == "offline" and rows(db) == count
    # Another folder of the same filesystem bound there: the same device and filesystem id,
    # another folder of it, other entries.
    ns.run("mount", "--bind", str(other), str(b))
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 1
    assert "another folder" in volume(ns.status(db), b)["offline_reason"]
    ns.run("umount", str(b))
    ns.run("mount", "--bind", str(src), str(b))
    back = ns.tw(db, "scan", "--root", str(root))
    assert back.returncode == 0, back.stderr
    after = ns.status(db)
    assert volume(after, b)["state"] == "online"
    assert hashed(after) == hashed(before) and after["seq"] == seq and rows(db) == count
    assert matches_disk(ns, db, root) == []
    ns.run("umount", str(b))


def test_volume_unmounted_between_walk_and_deletions_keeps_its_rows(tmp_path: Path, ns: Namespace) -> None:
    """Step 3 re-checks the volumes before every batch: the volume is unmounted at the moment the
    scan enters its deleting phase (its own progress hook), with deletions pending inside it and
    beside it. Those beside it are deleted; those inside it stay, with everything else there."""
    root, db, usb, _ = library_with_usb(ns, tmp_path, root_files=4)
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    count = rows(db)
    ns.sh(f"rm '{usb}/photo1' '{usb}/photo2' '{root}/root1' '{root}/root2'")
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
                    subprocess.run(["umount", {str(usb)!r}], check=True)

        index = Index(Path({str(db)!r}))
        report = scan(index, RootConfig(Path({str(root)!r})), [ScanScope({os.fsencode(root)!r})],
                      SyncConfig(batch_size=1), progress=UnmountBeforeDeleting())
        offline = [p.decode() for p in report.volumes_offline]
        print(json.dumps({{"deleted": report.ops["deleted"], "offline": offline}}))
    """)
    report = json.loads(ns.run(sys.executable, "-c", script).stdout)
    assert report == {"deleted": 2, "offline": ["usb"]}
    assert rows(db) == count - 2
    assert volume(ns.status(db), usb)["state"] == "offline"


def test_one_filesystem_leaves_other_filesystems_out(tmp_path: Path, ns: Namespace) -> None:
    root, db = tmp_path / "lib", tmp_path / "index.db"
    t = root / "t"
    t.mkdir(parents=True)
    fill(ns, root, "root", files=2)
    ns.run("mount", "-t", "tmpfs", "-o", "size=8m", "tw-vol", str(t))
    fill(ns, t, "a")
    config = tmp_path / "c.toml"
    config.write_text(f'database = "{db}"\n[[roots]]\npath = "{root}"\none_filesystem = true\n')
    scanned = ns.run(sys.executable, "-m", "daemon", "--config", str(config), "scan", check=False)
    assert scanned.returncode == 0, scanned.stderr
    paths = set(indexed(db, root))
    assert os.fsencode(root / "root1") in paths
    assert not any(p.startswith(os.fsencode(t)) for p in paths), "another filesystem was indexed"
    assert ns.status(db)["roots"][0]["volumes"] == []


def test_an_index_made_before_volumes_keeps_an_unplugged_disk(tmp_path: Path, ns: Namespace) -> None:
    """An index of schema 6 knew no volumes. The upgrade records every folder on another device
    than its parent as a possible volume; the first scan after it finds the disk unplugged (its
    mount point a plain folder) and deletes nothing."""
    root, db, usb, image = library_with_usb(ns, tmp_path, root_files=None)
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    count, seq = rows(db), ns.status(db)["seq"]
    with sqlite3.connect(db) as con:  # as an index of schema 6 was: nothing of 7 (volumes) or later
        con.execute("DROP TABLE volumes")
        con.execute("DROP TABLE replication")
        con.execute("ALTER TABLE scan_queue DROP COLUMN listing")
        con.execute("PRAGMA user_version = 6")
    ns.run("umount", str(usb))
    result = ns.tw(db, "scan", "--root", str(root))
    assert result.returncode == 1 and "volume is offline" in result.stderr, result.stderr
    assert rows(db) == count and ns.status(db)["seq"] == seq
    ns.run("mount", "-o", "loop", str(image), str(usb))
    assert ns.tw(db, "scan", "--root", str(root)).returncode == 0
    assert volume(ns.status(db), usb)["state"] == "online" and ns.status(db)["seq"] == seq
    ns.run("umount", str(usb))


# --- under the running daemon ---------------------------------------------------------------------


def in_index(d: Daemon, path: Path) -> bool:
    return os.fsencode(path) in indexed(d.db, d.roots[0])


def daemon_in(ns: Namespace, tmp_path: Path, root: Path, db: Path) -> Daemon:
    d = Daemon(write_config(tmp_path / "c.toml", db, [root]), db, [root], tmp_path / "d.log", prefix=ns.prefix)
    d.start()
    d.wait(lambda: d.quiet() and matches_disk(ns, db, root) == [], 60, "the first index")
    return d


def test_daemon_volume_unmounted_and_mounted_again(tmp_path: Path, ns: Namespace) -> None:
    root, db, usb, image = library_with_usb(ns, tmp_path)
    d = daemon_in(ns, tmp_path, root, db)
    try:
        assert volume(status_of(d), usb)["state"] == "online"
        count = rows(db)
        ns.run("umount", str(usb))  # an ext4 superblock's last unmount: IN_UNMOUNT on its watches
        d.wait(lambda: volume(status_of(d), usb)["state"] == "offline", 30, "the volume to go offline")
        d.wait(lambda: MessageId.VOLUME_OFFLINE in d.log(), 30, "the volume-offline journal entry")
        assert d.log().count(MessageId.VOLUME_OFFLINE) == 1
        assert rows(db) == count and "deleted" not in feed_ops(d)
        # The rest of the root is still synced; the bare mount point is not the volume's.
        ns.sh(f"echo beside > '{root}/beside' && echo stray > '{usb}/stray'")
        d.wait(lambda: in_index(d, root / "beside"), 30, "a change beside the offline volume")
        d.wait(d.quiet, 30, "the daemon to be idle")
        assert not in_index(d, usb / "stray") and rows(db) == count + 1
        ns.run("rm", str(usb / "stray"))
        hashed_before, seq = hashed(status_of(d)), status_of(d)["seq"]

        ns.run("mount", "-o", "loop", str(image), str(usb))
        d.wait(lambda: volume(status_of(d), usb)["state"] == "online", 30, "the volume to come back")
        d.wait(lambda: d.quiet() and matches_disk(ns, db, root) == [], 60, "convergence after the remount")
        assert MessageId.VOLUME_ONLINE in d.log()
        assert hashed(status_of(d)) == hashed_before, "unchanged files were hashed again"
        assert status_of(d)["seq"] == seq
        # Watched again: a file written on the volume now is indexed from its event.
        ns.sh(f"echo later > '{usb}/later'")
        d.wait(lambda: in_index(d, usb / "later"), 30, "a change on the remounted volume")
        assert "deleted" not in feed_ops(d)
        ns.run("umount", str(usb))
        d.wait(lambda: volume(status_of(d), usb)["state"] == "offline", 30, "offline again")
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        d.stop()


def test_daemon_picks_up_a_mount_appearing_below_the_root(tmp_path: Path, ns: Namespace) -> None:
    root, db = tmp_path / "lib", tmp_path / "index.db"
    (root / "new").mkdir(parents=True)
    fill(ns, root, "root", files=2)
    d = daemon_in(ns, tmp_path, root, db)
    try:
        # A mount makes no inotify event: the mount table's change is what says it.
        ns.sh(f"mount -t tmpfs -o size=8m tw-new '{root}/new' && mkdir '{root}/new/sub' && "
              f"echo a > '{root}/new/a' && echo b > '{root}/new/sub/b'")  # fmt: skip
        d.wait(lambda: in_index(d, root / "new" / "sub" / "b"), 30, "the new volume's files")
        d.wait(lambda: volume(status_of(d), root / "new")["state"] == "online", 30, "the new volume in status")
        ns.sh(f"echo c > '{root}/new/sub/c'")
        d.wait(lambda: in_index(d, root / "new" / "sub" / "c"), 30, "a change on the new volume (its watches)")
        d.wait(lambda: d.quiet() and matches_disk(ns, db, root) == [], 60, "convergence")
        count = rows(db)
        ns.run("umount", str(root / "new"))  # its content is gone for good: offline, kept
        d.wait(lambda: volume(status_of(d), root / "new")["state"] == "offline", 30, "the volume to go offline")
        assert rows(db) == count and "deleted" not in feed_ops(d)
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        d.stop()


def status_of(d: Daemon) -> dict[str, Any]:
    s = d.status()
    assert s is not None, d.log()[-3000:]
    return s


def feed_ops(d: Daemon) -> set[str]:
    return {json.loads(line)["op"] for line in d.cli("changes", "--since", "0", "--json").stdout.splitlines()}


@pytest.mark.skipif(shutil.which("bindfs") is None, reason="bindfs is not installed (make deps installs it)")
def test_daemon_polls_a_fuse_volume_below_an_inotify_root(tmp_path: Path, ns: Namespace) -> None:
    """A FUSE mount below the root (bindfs of a folder elsewhere): what is written to that folder
    directly, as another client of a network share would, makes no inotify event on the mount.
    The volume is synced every poll_interval_s (1 s here) while the root stays on inotify."""
    root, src, db = tmp_path / "lib", tmp_path / "src", tmp_path / "index.db"
    (root / "b").mkdir(parents=True)
    src.mkdir()
    fill(ns, src, "s", files=3)
    ns.run("bindfs", str(src), str(root / "b"))
    d = daemon_in(ns, tmp_path, root, db)
    try:
        v = volume(status_of(d), root / "b")
        assert v["state"] == "online" and v["fs_type"].startswith("fuse"), v
        assert status_of(d)["roots"][0]["observer"] == "inotify"
        ns.sh(f"echo behind > '{src}/behind-its-back'")
        d.wait(lambda: in_index(d, root / "b" / "behind-its-back"), 30, "the change made behind the mount")
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        d.stop()
        ns.run("umount", str(root / "b"), check=False)
