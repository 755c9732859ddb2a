"""The first index of a small tree matches an independent walk, through the real CLI."""

from __future__ import annotations

from pathlib import Path

from tests.oracle import cli, diff, expected, indexed


def test_first_index_matches_disk(library: Path, db: Path) -> None:
    (library / "a" / "b").mkdir(parents=True)
    (library / "a" / "b" / "photo.jpg").write_bytes(b"x" * 5000)
    (library / "top.txt").write_text("hello")
    (library / "link").symlink_to("a/b/photo.jpg")
    result = cli(db, "scan", "--root", str(library))
    assert result.returncode == 0, result.stderr
    assert "3 added" not in result.stdout  # five entries: two folders, two files, a link
    assert "5 added" in result.stdout
    assert diff(expected(library), indexed(db, library)) == []
