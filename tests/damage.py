"""Real damage to a real index file, shared by tests/test_repair.py and bench/repair_bench.py:
pages overwritten with random bytes, as a failing card or a lying disk cache leaves them."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from daemon.index import sqlite_uri

PAGE = 4096


def pages_of(db: Path) -> dict[str, list[int]]:
    """Each table's and index's pages, read with SQLite's dbstat (on a copy: it is never opened
    again as it was)."""
    con = sqlite3.connect(sqlite_uri(db, "mode=ro"), uri=True)
    try:
        out: dict[str, list[int]] = {}
        for name, page in con.execute("SELECT name, pageno FROM dbstat"):
            out.setdefault(name, []).append(int(page))
        return out
    finally:
        con.close()


def damage(db: Path, seed: int, chunks: int = 5) -> list[int]:
    """Overwrite ``chunks`` runs of 4 KiB at random offsets with random bytes, as a failing card
    or a lying cache does; the offsets. Page 1 (the schema) and the page of `roots` are spared:
    losing either loses the whole salvage, which test_unreadable_files covers."""
    pages = pages_of(db)
    spared = {1, *pages.get("roots", [])}
    rng = random.Random(seed)
    size = db.stat().st_size
    offsets: list[int] = []
    while len(offsets) < chunks:
        at = rng.randrange(PAGE, size - PAGE)
        if {at // PAGE + 1, (at + PAGE - 1) // PAGE + 1} & spared:
            continue
        offsets.append(at)
    with db.open("r+b") as f:
        for at in offsets:
            f.seek(at)
            f.write(rng.randbytes(PAGE))
    return offsets
