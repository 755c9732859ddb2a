"""The torture suite's operations on a live tree, and the figures it reports.

Every operation is a plain function ``op(rng, root, outside) -> str`` that changes the tree the
way a user's tools do and returns a line describing what it did (for the reproduction log).
Operations choose their targets from a *sorted* listing with the given ``random.Random``, so one
thread's sequence is a function of its seed and of the tree it started from; several threads at
once interleave as the scheduler likes (the log then says which thread did what, in order).
An operation that loses a race with another thread (the file it picked was just moved away)
raises OSError, which the caller records and ignores: the tree is whatever it is afterwards,
and the index must match that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import xattr

Op = Callable[[random.Random, Path, Path], str]

NAMES = ("a", "b", "c", "photo.jpg", "notes.txt", "raw.dng", "x y", "é.bin", "deep")
MAX_ENTRIES = 400  # the tree stays small: convergence is checked after every burst
# A file no operation touches: a root emptied of everything is *offline* by design (it looks
# exactly like an unmounted disk; DESIGN.md), so the random sequences never empty it
# (hypothesis shrank a run to "move every album out" before this existed).
KEEP = "keep.torture"


# Folders no operation goes into, names, moves or deletes, while they are fenced: a volume being
# unmounted or remounted in the same burst (its content must be what the index last saw).
FENCED: set[Path] = set()


def _walk(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(files, folders, symlinks) below root, sorted, root itself among the folders."""
    files: list[Path] = []
    dirs: list[Path] = [root]
    links: list[Path] = []
    for top, dnames, fnames in os.walk(root):
        dnames[:] = sorted(d for d in dnames if Path(top) / d not in FENCED)
        for name in sorted(dnames + [f for f in fnames if Path(top) / f not in FENCED]):
            p = Path(top) / name
            if name == KEEP:  # the root's and each volume's: emptied, they would look unmounted
                continue
            if p.is_symlink():
                links.append(p)
            elif p.is_dir():
                dirs.append(p)
            elif p.is_file():
                files.append(p)
    return files, dirs, links


# Names of hard-linked files written to (or linked) in the current burst. inotify reports a
# write only in the folder of the name written through; the daemon then re-checks the other
# names (scan.py), but only if that name is still there when it looks. A name written through
# and removed before the daemon saw it leaves no trace at all: undetectable without a full
# sync, by design (docs/torture.md). So such names are not removed or renamed in that burst.
TOUCHED: set[Path] = set()
_touched_lock = threading.Lock()


def new_burst() -> None:
    with _touched_lock:
        TOUCHED.clear()


def _touch_if_linked(p: Path) -> None:
    if p.stat().st_nlink > 1:
        with _touched_lock:
            TOUCHED.add(p)


def _guard(p: Path) -> None:
    with _touched_lock:
        if any(t == p or p in t.parents for t in TOUCHED):
            raise FileExistsError(f"a hard link written in this burst: {p}")


def _pick(rng: random.Random, items: list[Path]) -> Path:
    if not items:
        raise FileNotFoundError("nothing to pick")
    return items[rng.randrange(len(items))]


def _new_name(rng: random.Random, folder: Path) -> Path:
    return folder / f"{rng.choice(NAMES)}-{rng.randrange(1000)}"


def _data(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _size(rng: random.Random) -> int:
    return rng.choice((0, 1, 100, 4096, 70_000, 300_000))


def _write(p: Path, data: bytes, flags: int = os.O_CREAT | os.O_TRUNC) -> None:
    """Write ``data`` to the file at ``p``, never waiting on a FIFO there: the other writer's
    `fifo` op may have made one at that name (a `create` opened one with no reader and waited
    for 11 minutes, seed 3030288909). O_NONBLOCK makes that open fail (ENXIO, skipped) and
    changes nothing for a regular file."""
    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | flags, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(p))
        os.write(fd, data)
    finally:
        os.close(fd)


