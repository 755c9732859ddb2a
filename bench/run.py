"""`make bench`: treewatch against reference tools, each as a ratio measured in the same run.

Every figure is a ratio against a reference command run back to back with treewatch, in the
same process, on the same files, with a warm page cache: each command runs once to warm up,
then the pair alternates ``--rounds`` times and the best time of each counts. The machine is
shared (other engineers run tests on it), so absolute times are noisy; the ratios much less.

    python -m bench.run                       # P1, P2, RSS on a 200k-entry corpus
    python -m bench.run --entries 1000000     # the 1M-entry figures (P1 and RSS)
    python -m bench.run --only P1 --profile   # and a py-spy profile of the scan
    python -m bench.run --only P3,P4,P5       # the daemon: latency, idle cost, storm (10k entries)
    python -m bench.run --only P3,P4 --live-entries 10000,1000000   # and on the 1M-entry tree
    python -m bench.run --only F              # the fleet catalogue (PostgreSQL): stream, 1M load, follow

Benchmarks are functions in ``BENCHMARKS``: each takes the ``Bench`` context (arguments,
corpora, a way to time commands) and returns ``Result`` rows. P3-P5 (live watching, issue 4)
run `treewatch run` (``Bench.daemon``) with a short quiet window and measure it from outside:
the database read-only, `status --json`, and the process from /proc.
"""

from __future__ import annotations

import argparse
import compileall
import datetime
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench import feed_bench, scale_bench
from bench.corpus import Corpus, human
from bench.harness import (
    CLK_TCK,
    DEBOUNCE_S,
    HERE,
    Bench,
    Daemon,
    P1Runs,
    Result,
    best,
    db_bytes,
    drop_db,
    load,
    machine,
    photo_folders,
    quiet,
    restore,
    run,
    sh,
    table,
    tail,
)
from daemon.index import sqlite_uri

FIND_FORMAT = "%i %s %T@ %p\n"


# --- the benchmarks ---------------------------------------------------------------------------


def photos(b: Bench, entries: int) -> Corpus:
    """A photo-shaped tree; with --empty-photos its photos are empty (10M entries fit a disk)."""
    if b.args.empty_photos:
        return b.corpus(corpora.photos_spec(entries, min_size=0, max_size=0), f"photos-empty-{entries}")
    return b.corpus(corpora.photos_spec(entries), f"photos-{entries}")


def p1_corpus(b: Bench) -> Corpus:
    return photos(b, b.args.entries)


def bench_p1(b: Bench) -> Iterator[Result]:
    """P1: no-change full sync of an indexed tree vs `find -printf` (stat of every entry), with a
    warm page cache and, as root, a cold one (dropped before every run of either)."""
    c = p1_corpus(b)
    db = b.out / f"{c.root.name}.db"
    first = b.scan(db, c.root, fresh=True)
    # The sync right after a first index: as fast as the later ones only if the first index
    # stored every folder's listing digest (docs/scanning.md, "Unchanged folders").
    after_first = b.scan(db, c.root, fresh=False)
    if " 0 added, 0 modified, 0 deleted, 0 renamed, 0 metadata" not in after_first.stdout:
        raise RuntimeError(f"the sync after the first index changed something: {after_first.stdout}")
    if b.args.profile:
        b.profile("P1-no-change", db, c.root, fresh=False)
    find = ["find", str(c.root), "-printf", FIND_FORMAT]
    for cold in (False, True):
        if cold and not b.can_drop_caches("P1 cold"):
            continue
        mine, refs = b.pair(lambda: b.scan(db, c.root, fresh=False), lambda: run(find, keep_stdout=False), cold=cold)
        for r in mine:
            if " 0 added, 0 modified, 0 deleted, 0 renamed, 0 metadata" not in r.stdout:
                raise RuntimeError(f"no-change sync changed something: {r.stdout}")
        ours, ref = best(mine), best(refs)
        if not cold:
            b.p1 = P1Runs(c, db, first, ours)
        ratio = ours.seconds / ref.seconds
        target = 1.0 if cold else 1.3
        yield Result(
            "P1",
            f"no-change sync, {c.entries:,} entries, {'cold' if cold else 'warm'}",
            ratio,
            "x",
            f"<= {target}x",
            ratio <= target,
            f"treewatch {ours.seconds:.2f} s, find {ref.seconds:.2f} s",
            {"ours_s": ours.seconds, "find_s": ref.seconds, "entries": c.entries, "cold": cold},
        )
    if b.p1 is not None:
        later = b.p1.no_change.seconds
        ratio = after_first.seconds / later
        yield Result(
            "P1",
            f"first no-change sync after the first index, {c.entries:,} entries, warm",
            ratio,
            "x",
            "<= 1.2x the later ones",
            ratio <= 1.2,
            f"{after_first.seconds:.2f} s, the later ones' best {later:.2f} s",
            {"first_sync_s": after_first.seconds, "later_s": later},
        )
    rate = c.entries / first.seconds
    yield Result(
        "P1",
        f"first index, {c.entries:,} entries",
        first.seconds,
        "s",
        "",
        None,
        f"{rate:,.0f} entries/s, {human(c.bytes)}",
        {"seconds": first.seconds, "entries": c.entries},
    )


