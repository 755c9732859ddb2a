"""`make bench`: treewatch against reference tools, each as a ratio measured in the same run.

Every figure is a ratio against a reference command run back to back with treewatch, in the
same process, on the same files, with a warm page cache: each command runs once to warm up,
then the pair alternates ``--rounds`` times and the best time of each counts. The machine is
shared (other engineers run tests on it), so absolute times are noisy; the ratios much less.

    python -m bench.run                       # P1, P2, RSS on a 200k-entry corpus
    python -m bench.run --entries 1000000     # the 1M-entry figures (P1 and RSS)
    python -m bench.run --only P1 --profile   # and a py-spy profile of the scan

Benchmarks are functions in ``BENCHMARKS``: each takes the ``Bench`` context (arguments,
corpora, a way to time commands) and returns ``Result`` rows. P3-P5 (live watching, issue 4)
register there once ``treewatch run`` exists; ``Bench.daemon`` is the hook to start it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import corpus as corpora
from bench.corpus import Corpus, human

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIND_FORMAT = "%i %s %T@ %p\n"


@dataclass(frozen=True, slots=True)
class Run:
    """One command's wall time and, from wait4, its own CPU time and peak RSS."""

    seconds: float
    user: float
    sys: float
    max_rss: int  # bytes
    stdout: str


@dataclass(frozen=True, slots=True)
class P1Runs:
    corpus: Corpus
    db: Path
    first_index: Run
    no_change: Run


@dataclass(slots=True)
class Result:
    """One line of a benchmark's table."""

    bench: str
    what: str
    value: float  # the figure: a ratio (ours / reference, or reference / ours for throughput), MB, ...
    unit: str  # "x" for ratios
    target: str
    ok: bool | None
    detail: str = ""
    figures: dict[str, float] = field(default_factory=dict)

    def cells(self) -> list[str]:
        value = f"{self.value:.2f}x" if self.unit == "x" else f"{self.value:,.1f} {self.unit}"
        ok = "" if self.ok is None else ("yes" if self.ok else "**no**")
        return [self.bench, self.what, value, self.target, ok, self.detail]


TIME = "/usr/bin/time"  # GNU time (Debian package `time`), for peak RSS


