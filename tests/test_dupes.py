"""`treewatch dupes` on real files: hard links are one copy, groups by waste, scoping, --min-size."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.oracle import cli


def dupes_json(db: Path, *args: str) -> dict[str, Any]:
    result = cli(db, "dupes", "--json", *args)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def paths_of(group: dict[str, Any]) -> list[list[str]]:
    return [c["paths"] for c in group["copies"]]


def make_library(library: Path) -> None:
    big = os.urandom(5000)
    (library / "photos" / "2023").mkdir(parents=True)
    (library / "backup").mkdir()
    (library / "photos" / "2023" / "IMG_1.jpg").write_bytes(big)
    (library / "backup" / "copy of IMG_1.jpg").write_bytes(big)
    os.link(library / "photos" / "2023" / "IMG_1.jpg", library / "photos" / "best.jpg")  # a hard link
    (library / "notes.txt").write_bytes(b"n" * 3000)
    (library / "backup" / "notes.txt").write_bytes(b"n" * 3000)
    (library / "unique.bin").write_bytes(os.urandom(8000))
    (library / "linked-only.bin").write_bytes(os.urandom(7000))
    os.link(library / "linked-only.bin", library / "backup" / "linked-only.bin")  # names of one inode only
    (library / "empty-1").write_bytes(b"")
    (library / "empty-2").write_bytes(b"")
    (library / "symlink.jpg").symlink_to("photos/best.jpg")


def test_groups_count_hard_links_once_and_come_largest_waste_first(library: Path, db: Path) -> None:
    make_library(library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    data = dupes_json(db)
    groups = data["groups"]
    assert [g["size"] for g in groups] == [5000, 3000]
    img, notes = groups
    # Three names, two inodes: one copy wastes 5000 bytes; the hard links are listed together.
    assert img["wasted_bytes"] == 5000
    assert paths_of(img) == [
        [str(library / "backup" / "copy of IMG_1.jpg")],
        sorted([str(library / "photos" / "2023" / "IMG_1.jpg"), str(library / "photos" / "best.jpg")]),
    ]
    assert len({(c["dev"], c["inode"]) for c in img["copies"]}) == 2
    assert notes["wasted_bytes"] == 3000
    assert paths_of(notes) == [[str(library / "backup" / "notes.txt")], [str(library / "notes.txt")]]
    assert data["reclaimable_bytes"] == 8000


def test_min_size_and_path_scope(library: Path, db: Path) -> None:
    make_library(library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert [g["size"] for g in dupes_json(db, "--min-size", "4000")["groups"]] == [5000]
    # Empty files waste nothing and are left out, unless asked for.
    assert [g["size"] for g in dupes_json(db, "--min-size", "0")["groups"]] == [5000, 3000, 0]
    # Under photos/ only the two hard links are left: one inode, not a duplicate.
    assert dupes_json(db, str(library / "photos"))["groups"] == []
    scoped = dupes_json(db, str(library / "backup"))
    assert scoped == {"groups": [], "reclaimable_bytes": 0}
    text = cli(db, "dupes").stdout
    assert "(hard link)" in text
    assert text.splitlines()[-1] == "treewatch: 2 duplicate groups, 8.0 kB reclaimable"
    outside = cli(db, "dupes", str(library.parent), check=False)
    assert outside.returncode == 2, outside
    assert "not inside any indexed root" in outside.stderr


def test_dupes_follows_the_index_after_a_copy_is_deleted(library: Path, db: Path) -> None:
    make_library(library)
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    (library / "backup" / "copy of IMG_1.jpg").unlink()
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    assert [g["size"] for g in dupes_json(db)["groups"]] == [3000]