def _p2(b: Bench, name: str, c: Corpus, target: float, *, cold: bool = False) -> Result:
    db = b.out / f"{name}.db"
    if b.args.profile and not cold:
        b.profile(f"P2-{name}", db, c.root, fresh=True)
    b3sum = [f"find {sh(c.root)} -type f -print0 | xargs -0 b3sum >/dev/null"]
    mine, refs = b.pair(lambda: b.scan(db, c.root, fresh=True), lambda: run(b3sum, shell=True), cold=cold)
    ours, ref = best(mine), best(refs)
    ratio = ref.seconds / ours.seconds  # throughput ratio: same bytes
    mbps = c.bytes / ours.seconds / 1e6
    ref_mbps = c.bytes / ref.seconds / 1e6
    drop_db(db)
    return Result(
        "P2",
        f"first index, {c.describe()}, {'cold' if cold else 'warm'}",
        ratio,
        "x",
        f">= {target}x",
        ratio >= target,
        f"treewatch {mbps:,.0f} MB/s ({ours.seconds:.2f} s), b3sum {ref_mbps:,.0f} MB/s ({ref.seconds:.2f} s)",
        {"ours_s": ours.seconds, "b3sum_s": ref.seconds, "bytes": c.bytes, "files": c.files},
    )


def bench_p2(b: Bench) -> Iterator[Result]:
    """P2: first-index throughput (walk + hash + database) vs b3sum on the same files.

    Both sides are timed from process start to exit. The large corpus is 8 GiB by default:
    b3sum hashes 2 GiB in ~0.3 s here, of which treewatch's start-up (the interpreter, its
    imports, a new database: ~0.1 s) would be a third, and throughput is not what it measures.
    """
    a = b.args
    corpora_and_targets = []
    if a.large_files:
        name = f"large-{a.large_files}x{a.large_size >> 20}M"
        corpora_and_targets.append(("large", b.corpus(corpora.large_spec(a.large_files, a.large_size), name), 0.95))
    if a.small_files:
        corpora_and_targets.append(
            ("small", b.corpus(corpora.small_spec(a.small_files), f"small-{a.small_files}"), 0.9)
        )
    for name, c, target in corpora_and_targets:
        yield _p2(b, name, c, target)
    if b.can_drop_caches("P2 cold"):
        for name, c, target in corpora_and_targets:
            yield _p2(b, name, c, target, cold=True)


def bench_rss(b: Bench) -> Iterator[Result]:
    """Peak RSS of the syncs P1 ran (first index and no-change), database bytes per entry."""
    if b.p1 is None:
        raise RuntimeError("RSS needs P1 (it measures P1's syncs)")
    c = b.p1.corpus
    for label, r in (("first index", b.p1.first_index), ("no-change sync", b.p1.no_change)):
        mb = r.max_rss / 2**20
        yield Result("RSS", f"peak RSS, {label}, {c.entries:,} entries", mb, "MiB", "<= 150 MiB", mb <= 150)
    size = db_bytes(b.p1.db)
    yield Result("DB", f"database size, {c.entries:,} entries", size / c.entries, "B/entry", "", None, human(size))


