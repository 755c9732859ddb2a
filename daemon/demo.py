"""`make run`'s demo library: a few hundred photo-like files with the cases treewatch cares about."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from pathlib import Path

import xattr

ALBUMS = ("2023/summer", "2023/winter", "2024/birthday", "2024/trip/day1", "2024/trip/day2", "scans")


def make_demo(library: Path, files_per_album: int = 60, seed: int = 7) -> int:
    """Create the demo library if it is not there yet; returns how many files it holds."""
    rng = random.Random(seed)
    if library.exists() and any(library.iterdir()):
        return sum(len(f) for _, _, f in os.walk(library))
    for album in ALBUMS:
        folder = library / album
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(files_per_album):
            # Sizes spread like photos and thumbnails: a few KB to a few MB.
            size = int(rng.lognormvariate(11.5, 1.2))
            (folder / f"IMG_{i:04d}.jpg").write_bytes(rng.randbytes(min(size, 8 << 20)))
    original = library / "2023/summer/IMG_0000.jpg"
    (library / "scans/copy of IMG_0000.jpg").write_bytes(original.read_bytes())  # a duplicate pair
    (library / "favourite.jpg").symlink_to("2024/birthday/IMG_0001.jpg")
    tagged = library / "2024/birthday/IMG_0002.jpg"
    with contextlib.suppress(OSError):  # a filesystem without user xattrs: the demo still works
        xattr.set(str(tagged), "user.rating", b"5")
    # A name that is not valid UTF-8 (Latin-1 "é"), as old cameras and Windows shares make.
    with open(os.path.join(os.fsencode(library), b"scans", b"caf\xe9.jpg"), "wb") as f:
        f.write(rng.randbytes(20_000))
    return sum(len(f) for _, _, f in os.walk(library))


DEMO_CONFIG = """\
# Written by `make run`: the demo library, with short windows so changes show up quickly.
database = "{database}"

[[roots]]
path = "{library}"

[watch]
debounce_s = 2.0
max_delay_s = 30.0

[sync]
full_interval_s = 3600
"""


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "demo").resolve()
    library = folder / "library"
    count = make_demo(library)
    config = folder / "config.toml"
    config.write_text(DEMO_CONFIG.format(database=folder / "index.db", library=library))
    print(f"demo library: {library} ({count} files); configuration: {config}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