def create(rng: random.Random, root: Path, outside: Path) -> str:
    _, dirs, _ = _walk(root)
    p = _new_name(rng, _pick(rng, dirs))
    with contextlib.suppress(FileNotFoundError):
        _touch_if_linked(p)  # an existing name: written through
    _write(p, _data(rng, _size(rng)))
    return f"create {p}"


def append(rng: random.Random, root: Path, outside: Path) -> str:
    p = _pick(rng, _walk(root)[0])
    _touch_if_linked(p)
    _write(p, _data(rng, rng.randrange(1, 5000)), os.O_APPEND)
    return f"append {p}"


def truncate(rng: random.Random, root: Path, outside: Path) -> str:
    p = _pick(rng, _walk(root)[0])
    size = p.stat().st_size
    _touch_if_linked(p)
    os.truncate(p, rng.randrange(size + 1) if size else 10)
    return f"truncate {p}"


def overwrite_same_size(rng: random.Random, root: Path, outside: Path) -> str:
    # The mtime is left as the write set it: a same-size rewrite with the mtime restored is
    # invisible by design (only `verify` finds it), so that variant is not thrown.
    p = _pick(rng, _walk(root)[0])
    size = p.stat().st_size
    _touch_if_linked(p)
    _write(p, _data(rng, size), 0)
    return f"overwrite-same-size {p}"