# --- the daemon (issue 4): P3 latency, P4 idle cost, P5 storm ---------------------------------


def commit_latency(d: Daemon, folder: Path, names: Sequence[str]) -> float:
    """Write ``names`` into ``folder``, then poll the feed read-only every ~2 ms until all of them
    are in it as added: seconds from the last write's quiet window closing to that commit."""
    wanted = {n.encode() for n in names}
    with closing(sqlite3.connect(sqlite_uri(d.db, "mode=ro"), uri=True)) as db:
        seq = int(db.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])
        for i, name in enumerate(names):
            (folder / name).write_bytes(i.to_bytes(4, "little") + b"p3" * 500)
        t_last_write = time.monotonic()
        deadline = t_last_write + 60
        while True:
            rows = db.execute("SELECT seq, path FROM changes WHERE seq > ? AND op = 'added'", (seq,)).fetchall()
            t_seen = time.monotonic()
            for row_seq, path in rows:
                seq = max(seq, int(row_seq))
                wanted.discard(bytes(path).rsplit(b"/", 1)[-1])
            if not wanted:
                return t_seen - (t_last_write + DEBOUNCE_S)
            if t_seen > deadline:
                raise RuntimeError(f"{len(wanted)} of {len(names)} files not in the feed after 60 s:\n{tail(d.log)}")
            time.sleep(0.002)


def bench_p3(b: Bench) -> Iterator[Result]:
    """P3: from a path's quiet window closing to its change being committed (seen in the feed),
    for 1 and for 100 new files in one folder, on each ``--live-entries`` tree."""
    medians: dict[tuple[int, int], float] = {}
    for entries in b.args.live_entries:
        c = photos(b, entries)
        folder = photo_folders(c.root, 1)[0]
        created: list[Path] = []
        mtimes = {folder: folder.stat().st_mtime_ns}
        try:
            with b.daemon(c, b.live_db(c), f"P3-{entries}") as d:
                b.notes.append(f"P3, {entries:,} entries: startup sync {d.startup_s:.1f} s, {load()}")
                for n in (1, 100):
                    times: list[float] = []
                    for r in range(b.args.live_rounds):
                        names = [f"bench-p3-{n}-{r}-{i:03d}.jpg" for i in range(n)]
                        created += [folder / name for name in names]
                        times.append(commit_latency(d, folder, names))
                        d.quiet()
                    ms = [t * 1000 for t in times]
                    median = statistics.median(ms)
                    medians[(entries, n)] = median
                    yield Result(
                        "P3",
                        f"window closed to committed, {n} new file{'s' * (n > 1)} in a folder, {c.entries:,} entries",
                        median,
                        "ms",
                        "<= 100 ms (median)",
                        median <= 100,
                        f"max {max(ms):.0f} ms; rounds " + ", ".join(f"{t:.0f}" for t in ms),
                        {"median_ms": median, "max_ms": max(ms), "entries": c.entries, "files": n},
                    )
        finally:
            restore(created, mtimes)
    small, large = min(b.args.live_entries), max(b.args.live_entries)
    if small != large:
        for n in (1, 100):
            ratio = medians[(large, n)] / medians[(small, n)]
            yield Result(
                "P3",
                f"flat: {n} file{'s' * (n > 1)}, {large:,} vs {small:,} entries (medians)",
                ratio,
                "x",
                "<= 1.2x",
                ratio <= 1.2,
                f"{medians[(large, n)]:.0f} ms vs {medians[(small, n)]:.0f} ms",
            )


