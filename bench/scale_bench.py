"""The daemon at scale: W1, from start to watching N folders (inotify watches placed), its RSS
and the kernel memory of the watches; E1, the daemon's CPU per inotify event and how much a
writer is slowed beside it, against beside nothing.

W1's folders are empty, so the daemon's startup sync is short and what is measured is the
watching; E1's writer creates files in one folder of a photo-shaped tree, as a copy would.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench.harness import Bench, Result, drop_db, load, photo_folders, quiet, restore

INOTIFY_WATCHES = "/proc/sys/fs/inotify/max_user_watches"


def folder_tree(root: Path, folders: int) -> Path:
    """``folders`` empty folders, 100 to a parent (made once; a marker says how many)."""
    marker = root / ".folders"
    if marker.exists() and marker.read_text() == str(folders):
        return root
    if root.exists():
        raise RuntimeError(f"{root} exists with another tree; remove it")
    root.mkdir(parents=True)
    made = 0
    parent_no = 0
    while made < folders:
        parent = root / f"p{parent_no:05d}"
        parent.mkdir()
        made += 1
        for i in range(min(99, folders - made)):
            (parent / f"d{i:02d}").mkdir()
            made += 1
        parent_no += 1
    marker.write_text(str(folders))
    return root


@contextmanager
def watch_limit(at_least: int) -> Iterator[None]:
    """fs.inotify.max_user_watches raised to ``at_least`` for the run (root only), then put back."""
    old = int(Path(INOTIFY_WATCHES).read_text())
    if old >= at_least:
        yield
        return
    Path(INOTIFY_WATCHES).write_text(str(at_least))
    try:
        yield
    finally:
        Path(INOTIFY_WATCHES).write_text(str(old))


def inotify_kernel_bytes() -> tuple[int, str] | None:
    """Kernel memory that inotify marks can be counted in, and from where: the slab
    `inotify_inode_mark` when the kernel keeps it apart, else all unreclaimable slab
    (`SUnreclaim` in /proc/meminfo: SLUB merges small caches, and on Linux 6.18 here
    /proc/slabinfo has no inotify line). None when neither is readable."""
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "inotify_inode_mark":
                return int(fields[1]) * int(fields[3]), "slab inotify_inode_mark"  # active objects x size
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SUnreclaim:"):
                return int(line.split()[1]) * 1024, "SUnreclaim, other kernel work included"
    except OSError:
        return None
    return None


def bench_w1(b: Bench) -> Iterator[Result]:
    """W1: `treewatch run` on a tree of N empty folders, to the moment every folder is watched."""
    for folders in b.args.watch_folders:
        root = folder_tree(b.corpus_dir / f"folders-{folders}", folders)
        db = b.out / f"folders-{folders}.db"
        drop_db(db)
        c = corpora.Corpus(root, corpora.Spec("folders", folders, 0, 0), 0, folders, 0, 0.0)
        if not os.access(INOTIFY_WATCHES, os.W_OK) and int(Path(INOTIFY_WATCHES).read_text()) < folders + 100:
            b.notes.append(f"W1 {folders:,} folders: skipped, max_user_watches is too low and needs root to raise")
            continue
        kernel0 = inotify_kernel_bytes()
        with watch_limit(folders + 1000):
            started = time.monotonic()
            with b.daemon(c, db, f"W1-{folders}") as d:
                watching = _log_time(d.log, "watching", started)
                s = d.status()
                rss = d.memory()["VmRSS"] / 2**20
                kernel1 = inotify_kernel_bytes()
                b.notes.append(f"W1, {folders:,} folders: {load()}")
                detail = f"startup sync done in {d.startup_s:.1f} s; {s['roots'][0]['dirs']:,} folders indexed"
                yield Result("W1", f"start to watching {folders:,} folders", watching, "s", "", None, detail)
                yield Result("W1", f"daemon RSS watching {folders:,} folders", rss, "MiB", "<= 150 MiB", rss <= 150,
                             f"{rss * 2**20 / folders:,.0f} B per folder")  # fmt: skip
                if kernel0 is not None and kernel1 is not None and kernel0[1] == kernel1[1]:
                    per_watch = (kernel1[0] - kernel0[0]) / folders
                    detail = f"{per_watch:,.0f} B per watch ({kernel1[1]})"
                    mib = (kernel1[0] - kernel0[0]) / 2**20
                    yield Result("W1", f"kernel memory of {folders:,} watches", mib, "MiB", "", None, detail)
        drop_db(db)


def _log_time(log: Path, event: str, started: float) -> float:
    """Seconds from ``started`` to the daemon's first ``event=...`` line, by the log file's mtime
    history: the line is found, and its timestamp (local ISO) compared with the start."""
    import datetime

    wall_start = time.time() - (time.monotonic() - started)
    for line in log.read_text(errors="replace").splitlines()[::-1]:
        if f"event='{event}'" in line and "timestamp='" in line:
            stamp = line.split("timestamp='", 1)[1].split("'", 1)[0]
            return datetime.datetime.fromisoformat(stamp).timestamp() - wall_start
    raise RuntimeError(f"no {event} line in {log}")


def _write_files(folder: Path, names: list[str]) -> float:
    started = time.perf_counter()
    for name in names:
        with open(folder / name, "wb") as f:
            f.write(b"x" * 4096)
    return time.perf_counter() - started


def _indexed(files: int, dirs: int) -> Callable[[dict[str, Any]], bool]:
    """The daemon idle with ``files`` files and ``dirs`` folders indexed. Idle alone is not
    enough: right after a burst the daemon may not have read its events yet, and a round left
    unindexed made the next one a rename of n identical files, measured as the writer's slowdown."""
    return lambda st: quiet(st) and (st["roots"][0]["files"], st["roots"][0]["dirs"]) == (files, dirs)


