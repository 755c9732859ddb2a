"""Deterministic benchmark corpora: a photo-library-shaped tree, large files, many small files.

The same arguments always give the same tree: the same names, sizes, contents and mtimes
(only inode numbers differ). Contents come from BLAKE3's extendable output keyed by the seed,
so they are incompressible and no two files are equal. A finished corpus leaves a manifest
beside its root (``<root>.json``); a later run with the same spec reuses the tree instead of
writing it again (a 1M-entry tree takes minutes), and a half-written one is thrown away.

    python -m bench.corpus photos bench/corpus/photos-200000 --entries 200000
    python -m bench.corpus large bench/corpus/large-8x256M --files 8 --size 268435456
    python -m bench.corpus small bench/corpus/small-100000 --files 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import blake3

FORMAT = 1  # bump when the layout changes, so stale corpora are regenerated
BASE_MTIME_NS = 978_307_200 * 1_000_000_000  # 2001-01-01T00:00:00Z: old enough never to be racily clean
EVENTS = ("birthday", "holiday", "hike", "garden", "school", "wedding", "beach", "city", "family", "misc")
POOL_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Spec:
    """What to generate. ``shape`` is photos | large | small."""

    shape: str
    count: int  # photos: entries (files + folders); large and small: files
    min_size: int
    max_size: int
    seed: int = 1
    format: int = FORMAT


@dataclass(frozen=True, slots=True)
class Corpus:
    root: Path
    spec: Spec
    files: int
    dirs: int
    bytes: int
    seconds: float  # how long generation took (0 when reused)

    @property
    def entries(self) -> int:
        return self.files + self.dirs

    def describe(self) -> str:
        s = self.spec
        sizes = human(s.min_size) if s.min_size == s.max_size else f"{human(s.min_size)}-{human(s.max_size)}"
        return f"{s.shape}: {self.files:,} files ({sizes}), {self.dirs:,} folders, {human(self.bytes)}"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _manifest(root: Path) -> Path:
    return root.with_name(root.name + ".json")


def _stream(seed: int, label: str) -> blake3.blake3:
    return blake3.blake3(f"treewatch-bench/{seed}/{label}".encode())


class _Writer:
    """Writes files with deterministic content and mtime, counting what it made."""

    def __init__(self, seed: int) -> None:
        self.pool = _stream(seed, "pool").digest(length=POOL_BYTES)
        self.files = 0
        self.dirs = 0
        self.bytes = 0

    def mtime(self) -> int:
        return BASE_MTIME_NS + (self.files + self.dirs) * 60_000_000_000

    def small(self, path: str, size: int, offset: int) -> None:
        header = self.files.to_bytes(8, "little")  # makes every file's content unique
        data = (header + self.pool[offset : offset + max(size - 8, 0)])[:size]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            t = self.mtime()
            os.utime(fd, ns=(t, t))
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size

    def large(self, path: str, size: int, seed: int, label: str) -> None:
        stream = _stream(seed, label)
        chunk = 8 << 20
        with open(path, "xb") as f:
            for offset in range(0, size, chunk):
                f.write(stream.digest(length=min(chunk, size - offset), seek=offset))
        t = self.mtime()
        os.utime(path, ns=(t, t))
        self.files += 1
        self.bytes += size

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)
        self.dirs += 1

    def seal_dir(self, path: str) -> None:
        """Give a folder a fixed mtime once its children are in it."""
        t = BASE_MTIME_NS + self.dirs * 60_000_000_000
        os.utime(path, ns=(t, t))


def _photos(root: str, spec: Spec, w: _Writer, rng: random.Random, *, count_files: bool) -> None:
    """collection/year/month/event folders of 20-250 photos, some with .xmp sidecars and an
    ``edited`` subfolder, like a camera-import library."""

    def left() -> int:
        return spec.count - (w.files if count_files else w.files + w.dirs)

    def size() -> int:
        return rng.randint(spec.min_size, spec.max_size)

    def photo(folder: str, n: int) -> None:
        w.small(f"{folder}/IMG_{n:04d}.JPG", size(), rng.randrange(POOL_BYTES - spec.max_size))

    opened: list[str] = []  # folders to seal, deepest last
    year = 1990
    while left() > 0:
        collection = f"{root}/collection-{(year - 1990) // 25:02d}"
        for path in (collection, f"{collection}/{year}"):
            if not os.path.isdir(path) and left() > 0:
                w.mkdir(path)
                opened.append(path)
        for month in range(1, 13):
            if left() <= 0:
                break
            month_dir = f"{collection}/{year}/{month:02d}"
            w.mkdir(month_dir)
            opened.append(month_dir)
            for _ in range(rng.randint(1, 4)):
                if left() <= 0:
                    break
                event = f"{month_dir}/{year}-{month:02d}-{rng.randint(1, 28):02d} {rng.choice(EVENTS)}"
                if os.path.isdir(event):
                    event += f" {w.dirs}"
                w.mkdir(event)
                n = 1
                for _ in range(rng.randint(20, 250)):
                    if left() <= 0:
                        break
                    photo(event, n)
                    if rng.random() < 0.25 and left() > 0:
                        w.small(f"{event}/IMG_{n:04d}.xmp", rng.randint(600, 2000), rng.randrange(POOL_BYTES - 2000))
                    n += 1
                if rng.random() < 0.1 and left() > 1:
                    edited = f"{event}/edited"
                    w.mkdir(edited)
                    for _ in range(rng.randint(1, 10)):
                        if left() <= 0:
                            break
                        photo(edited, n)
                        n += 1
                    w.seal_dir(edited)
                w.seal_dir(event)
        year += 1
    for path in reversed(opened):
        w.seal_dir(path)


def _large(root: str, spec: Spec, w: _Writer) -> None:
    rng = random.Random(spec.seed)
    for i in range(spec.count):
        w.large(f"{root}/large-{i:03d}.bin", rng.randint(spec.min_size, spec.max_size), spec.seed, f"large/{i}")


def ensure(root: Path, spec: Spec, *, quiet: bool = False) -> Corpus:
    """The corpus for ``spec`` at ``root``: reused when its manifest matches, else (re)written."""
    manifest = _manifest(root)
    if manifest.exists() and root.is_dir():
        data = json.loads(manifest.read_text())
        if data.get("spec") == asdict(spec):
            return Corpus(root, spec, data["files"], data["dirs"], data["bytes"], 0.0)
    if not quiet:
        print(f"generating {spec.shape} corpus at {root} ({spec.count:,}) ...", file=sys.stderr, flush=True)
    manifest.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    started = time.monotonic()
    w = _Writer(spec.seed)
    if spec.shape == "photos":
        _photos(str(root), spec, w, random.Random(spec.seed), count_files=False)
    elif spec.shape == "small":
        _photos(str(root), spec, w, random.Random(spec.seed), count_files=True)
    elif spec.shape == "large":
        _large(str(root), spec, w)
    else:
        raise ValueError(f"unknown corpus shape {spec.shape!r}")
    w.seal_dir(str(root))
    seconds = time.monotonic() - started
    os.sync()
    corpus = Corpus(root, spec, w.files, w.dirs, w.bytes, seconds)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": asdict(spec), "files": w.files, "dirs": w.dirs, "bytes": w.bytes}))
    tmp.replace(manifest)
    return corpus


def photos_spec(entries: int, seed: int = 1, min_size: int = 512, max_size: int = 8192) -> Spec:
    return Spec("photos", entries, min_size, max_size, seed)


def small_spec(files: int, seed: int = 1, min_size: int = 4096, max_size: int = 65536) -> Spec:
    return Spec("small", files, min_size, max_size, seed)


def large_spec(files: int, size: int, seed: int = 1) -> Spec:
    return Spec("large", files, size, size, seed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=("photos", "large", "small"))
    p.add_argument("root", type=Path)
    p.add_argument("--entries", type=int, default=200_000, help="photos: files + folders (default 200000)")
    p.add_argument("--files", type=int, help="large: default 8; small: default 100000")
    p.add_argument("--size", type=int, default=256 << 20, help="large: bytes per file (default 256 MiB)")
    p.add_argument("--min-size", type=int, help="photos/small: smallest file")
    p.add_argument("--max-size", type=int, help="photos/small: largest file")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.shape == "photos":
        spec = photos_spec(a.entries, a.seed, a.min_size or 512, a.max_size or 8192)
    elif a.shape == "small":
        spec = small_spec(a.files or 100_000, a.seed, a.min_size or 4096, a.max_size or 65536)
    else:
        spec = large_spec(a.files or 8, a.size, a.seed)
    corpus = ensure(a.root, spec)
    print(f"{corpus.root}: {corpus.describe()} ({corpus.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