def bench_p4(b: Bench) -> Iterator[Result]:
    """P4: an idle daemon after its startup sync: RSS, CPU over ``--idle-seconds``, and writes
    (it is meant to write nothing while idle: the database files' mtimes and /proc/PID/io)."""
    for entries in b.args.live_entries:
        c = photos(b, entries)
        db = b.live_db(c)
        with b.daemon(c, db, f"P4-{entries}") as d:
            b.notes.append(f"P4, {entries:,} entries: startup sync {d.startup_s:.1f} s, {load()}")
            time.sleep(3)  # past the last publish of the idle state
            files = [Path(f"{db}{s}") for s in ("", "-wal", "-shm")]
            before = {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists()}
            io0, cpu0, threads0, t0 = d.io(), d.cpu_s(), d.cpu_ns_by_thread(), time.monotonic()
            rss: list[int] = []
            while time.monotonic() - t0 < b.args.idle_seconds:
                rss.append(d.memory()["VmRSS"])
                time.sleep(1)
            io1, cpu1, threads1, seconds = d.io(), d.cpu_s(), d.cpu_ns_by_thread(), time.monotonic() - t0
            after = {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists()}
            memory = d.memory()
        changed = [f.name for f in set(before) | set(after) if before.get(f) != after.get(f)]
        mb = max(rss) / 1e6
        yield Result(
            "P4",
            f"idle RSS, {c.entries:,} entries",
            mb,
            "MB",
            "<= 80 MB",
            mb <= 80,
            f"peak since start (VmHWM, startup sync included) {memory['VmHWM'] / 1e6:.1f} MB",
            {"rss_bytes": max(rss), "hwm_bytes": memory["VmHWM"], "entries": c.entries},
        )
        ticks = cpu1 - cpu0
        if threads0.keys() == threads1.keys():  # the same threads throughout: the scheduler's ns
            cpu = sum(threads1[t] - threads0[t] for t in threads1) / 1e9
            how = f"{cpu * 1000:.1f} ms of CPU by the threads' schedstat; {ticks:.2f} s in clock ticks"
        else:
            cpu = ticks
            how = f"{cpu:.2f} CPU s in clock ticks of {1 / CLK_TCK:.2f} s (threads came and went)"
        pct = 100 * cpu / seconds
        yield Result(
            "P4",
            f"idle CPU over {seconds:.0f} s, {c.entries:,} entries",
            pct,
            "%",
            "<= 0.1 %",
            pct <= 0.1,
            how,
            {"cpu_s": cpu, "ticks_cpu_s": ticks, "seconds": seconds},
        )
        written = {k: io1[k] - io0[k] for k in ("wchar", "syscw", "write_bytes")}
        yield Result(
            "P4",
            f"idle writes over {seconds:.0f} s, {c.entries:,} entries",
            written["write_bytes"],
            "B",
            "0, files untouched",
            written["write_bytes"] == 0 and written["syscw"] == 0 and not changed,
            f"{written['syscw']} write calls, {written['wchar']} B written; "
            + (f"changed: {', '.join(sorted(changed))}" if changed else "database files untouched"),
            {k: float(v) for k, v in written.items()},
        )


STORM_FILES = 1000  # per folder
STORM = """
import os, sys
for n, folder in enumerate(sys.argv[2:]):
    for i in range(int(sys.argv[1])):
        with open(os.path.join(folder, f"bench-storm-{i:04d}.jpg"), "xb") as f:
            f.write((n * 100000 + i).to_bytes(8, "little") + bytes(1016))
"""