def rename_file(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    src = _pick(rng, files)
    _guard(src)
    dst = _new_name(rng, src.parent if rng.random() < 0.5 else _pick(rng, dirs))
    _guard(dst)  # a rename over an existing name removes that name
    os.rename(src, dst)
    return f"rename {src} -> {dst}"


def _removable(dirs: list[Path]) -> list[Path]:
    """Folders an operation may delete or move away: not the root, not one holding a KEEP file
    (a volume's mount point: `rm -r` empties it, then fails on the mount, and an emptied volume
    is offline by design, as an emptied root is)."""
    return [d for d in dirs[1:] if not (d / KEEP).exists()]


def move_folder(rng: random.Random, root: Path, outside: Path) -> str:
    _, dirs, _ = _walk(root)
    src = _pick(rng, _removable(dirs))
    _guard(src)
    targets = [d for d in dirs if d != src and src not in d.parents]
    dst = _new_name(rng, _pick(rng, targets))
    os.rename(src, dst)
    return f"move-folder {src} -> {dst}"


def move_out(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    src = _pick(rng, files + _removable(dirs))
    _guard(src)
    dst = outside / f"out-{rng.randrange(10**9)}"
    os.rename(src, dst)
    return f"move-out {src} -> {dst}"


def move_in(rng: random.Random, root: Path, outside: Path) -> str:
    pool = sorted(p for p in outside.iterdir() if p.name.startswith("out-"))
    if pool and rng.random() < 0.7:
        src = _pick(rng, pool)
    else:  # a folder prepared outside, then moved in whole (rsync-style)
        src = outside / f"out-{rng.randrange(10**9)}"
        src.mkdir()
        for i in range(rng.randrange(1, 6)):
            (src / f"in{i}").write_bytes(_data(rng, _size(rng)))
    dst = _new_name(rng, _pick(rng, _walk(root)[1]))
    _guard(dst)
    os.rename(src, dst)
    return f"move-in {src} -> {dst}"


def delete(rng: random.Random, root: Path, outside: Path) -> str:
    files, _dirs, links = _walk(root)
    p = _pick(rng, files + links)
    _guard(p)
    p.unlink()
    return f"delete {p}"


def rmtree(rng: random.Random, root: Path, outside: Path) -> str:
    p = _pick(rng, _removable(_walk(root)[1]))
    _guard(p)
    shutil.rmtree(p)
    return f"rmtree {p}"


def mkdir_tree(rng: random.Random, root: Path, outside: Path) -> str:
    top = _new_name(rng, _pick(rng, _walk(root)[1]))
    here = top
    for _ in range(rng.randrange(1, 4)):
        here = here / rng.choice(NAMES)
        here.mkdir(parents=True, exist_ok=True)
        for i in range(rng.randrange(0, 4)):
            with contextlib.suppress(FileNotFoundError):
                _touch_if_linked(here / f"f{i}")
            (here / f"f{i}").write_bytes(_data(rng, _size(rng)))
    return f"mkdir-tree {top}"


def chmod(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    p = _pick(rng, files + dirs[1:])
    mode = rng.choice((0o600, 0o644, 0o640, 0o755)) if p.is_file() else rng.choice((0o755, 0o750, 0o700))
    os.chmod(p, mode)
    return f"chmod {oct(mode)} {p}"


def xattr_set(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    p = _pick(rng, files + dirs[1:])
    name = f"user.tw{rng.randrange(3)}"
    xattr.set(os.fsencode(p), name, _data(rng, rng.randrange(1, 40)))
    return f"xattr-set {name} {p}"


def xattr_remove(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    p = _pick(rng, files + dirs[1:])
    names = sorted(n for n in xattr.list(os.fsencode(p)) if n.startswith(b"user."))
    if not names:
        raise FileNotFoundError("no xattr")
    name = names[rng.randrange(len(names))]
    xattr.remove(os.fsencode(p), name)
    return f"xattr-remove {name!r} {p}"


def symlink(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    target = rng.choice((str(_pick(rng, files + dirs)), "dangling", str(outside), "../" * 5 + "etc/passwd"))
    p = _new_name(rng, _pick(rng, dirs))
    os.symlink(target, p)
    return f"symlink {p} -> {target}"


def retarget(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, links = _walk(root)
    p = _pick(rng, links)
    tmp = p.with_name(p.name + ".tmp-link")
    os.symlink(str(_pick(rng, files + dirs)), tmp)
    os.rename(tmp, p)  # as `ln -sfn` does it: atomically
    return f"retarget {p}"


def hardlink(rng: random.Random, root: Path, outside: Path) -> str:
    files, dirs, _ = _walk(root)
    src = _pick(rng, files)
    dst = _new_name(rng, _pick(rng, dirs))
    with _touched_lock:
        TOUCHED.update((src, dst))
    os.link(src, dst)
    return f"hardlink {src} -> {dst}"


def file_to_folder_and_back(rng: random.Random, root: Path, outside: Path) -> str:
    p = _pick(rng, _walk(root)[0])
    _guard(p)
    p.unlink()
    p.mkdir()
    (p / "inside").write_bytes(_data(rng, _size(rng)))
    if rng.random() < 0.5:
        return f"file-to-folder {p}"
    shutil.rmtree(p)
    _write(p, _data(rng, _size(rng)))
    return f"file-to-folder-and-back {p}"


def create_delete_create(rng: random.Random, root: Path, outside: Path) -> str:
    p = _new_name(rng, _pick(rng, _walk(root)[1]))
    _guard(p)
    for _ in range(rng.randrange(2, 6)):
        _write(p, _data(rng, _size(rng)))
        p.unlink()
    _write(p, _data(rng, _size(rng)))
    return f"create-delete-create {p}"


def safe_save(rng: random.Random, root: Path, outside: Path) -> str:
    p = _pick(rng, _walk(root)[0])
    _guard(p)
    tmp = p.with_name("." + p.name + ".swp")
    with tmp.open("wb") as f:
        f.write(_data(rng, _size(rng)))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, p)
    return f"safe-save {p}"


def fifo(rng: random.Random, root: Path, outside: Path) -> str:
    # A FIFO is recorded with its kind, never opened (an open() would block the scanner).
    p = _new_name(rng, _pick(rng, _walk(root)[1]))
    os.mkfifo(p)
    return f"mkfifo {p}"


# Weights: content changes and moves most, the exotic ones often enough to matter.
OPS: dict[str, tuple[Op, int]] = {
    "create": (create, 12),
    "append": (append, 6),
    "truncate": (truncate, 3),
    "overwrite_same_size": (overwrite_same_size, 4),
    "rename_file": (rename_file, 6),
    "move_folder": (move_folder, 3),
    "move_out": (move_out, 2),
    "move_in": (move_in, 2),
    "delete": (delete, 5),
    "rmtree": (rmtree, 1),
    "mkdir_tree": (mkdir_tree, 4),
    "chmod": (chmod, 3),
    "xattr_set": (xattr_set, 3),
    "xattr_remove": (xattr_remove, 2),
    "symlink": (symlink, 2),
    "retarget": (retarget, 2),
    "hardlink": (hardlink, 2),
    "file_to_folder_and_back": (file_to_folder_and_back, 2),
    "create_delete_create": (create_delete_create, 3),
    "safe_save": (safe_save, 3),
    "fifo": (fifo, 1),
}
OP_NAMES = tuple(OPS)


def apply(name: str, rng: random.Random, root: Path, outside: Path) -> str:
    """Apply one named operation; a lost race (OSError) is part of the log, not a failure."""
    fn = OPS[name][0]
    if name in ("create", "mkdir_tree", "move_in") and len(_walk(root)[0]) > MAX_ENTRIES:
        name, fn = "rmtree", rmtree
    try:
        return fn(rng, root, outside)
    except OSError as e:
        return f"{name}: skipped ({type(e).__name__})"


def random_op(rng: random.Random) -> str:
    names = list(OPS)
    return rng.choices(names, weights=[OPS[n][1] for n in names])[0]


def seed_tree(rng: random.Random, root: Path, folders: int = 6, files: int = 5) -> None:
    (root / KEEP).write_bytes(b"keeps the root non-empty")
    for d in range(folders):
        folder = root / f"album{d}"
        folder.mkdir()
        for f in range(files):
            (folder / f"img{f}.jpg").write_bytes(_data(rng, _size(rng)))


@dataclass
class Figures:
    """What `make torture` prints at the end (one table for the whole session)."""

    seed: int | None = None
    duration: float = 0.0
    ops: int = 0
    convergence_checks: int = 0
    mismatches: int = 0
    crashes: int = 0
    rehashed_bytes: int = 0
    peak_rss_kb: int = 0
    reader_calls: int = 0
    reader_errors: int = 0
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def used(self) -> bool:
        return self.seed is not None

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def peak(self, rss_kb: int) -> None:
        with self.lock:
            self.peak_rss_kb = max(self.peak_rss_kb, rss_kb)

    def table(self) -> list[str]:
        rows = [
            ("seed", str(self.seed)),
            ("duration (s, random-op phase)", f"{self.duration:g}"),
            ("operations applied", str(self.ops)),
            ("convergence checks", str(self.convergence_checks)),
            ("mismatches (must be 0)", str(self.mismatches)),
            ("crashes injected (SIGKILL)", str(self.crashes)),
            ("re-hashed bytes after resume (must be 0)", str(self.rehashed_bytes)),
            ("reader calls / errors (must be 0)", f"{self.reader_calls} / {self.reader_errors}"),
            ("peak RSS", f"{self.peak_rss_kb / 1024:.1f} MB"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = ["treewatch torture", "-" * (width + 20)]
        lines += [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return lines


FIGURES = Figures()


@dataclass
class Volume:
    """A filesystem image mounted below the root, in the daemon's mount namespace: the operation
    that unmounts it (the last unmount of its ext4: IN_UNMOUNT on its watches) and mounts it
    again (on whichever loop device is free, so often another st_dev)."""

    enter: list[str]  # runs a command in the namespace (nsenter -t PID -m --)
    image: Path
    point: Path  # as the namespace sees it
    mounted: bool = True

    def toggle(self) -> str:
        if self.mounted:
            cmd = [*self.enter, "umount", str(self.point)]
        else:
            cmd = [*self.enter, "mount", "-o", "loop", str(self.image), str(self.point)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0:
            return f"{cmd[-2] if self.mounted else 'mount'}: failed: {result.stderr.strip()}"
        self.mounted = not self.mounted
        return f"{'mount' if self.mounted else 'umount'} {self.point}"


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
