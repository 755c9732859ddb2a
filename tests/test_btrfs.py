"""btrfs on a loop device: subvolumes are part of the root, not volumes, and a deleted one is a
real deletion; a subvolume and its snapshot hold the same inode numbers on different st_dev, and
nothing is matched on the inode alone (renames, hard links).

Real btrfs (Debian's btrfs-progs) in a private mount namespace (tests/mount_harness.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_harness import Daemon, write_config
from tests.mount_harness import Namespace, needs_root
from tests.oracle import diff, indexed, ls_json


def _btrfs_missing() -> str | None:
    if shutil.which("mkfs.btrfs") is None or shutil.which("btrfs") is None:
        return "btrfs-progs is not installed (make deps installs it)"
    with open("/proc/filesystems") as f:
        if "btrfs" not in f.read():
            subprocess.run(["modprobe", "btrfs"], capture_output=True, check=False)
            with open("/proc/filesystems") as again:
                if "btrfs" not in again.read():
                    return "this kernel has no btrfs (not in /proc/filesystems, modprobe btrfs failed)"
    return None


MISSING = _btrfs_missing()
pytestmark = [needs_root, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture
def btrfs(tmp_path: Path) -> Iterator[tuple[Namespace, Path]]:
    """A fresh btrfs mounted at tmp_path/mnt inside a private namespace."""
    ns = Namespace()
    image, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(160 * 1024 * 1024)
    subprocess.run(["mkfs.btrfs", "-q", "-f", str(image)], check=True, capture_output=True)
    ns.run("mount", "-o", "loop", str(image), str(mnt))
    try:
        yield ns, mnt
    finally:
        ns.close()


def changes(ns: Namespace, db: Path, since: int) -> list[dict[str, Any]]:
    out = ns.tw(db, "changes", "--since", str(since), "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def seq(ns: Namespace, db: Path) -> int:
    return int(ns.status(db)["seq"])


def age(ns: Namespace, root: Path) -> None:
    """Date everything an hour back: a file scanned in the tick it was written is racily clean
    and re-hashed by the next scan (a `metadata` row the tests would have to allow for)."""
    ns.run("find", str(root), "-exec", "touch", "-h", "-d", "1 hour ago", "{}", "+")


def scan(ns: Namespace, db: Path, root: Path) -> None:
    result = ns.tw(db, "scan", "--root", str(root))
    assert result.returncode == 0, result.stdout + result.stderr


def test_subvolumes_and_snapshots_are_part_of_the_root(tmp_path: Path, btrfs: tuple[Namespace, Path]) -> None:
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir '{root}' && btrfs -q subvolume create '{root}/sub' && mkdir '{root}/sub/d' && "
          f"head -c 5000 /dev/urandom > '{root}/sub/a' && head -c 7000 /dev/urandom > '{root}/sub/d/c' && "
          f"head -c 3000 /dev/urandom > '{root}/x'")  # fmt: skip
    age(ns, root)  # before the snapshot, which is read-only (and keeps the times)
    ns.run("btrfs", "-q", "subvolume", "snapshot", "-r", str(root / "sub"), str(root / "snap"))
    scan(ns, db, root)
    assert ns.status(db)["roots"][0]["volumes"] == [], "a subvolume is not a mount"
    assert diff(ns.expected(root), indexed(db, root)) == []
    rows = {r["path"]: r for r in ls_json(db)}
    a, snap_a = rows[str(root / "sub" / "a")], rows[str(root / "snap" / "a")]
    assert a["inode"] == snap_a["inode"] and a["dev"] != snap_a["dev"], "the snapshot shares inode numbers"
    assert a["blake3"] == snap_a["blake3"]

    # Renames across subvolumes are a copy and a delete (EXDEV): kept by content. Within one, by inode.
    start = seq(ns, db)
    ns.sh(f"mv '{root}/x' '{root}/sub/x' && mv '{root}/sub/a' '{root}/sub/d/a'")
    scan(ns, db, root)
    moved = {(c["op"], c["old_path"], c["path"]) for c in changes(ns, db, start) if c["kind"] == "file"}
    assert moved == {
        ("renamed", str(root / "x"), str(root / "sub" / "x")),
        ("renamed", str(root / "sub" / "a"), str(root / "sub" / "d" / "a")),
    }
    assert diff(ns.expected(root), indexed(db, root)) == []

    # A new snapshot and the old one deleted in one scan: the same inode numbers leave and arrive
    # on different devices, with the same content (matched by content, as any copy would be).
    ns.sh(f"btrfs -q subvolume snapshot -r '{root}/sub' '{root}/snap2' && btrfs -q subvolume delete '{root}/snap'")
    scan(ns, db, root)
    assert diff(ns.expected(root), indexed(db, root)) == []

    # `btrfs subvolume delete` is a deletion, announced as such (not an offline volume).
    start = seq(ns, db)
    ns.run("btrfs", "-q", "subvolume", "delete", str(root / "snap2"))
    scan(ns, db, root)
    deleted = {c["path"] for c in changes(ns, db, start) if c["op"] == "deleted"}
    assert str(root / "snap2") in deleted and str(root / "snap2" / "d" / "c") in deleted
    assert diff(ns.expected(root), indexed(db, root)) == []


def test_the_same_inode_number_on_another_subvolume_is_not_a_rename(
    tmp_path: Path, btrfs: tuple[Namespace, Path]
) -> None:
    """A file deleted in one subvolume and another one, same inode number, size and mtime but
    other content, arriving in a new subvolume in the same scan: a deletion and an addition.
    Matched on (inode, size, mtime) without the device, it would be a rename keeping the wrong hash."""
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir '{root}' && echo keep > '{root}/keep' && btrfs -q subvolume create '{root}/one' && "
          f"printf 'first ' > '{root}/one/f'")  # fmt: skip
    age(ns, root)
    ns.run("touch", "-d", "2020-01-01 00:00", str(root / "one" / "f"))
    scan(ns, db, root)
    start = seq(ns, db)
    ns.sh(f"btrfs -q subvolume create '{root}/two' && printf 'second' > '{root}/two/g' && "
          f"touch -d '2020-01-01 00:00' '{root}/two/g' && rm '{root}/one/f'")  # fmt: skip
    f, g = os.lstat(ns.view(root / "one")), os.lstat(ns.view(root / "two" / "g"))
    assert f.st_dev != g.st_dev
    (old,) = [r for r in ls_json(db) if r["path"] == str(root / "one" / "f")]
    assert (old["inode"], old["size"], old["mtime_ns"]) == (g.st_ino, g.st_size, g.st_mtime_ns), "not a collision"
    scan(ns, db, root)
    ops = {(c["op"], c["path"]) for c in changes(ns, db, start) if c["kind"] == "file"}
    assert ops == {("deleted", str(root / "one" / "f")), ("added", str(root / "two" / "g"))}
    assert diff(ns.expected(root), indexed(db, root)) == []


def test_a_subvolume_renamed_and_a_new_one_made_in_its_place(tmp_path: Path, btrfs: tuple[Namespace, Path]) -> None:
    """`mv sv sv_old; btrfs subvolume create sv` with a new `sv/f`: the path sv/f now holds the same
    inode number on another device, and the old file is at sv_old/f. The entry at sv/f is another
    one (its device differs); the name was taken again by a file, so identity stays with the name
    as in any save pattern (docs/feed.md): sv/f modified, sv_old/f added."""
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir '{root}' && echo keep > '{root}/keep' && btrfs -q subvolume create '{root}/sv' && "
          f"head -c 4000 /dev/urandom > '{root}/sv/f'")  # fmt: skip
    age(ns, root)
    scan(ns, db, root)
    start = seq(ns, db)
    ns.sh(f"mv '{root}/sv' '{root}/sv_old' && btrfs -q subvolume create '{root}/sv' && "
          f"head -c 100 /dev/urandom > '{root}/sv/f'")  # fmt: skip
    assert os.lstat(ns.view(root / "sv" / "f")).st_ino == os.lstat(ns.view(root / "sv_old" / "f")).st_ino
    scan(ns, db, root)
    ops = {(c["op"], c["path"]) for c in changes(ns, db, start) if c["kind"] == "file"}
    assert ops == {("modified", str(root / "sv" / "f")), ("added", str(root / "sv_old" / "f"))}
    assert diff(ns.expected(root), indexed(db, root)) == []


def test_hard_links_in_a_subvolume_and_its_snapshot_stay_apart(tmp_path: Path, btrfs: tuple[Namespace, Path]) -> None:
    """`a` and `b` are one inode in `sub`; the snapshot has the same inode number twice on
    another device. Writing through `sub/a` changes `sub/b` (its other name), never the snapshot's."""
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir '{root}' && btrfs -q subvolume create '{root}/sub' && echo one > '{root}/sub/a' && "
          f"ln '{root}/sub/a' '{root}/sub/b'")  # fmt: skip
    age(ns, root)
    ns.run("btrfs", "-q", "subvolume", "snapshot", "-r", str(root / "sub"), str(root / "snap"))
    scan(ns, db, root)
    start = seq(ns, db)
    ns.sh(f"echo two >> '{root}/sub/a'")
    scan(ns, db, root)
    touched = {c["path"] for c in changes(ns, db, start)}
    assert str(root / "snap" / "a") not in touched and str(root / "snap" / "b") not in touched
    assert diff(ns.expected(root), indexed(db, root)) == []