def bench_p5(b: Bench) -> Iterator[Result]:
    """P5: 100 existing folders x 1000 new files written by another process while the daemon
    watches: its RSS and CPU seconds until it has them all and is idle again, and how long that took."""
    entries = b.args.storm_entries
    c = b.corpus(corpora.photos_spec(entries), f"photos-{entries}")
    folders = photo_folders(c.root, 100)
    if len(folders) < 100:
        raise RuntimeError(f"{c.root} has {len(folders)} photo folders, P5 needs 100 (--storm-entries)")
    total = len(folders) * STORM_FILES
    created = [f / f"bench-storm-{i:04d}.jpg" for f in folders for i in range(STORM_FILES)]
    mtimes = {f: f.stat().st_mtime_ns for f in folders}
    try:
        with b.daemon(c, b.live_db(c), "P5") as d:
            b.notes.append(f"P5, {c.entries:,} entries: startup sync {d.startup_s:.1f} s, {load()}")
            s = d.status()
            base, overflows, counters = s["roots"][0]["files"], s["roots"][0]["overflows"], s["counters"]
            hwm0, cpu0, t0 = d.memory()["VmHWM"], d.cpu_s(), time.monotonic()
            writer = subprocess.Popen([b.python, "-c", STORM, str(STORM_FILES), *map(str, folders)])
            written: float | None = None
            peak = 0

            def converged(s: dict[str, Any]) -> bool:
                nonlocal written, peak
                peak = max(peak, d.memory()["VmRSS"])
                if written is None and writer.poll() is not None:
                    written = time.monotonic() - t0
                return written is not None and s["roots"][0]["files"] == base + total and quiet(s)

            s = d.wait(converged, 1800, f"{total:,} new files in the index")
            seconds, cpu, memory = time.monotonic() - t0, d.cpu_s() - cpu0, d.memory()
        if writer.wait() != 0:
            raise RuntimeError(f"the storm writer exited with {writer.returncode}")
    finally:
        restore(created, mtimes)
    b.notes.append(f"P5 end: {load()}")
    if memory["VmHWM"] > hwm0:  # the storm set the process's peak: exact
        peak = max(peak, memory["VmHWM"])
    root = s["roots"][0]
    scans = ", ".join(f"{n - counters['scans'][k]} {k}" for k, n in s["counters"]["scans"].items())
    what = f"{len(folders)} folders x {STORM_FILES:,} new files, {c.entries:,} entries"
    yield Result(
        "P5",
        f"peak RSS, storm of {what}",
        peak / 1e6,
        "MB",
        "",
        None,
        f"idle before: {hwm0 / 1e6:.1f} MB (VmHWM)",
        {"peak_bytes": peak, "hwm_before_bytes": hwm0},
    )
    yield Result(
        "P5",
        "CPU seconds, storm to idle",
        cpu,
        "s",
        "",
        None,
        f"{1000 * cpu / total:.2f} ms per file",
        {"cpu_s": cpu, "files": total},
    )
    assert written is not None
    yield Result(
        "P5",
        "time to converge, from the first write",
        seconds,
        "s",
        "",
        None,
        f"writer took {written:.1f} s; {seconds - written:.1f} s after it; overflows {root['overflows'] - overflows}, "
        f"escalations {s['counters']['escalations'] - counters['escalations']}, scans: {scans}",
        {"seconds": seconds, "writer_s": written, "overflows": root["overflows"] - overflows},
    )


def bench_fleet(b: Bench) -> Iterator[Result]:
    """F: the fleet catalogue (bench/fleet_bench.py): the stream's rows/s, a 1M-entry snapshot
    load, the latency of a change while following. Skipped, in one line, without PostgreSQL."""
    from bench import fleet_bench
    from tests import pg_cluster

    if (why := pg_cluster.available()) is not None:
        b.notes.append(f"F skipped: {why}")
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fleet-", dir=b.out) as tmp:
        f = fleet_bench.measure(b.args.fleet_entries, b.args.fleet_stream_rows, b.args.live_rounds * 2, Path(tmp))
    yield Result("F1", f"stream: {f.stream_rows:,} feed rows applied", f.rows_per_second, "rows/s", ">= 50,000",
                 f.rows_per_second >= 50_000, f"{f.stream_seconds:.1f} s, `treewatch replicate` wall time")  # fmt: skip
    yield Result("F2", f"snapshot load of {f.load_entries:,} entries", f.load_seconds, "s", "< 60 s (1M)",
                 f.load_seconds < 60 if f.load_entries >= 1_000_000 else None,
                 f"{f.load_entries / f.load_seconds:,.0f} rows/s")  # fmt: skip
    median = statistics.median(f.follow_latencies)
    worst = max(f.follow_latencies)
    yield Result("F3", "follow: commit on the box to row in the catalogue", median * 1000, "ms", "< 2 s", worst < 2,
                 f"median of {len(f.follow_latencies)}, max {worst * 1000:.0f} ms")  # fmt: skip