def bench_e1(b: Bench) -> Iterator[Result]:
    """E1: a writer creating 100 and 10,000 files of 4 KiB in a watched folder, beside the running
    daemon against beside nothing; the daemon's CPU for the burst's events."""
    entries = min(b.args.live_entries)
    c = b.corpus(corpora.photos_spec(entries), f"photos-{entries}")
    folder = photo_folders(c.root, 1)[0]
    mtimes = {folder: folder.stat().st_mtime_ns}  # put back after: P1 reuses this corpus's index
    try:
        yield from _e1(b, c, folder)
    finally:
        restore([], mtimes)


def _e1(b: Bench, c: corpora.Corpus, folder: Path) -> Iterator[Result]:
    # Every round writes into a new folder, the bare one outside the root on the same
    # filesystem. Bare and watched rounds alternate, so a slow spell of the shared disk falls
    # on both.
    #
    # Nothing is deleted until every round is written: ext4's inode allocator skips an inode
    # freed less than dirty_expire (30 s) ago and reads its inode table block to know
    # (fs/ext4/ialloc.c, recently_deleted(), seen in `perf record`), so 10,000 files written
    # right after 10,000 were deleted took 3.8 s of system time against 0.3 s 40 s later. That,
    # not the daemon, was E1's "8x between runs".
    #
    # Each burst's daemon starts from a copy of P1's index, so the rounds' files are removed once,
    # at the end, with no daemon watching.
    bare_top = c.root.parent / "e1-unwatched"
    shutil.rmtree(bare_top, ignore_errors=True)
    bare_top.mkdir()
    written = [bare_top]
    try:
        yield from _e1_bursts(b, c, folder, bare_top, written)
    finally:
        for top in written:
            shutil.rmtree(top, ignore_errors=True)


def _e1_bursts(b: Bench, c: corpora.Corpus, folder: Path, bare_top: Path, written: list[Path]) -> Iterator[Result]:
    for n in (100, 10_000):
        bare: list[float] = []
        beside: list[float] = []
        cpu_s, events = 0.0, 0  # summed over the rounds: one 100-file burst can cost less than a clock tick
        with b.daemon(c, b.live_db(c), f"E1-{n}") as d:
            s = d.status()["roots"][0]
            files0, dirs0 = s["files"], s["dirs"]
            for r in range(b.args.live_rounds):
                unwatched = bare_top / f"{n}-{r}"
                unwatched.mkdir()
                bare.append(_write_files(unwatched, [f"f{i:05d}.jpg" for i in range(n)]))
                watched = folder / f"e1-{n}-{r}"
                watched.mkdir()
                written.append(watched)
                d.wait(_indexed(files0 + n * r, dirs0 + r + 1), 600, "the new folder indexed")
                cpu0, events0 = d.cpu_s(), d.status()["counters"]["events"]
                beside.append(_write_files(watched, [f"f{i:05d}.jpg" for i in range(n)]))
                s = d.wait(_indexed(files0 + n * (r + 1), dirs0 + r + 1), 600, f"the {n:,} files indexed")
                events += s["counters"]["events"] - events0
                cpu_s += d.cpu_s() - cpu0
        slowed = min(beside) / min(bare)
        # Each round's ratio is printed too: one bare round against the watched one after it.
        paired = sorted(w / u for w, u in zip(beside, bare, strict=True))
        yield Result("E1", f"writer of {n:,} files beside the daemon vs beside nothing", slowed, "x", "< 1.5x",
                     slowed < 1.5, f"{min(beside) * 1000:.1f} ms vs {min(bare) * 1000:.1f} ms (best of "
                     f"{b.args.live_rounds}); round by round {', '.join(f'{x:.2f}x' for x in paired)}")  # fmt: skip
        if events == 0 or cpu_s == 0:
            b.notes.append(f"E1 {n:,} files: CPU per event not measured ({events} events, {cpu_s:.2f} s of CPU)")
            continue
        per = cpu_s / events
        yield Result("E1", f"daemon CPU per event ({n:,}-file bursts, scans included)", per * 1e6, "us", "", None,
                     f"{1 / per:,.0f} events/s on one core; {events:,} events, {cpu_s:.2f} s of CPU in "
                     f"{b.args.live_rounds} rounds")  # fmt: skip