def test_a_mounted_subvolume_is_a_volume_and_one_filesystem_keeps_subvolumes(
    tmp_path: Path, btrfs: tuple[Namespace, Path]
) -> None:
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir -p '{root}/m' && btrfs -q subvolume create '{root}/sub' && echo a > '{root}/sub/a' && "
          f"btrfs -q subvolume create '{mnt}/other' && echo o > '{mnt}/other/o'")  # fmt: skip
    device = ns.run("findmnt", "-no", "SOURCE", str(mnt)).stdout.strip()
    ns.run("mount", "-o", "subvol=other", device, str(root / "m"))
    scan(ns, db, root)
    (vol,) = ns.status(db)["roots"][0]["volumes"]
    assert (vol["path"], vol["state"], vol["fs_type"]) == (str(root / "m"), "online", "btrfs")
    config = tmp_path / "c.toml"
    config.write_text(f'database = "{tmp_path / "one.db"}"\n[[roots]]\npath = "{root}"\none_filesystem = true\n')
    result = ns.run(sys.executable, "-m", "daemon", "--config", str(config), "scan", check=False)
    assert result.returncode == 0, result.stderr
    paths = set(indexed(tmp_path / "one.db", root))
    assert os.fsencode(root / "sub" / "a") in paths, "a subvolume is part of the root's filesystem"
    assert not any(p.startswith(os.fsencode(root / "m") + b"/") for p in paths), "the mounted one is not"