BENCHMARKS: dict[str, Callable[[Bench], Iterator[Result]]] = {
    "P1": bench_p1,
    "P2": bench_p2,
    "RSS": bench_rss,
    "P3": bench_p3,
    "P4": bench_p4,
    "P5": bench_p5,
    "F1": feed_bench.bench_f1,
    "F2": feed_bench.bench_f2,
    "F3": feed_bench.bench_f3,
    "W1": scale_bench.bench_w1,
    "E1": scale_bench.bench_e1,
    "F": bench_fleet,
}


def entry_counts(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=200_000, help="P1/RSS corpus size, files + folders (200000)")
    p.add_argument("--empty-photos", action="store_true",
                   help="P1, RSS, P3, P4: empty photos (sidecars stay small): a 10M-entry tree fits")  # fmt: skip
    p.add_argument("--large-files", type=int, default=8, help="P2 large corpus: how many files (8)")
    p.add_argument("--large-size", type=int, default=1 << 30, help="P2 large corpus: bytes per file (1 GiB)")
    p.add_argument("--small-files", type=int, default=100_000, help="P2 small corpus: how many files (100000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per pair, best counts (3)")
    p.add_argument("--live-entries", type=entry_counts, default=[10_000], help="P3/P4 trees, comma-separated (10000)")
    p.add_argument("--live-rounds", type=int, default=5, help="P3: rounds per figure, median and max count (5)")
    p.add_argument("--idle-seconds", type=float, default=60, help="P4: how long the idle daemon is watched (60)")
    p.add_argument("--watch-folders", type=entry_counts, default=[100_000],
                   help="W1 trees of empty folders, comma-separated (100000)")  # fmt: skip
    p.add_argument("--storm-entries", type=int, default=200_000, help="P5 tree; it needs 100 photo folders (200000)")
    p.add_argument("--fleet-entries", type=int, default=1_000_000, help="F: the snapshot's box (1000000)")
    p.add_argument("--fleet-stream-rows", type=int, default=200_000, help="F: feed rows streamed (200000)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    p.add_argument("--profile", action="store_true", help="also record a py-spy profile of each scan")
    p.add_argument("--corpus-dir", type=Path, default=HERE / "corpus", help="where corpora live (bench/corpus)")
    p.add_argument("--out", type=Path, default=HERE / "out", help="databases, profiles, results (bench/out)")
    args = p.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if "RSS" in chosen and "P1" not in chosen:
        chosen.insert(0, "P1")
    for tool in ("find", "b3sum", "xargs"):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed (b3sum: apt-get install b3sum)")

    # As installed (pip compiles it), treewatch starts from bytecode; a checkout run with
    # PYTHONDONTWRITEBYTECODE set would compile its modules in every timed run (~20 ms).
    compileall.compile_dir(str(HERE.parent / "daemon"), quiet=1)
    b = Bench(args)
    started = datetime.datetime.now(datetime.UTC)
    results: list[Result] = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        for r in BENCHMARKS[name](b):
            results.append(r)
            print("  " + " | ".join(c for c in r.cells() if c), file=sys.stderr, flush=True)

    report = "\n".join(
        [
            f"treewatch benchmarks, {started:%Y-%m-%d %H:%M} UTC, {machine()}",
            f"best of {args.rounds} alternating rounds after a warm-up run, warm page cache",
            *b.notes,
            "",
            table(results),
        ]
    )
    print("\n" + report)
    stamp = f"{started:%Y%m%dT%H%M%S}"
    (args.out / f"results-{stamp}.md").write_text(report + "\n")
    (args.out / f"results-{stamp}.json").write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "machine": machine(),
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": [asdict(r) for r in results],
            },
            indent=1,
        )
    )
    return 0 if all(r.ok is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