def run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, shell: bool = False, keep_stdout: bool = True
) -> Run:
    """Run a command to completion, timing it; its stdout is kept or discarded (stderr passes through).

    Peak RSS comes from GNU time when it is installed: wait4's ru_maxrss is not the child's
    alone, since exec carries over the high-water mark of the forked copy of this process.
    """
    out = HERE / "out" / "stdout.txt"
    rss_file = HERE / "out" / "maxrss.txt"
    command = list(argv) if not shell else ["bash", "-c", argv[0]]
    timed = os.access(TIME, os.X_OK)
    if timed:
        rss_file.unlink(missing_ok=True)
        command = [TIME, "-f", "%M", "-o", str(rss_file), *command]
    with out.open("w+b") as f:
        started = time.perf_counter()
        p = subprocess.Popen(command, stdout=f if keep_stdout else subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - started
        p.returncode = os.waitstatus_to_exitcode(status)
        f.seek(0)
        text = f.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {p.returncode}: {text[-2000:]}")
    max_rss = int(rss_file.read_text().split()[-1]) * 1024 if timed else usage.ru_maxrss * 1024
    return Run(seconds, usage.ru_utime, usage.ru_stime, max_rss, text)


class Bench:
    """What a benchmark needs: its arguments, corpora, the treewatch command, timing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.corpus_dir: Path = args.corpus_dir
        self.rounds: int = args.rounds
        self.python = sys.executable
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = self.out / "bench.toml"
        # Only the defaults, written down: a config in /etc or $TREEWATCH_CONFIG must not change the figures.
        self.config.write_text("[sync]\nhash_workers = 2\nbatch_size = 1000\n")
        self.env = {k: v for k, v in os.environ.items() if k != "TREEWATCH_CONFIG"}
        self.notes: list[str] = []
        self.p1: P1Runs | None = None  # P1's syncs, which RSS and DB report on

    def corpus(self, spec: corpora.Spec, name: str) -> Corpus:
        c = corpora.ensure(self.corpus_dir / name, spec)
        if c.seconds:
            self.notes.append(f"generated {c.describe()} in {c.seconds:.0f} s")
        return c

    def scan_argv(self, db: Path, root: Path) -> list[str]:
        return [self.python, "-m", "daemon", "--config", str(self.config), "--db", str(db), "scan", "--root", str(root)]

    def scan(self, db: Path, root: Path, *, fresh: bool) -> Run:
        """`treewatch scan` as a user runs it: a new process, the database on disk."""
        if fresh:
            drop_db(db)
        r = run(self.scan_argv(db, root), env=self.env)
        if "0 errors" not in r.stdout:
            raise RuntimeError(f"scan of {root} was not clean: {r.stdout}")
        return r

    def pair(self, ours: Callable[[], Run], reference: Callable[[], Run]) -> tuple[list[Run], list[Run]]:
        """Warm both up once, then alternate ``rounds`` times: (our runs, reference runs)."""
        reference()
        ours()
        mine: list[Run] = []
        refs: list[Run] = []
        for _ in range(self.rounds):
            refs.append(reference())
            mine.append(ours())
        return mine, refs

    def profile(self, name: str, db: Path, root: Path, *, fresh: bool) -> None:
        """py-spy record one scan into out/NAME.speedscope.json and a text summary."""
        pyspy = shutil.which("py-spy", path=str(Path(self.python).parent)) or shutil.which("py-spy")
        if pyspy is None:
            self.notes.append("py-spy not installed (pip install -e '.[dev]'): no profile")
            return
        if fresh:
            drop_db(db)
        raw = self.out / f"{name}.collapsed.txt"
        common = [pyspy, "record", "--rate", "250", "--threads", "--nonblocking", "--full-filenames"]
        run([*common, "--format", "raw", "-o", str(raw), "--", *self.scan_argv(db, root)], env=self.env)
        summary = summarise_profile(raw)
        (self.out / f"{name}.profile.txt").write_text(summary)
        print(f"\n--- profile: {name} ---\n{summary}")

    def daemon_argv(self, db: Path, root: Path) -> list[str]:
        """The hook for P3-P5 (issue 4): `treewatch run` on a corpus, to start with subprocess.Popen
        (its pid gives RSS and CPU from /proc/PID/status and /proc/PID/stat)."""
        return [self.python, "-m", "daemon", "--config", str(self.config), "--db", str(db), "run", "--root", str(root)]


def drop_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def db_bytes(db: Path) -> int:
    return sum(Path(f"{db}{s}").stat().st_size for s in ("", "-wal") if Path(f"{db}{s}").exists())


def best(runs: Sequence[Run]) -> Run:
    return min(runs, key=lambda r: r.seconds)


def summarise_profile(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [short_frame(f) for f in stack.split(";")]
        if frames and frames[0].startswith("thread"):
            frames = frames[1:]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for frame in set(frames):
            incl_n[frame] += n
    lines = [f"{total} samples (all threads)", "", "self %   function"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in self_n.most_common(top)]
    lines += ["", "incl %   function"]
    lines += [f"{100 * n / total:5.1f}   {f}" for f, n in incl_n.most_common(top)]
    return "\n".join(lines) + "\n"


def short_frame(frame: str) -> str:
    """'func (/path/to/daemon/walk.py:12)' -> 'func (daemon/walk.py:12)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/daemon/", "/bench/", "/lib/python3.11/", "/site-packages/"):
        if marker in where:
            where = where[where.rindex(marker) + 1 :]
            break
    where = where.rsplit(":", 1)[0]  # per function, not per line
    return f"{name} ({where})" if where else name


# --- the benchmarks ---------------------------------------------------------------------------


def bench_p1(b: Bench) -> Iterator[Result]:
    """P1: no-change full sync of an indexed tree vs `find -printf` (stat of every entry)."""
    c = b.corpus(corpora.photos_spec(b.args.entries), f"photos-{b.args.entries}")
    db = b.out / f"photos-{b.args.entries}.db"
    first = b.scan(db, c.root, fresh=True)
    if b.args.profile:
        b.profile("P1-no-change", db, c.root, fresh=False)
    find = ["find", str(c.root), "-printf", FIND_FORMAT]
    mine, refs = b.pair(lambda: b.scan(db, c.root, fresh=False), lambda: run(find, keep_stdout=False))
    for r in mine:
        if " 0 added, 0 modified, 0 deleted, 0 renamed, 0 metadata" not in r.stdout:
            raise RuntimeError(f"no-change sync changed something: {r.stdout}")
    ours, ref = best(mine), best(refs)
    b.p1 = P1Runs(c, db, first, ours)
    ratio = ours.seconds / ref.seconds
    yield Result(
        "P1",
        f"no-change sync, {c.entries:,} entries",
        ratio,
        "x",
        "<= 2.0x (ambition 1.5x)",
        ratio <= 2.0,
        f"treewatch {ours.seconds:.2f} s, find {ref.seconds:.2f} s",
        {"ours_s": ours.seconds, "find_s": ref.seconds, "entries": c.entries},
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


def _p2(b: Bench, name: str, c: Corpus, target: float) -> Result:
    db = b.out / f"{name}.db"
    if b.args.profile:
        b.profile(f"P2-{name}", db, c.root, fresh=True)
    b3sum = [f"find {sh(c.root)} -type f -print0 | xargs -0 b3sum >/dev/null"]
    mine, refs = b.pair(lambda: b.scan(db, c.root, fresh=True), lambda: run(b3sum, shell=True))
    ours, ref = best(mine), best(refs)
    ratio = ref.seconds / ours.seconds  # throughput ratio: same bytes
    mbps = c.bytes / ours.seconds / 1e6
    ref_mbps = c.bytes / ref.seconds / 1e6
    drop_db(db)
    return Result(
        "P2",
        f"first index, {c.describe()}",
        ratio,
        "x",
        f">= {target}x",
        ratio >= target,
        f"treewatch {mbps:,.0f} MB/s ({ours.seconds:.2f} s), b3sum {ref_mbps:,.0f} MB/s ({ref.seconds:.2f} s)",
        {"ours_s": ours.seconds, "b3sum_s": ref.seconds, "bytes": c.bytes, "files": c.files},
    )


def bench_p2(b: Bench) -> Iterator[Result]:
    """P2: first-index throughput (walk + hash + database) vs b3sum on the same files."""
    a = b.args
    large = b.corpus(corpora.large_spec(a.large_files, a.large_size), f"large-{a.large_files}x{a.large_size >> 20}M")
    yield _p2(b, "large", large, 0.9)
    small = b.corpus(corpora.small_spec(a.small_files), f"small-{a.small_files}")
    yield _p2(b, "small", small, 0.7)


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


def sh(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


# P3-P5 (issue 4: event-to-commit latency, idle RSS/CPU, storm) are added here once `treewatch run`
# exists: a function (Bench) -> Iterator[Result], listed in this table under its name.
BENCHMARKS: dict[str, Callable[[Bench], Iterator[Result]]] = {"P1": bench_p1, "P2": bench_p2, "RSS": bench_rss}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    system = f"Linux {platform.release()}, Python {platform.python_version()}"
    return f"{os.cpu_count()} cores ({cpu}), {human(mem)} RAM, {system}"


def table(results: Sequence[Result]) -> str:
    head = ["bench", "what", "figure", "target", "met", "detail"]
    rows = [head, ["---"] * len(head), *[r.cells() for r in results]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=200_000, help="P1/RSS corpus size, files + folders (200000)")
    p.add_argument("--large-files", type=int, default=8, help="P2 large corpus: how many files (8)")
    p.add_argument("--large-size", type=int, default=256 << 20, help="P2 large corpus: bytes per file (256 MiB)")
    p.add_argument("--small-files", type=int, default=100_000, help="P2 small corpus: how many files (100000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per pair, best counts (3)")
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