def test_daemon_sees_a_subvolume_deleted_as_a_deletion(tmp_path: Path, btrfs: tuple[Namespace, Path]) -> None:
    ns, mnt = btrfs
    root, db = mnt / "lib", tmp_path / "index.db"
    ns.sh(f"mkdir '{root}' && echo keep > '{root}/keep' && btrfs -q subvolume create '{root}/sub' && "
          f"echo a > '{root}/sub/a' && btrfs -q subvolume snapshot -r '{root}/sub' '{root}/snap'")  # fmt: skip
    d = Daemon(write_config(tmp_path / "c.toml", db, [root]), db, [root], tmp_path / "d.log", prefix=ns.prefix)
    d.start()
    try:
        d.wait(lambda: d.quiet() and diff(ns.expected(root), indexed(db, root)) == [], 60, "the first index")
        ns.run("btrfs", "-q", "subvolume", "delete", str(root / "snap"))
        d.wait(lambda: os.fsencode(root / "snap" / "a") not in indexed(db, root), 30, "the snapshot's rows to go")
        d.wait(lambda: d.quiet() and diff(ns.expected(root), indexed(db, root)) == [], 60, "convergence")
        deleted = {json.loads(line)["path"] for line in d.cli("changes", "--since", "0", "--json").stdout.splitlines()
                   if json.loads(line)["op"] == "deleted"}  # fmt: skip
        assert deleted == {str(root / "snap"), str(root / "snap" / "a")}
        assert d.status() is not None and d.status()["roots"][0]["volumes"] == []  # type: ignore[index]
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        d.stop()
