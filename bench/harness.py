"""What every benchmark uses: running and timing a command, the treewatch commands and a daemon
watched from outside, the result rows and their table, the machine's description.

`bench/run.py` is the entry point (`make bench`); the benchmarks are functions in it and in the
other bench modules, each taking a `Bench` and yielding `Result`s.
"""

from __future__ import annotations

import argparse
import collections
import compileall
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import corpus as corpora
from bench.corpus import Corpus, human
from daemon.index import sqlite_uri

HERE = Path(__file__).resolve().parent


REPO = HERE.parent


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
        if self.unit == "%":
            value = f"{self.value:.3f} %"  # idle CPU: 0.1 % is the target
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
    out.parent.mkdir(exist_ok=True)  # also when --out puts the results elsewhere
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
        # Every timed command is a new interpreter: the package's bytecode is brought up to date
        # first, as an install does. Otherwise, with PYTHONDONTWRITEBYTECODE set or a read-only
        # checkout, each run compiles again every module edited since its .pyc was written
        # (`import daemon.scan` 42 ms against 32 ms: a fifth of the gap P2's 8 GiB measures).
        compileall.compile_dir(REPO / "daemon", quiet=1)
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = self.out / "bench.toml"
        # Only the defaults, written down: a config in /etc or $TREEWATCH_CONFIG must not change the figures.
        self.config.write_text("[sync]\nhash_workers = 2\nbatch_size = 1000\n")
        # The daemon's (P3-P5): a short quiet window, no periodic full sync, the startup sync on.
        self.daemon_config = self.out / "daemon.toml"
        self.daemon_config.write_text(
            f"[watch]\ndebounce_s = {DEBOUNCE_S}\nmax_delay_s = 5.0\n"
            "[sync]\nfull_interval_s = 0\nstartup = true\nhash_workers = 2\nbatch_size = 1000\n"
            '[log]\nlevel = "info"\n'
        )
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

    def pair(
        self, ours: Callable[[], Run], reference: Callable[[], Run], *, cold: bool = False
    ) -> tuple[list[Run], list[Run]]:
        """Warm both up once, then alternate ``rounds`` times: (our runs, reference runs).

        ``cold``: the page cache (and dentries, inodes) dropped before every run instead, so
        each reads the disk as after a reboot; the database is cold too, as it would be."""
        if not cold:
            reference()
            ours()
        mine: list[Run] = []
        refs: list[Run] = []
        for _ in range(self.rounds):
            for side, runs in ((reference, refs), (ours, mine)):
                if cold:
                    drop_caches()
                runs.append(side())
        return mine, refs

    def can_drop_caches(self, what: str) -> bool:
        """Cold figures need root (/proc/sys/vm/drop_caches); elsewhere they are skipped, once, saying why."""
        if os.access(DROP_CACHES, os.W_OK):
            return True
        self.notes.append(f"{what}: skipped, dropping the page cache needs root ({DROP_CACHES})")
        return False

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
        """`treewatch run` on a corpus with the daemon's config (its pid gives RSS and CPU from /proc)."""
        return [
            self.python,
            "-m",
            "daemon",
            "--config",
            str(self.daemon_config),
            "--db",
            str(db),
            "run",
            "--root",
            str(root),
        ]

    def live_db(self, c: Corpus) -> Path:
        """A fresh database for a daemon on corpus ``c``: a copy of P1's index of the same corpus
        when there is one (the startup sync is then a no-change sync), else empty (a first index)."""
        db = self.out / f"live-{c.root.name}.db"
        drop_db(db)
        indexed = self.out / f"{c.root.name}.db"
        if indexed.exists():
            with (
                closing(sqlite3.connect(sqlite_uri(indexed, "mode=ro"), uri=True)) as src,
                closing(sqlite3.connect(db)) as dst,
            ):
                src.backup(dst)
        else:
            self.notes.append(f"{c.root.name}: no P1 index to copy, the daemon's startup sync is a first index")
        return db

    def daemon(self, c: Corpus, db: Path, name: str) -> Daemon:
        """`treewatch run` on ``c``, started, with its startup sync done."""
        return Daemon(self, db, c.root, self.out / f"{name}.log").start()


DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_caches() -> None:
    """Write back, then drop the page cache, dentries and inodes (vm/drop_caches = 3)."""
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def drop_db(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def db_bytes(db: Path) -> int:
    return sum(Path(f"{db}{s}").stat().st_size for s in ("", "-wal") if Path(f"{db}{s}").exists())


DEBOUNCE_S = 0.2  # the daemon's quiet window in P3-P5


CLK_TCK = os.sysconf("SC_CLK_TCK")


class Daemon:
    """A `treewatch run` subprocess, watched from outside: `status --json`, the database read-only
    (SQLite URI mode=ro), and the process from /proc. A context manager: leaving it stops the daemon."""

    def __init__(self, b: Bench, db: Path, root: Path, log: Path) -> None:
        self.b, self.db, self.root, self.log = b, db, root, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the daemon was not started")
        return self.proc.pid

    def start(self) -> Daemon:
        """Start it and wait until its startup sync is done and it is idle with nothing pending."""
        full = self.status()["counters"]["scans"]["full"] if self.db.exists() else 0
        started = time.monotonic()
        with self.log.open("ab") as log:
            argv = self.b.daemon_argv(self.db, self.root)
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.b.env)
        try:
            self.wait(lambda s: s["counters"]["scans"]["full"] > full and quiet(s), 1800, "the startup sync")
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def status(self) -> dict[str, Any]:
        argv = [self.b.python, "-m", "daemon", "--config", str(self.b.daemon_config), "--db", str(self.db)]
        argv += ["status", "--json"]
        r = subprocess.run(argv, check=False, capture_output=True, text=True, env=self.b.env, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"status exited with {r.returncode}: {r.stderr[-2000:]}")
        data: dict[str, Any] = json.loads(r.stdout)
        return data

    def wait(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float, what: str, every: float = 0.25
    ) -> dict[str, Any]:
        """Poll `status --json` until ``condition`` holds; the daemon dying or the deadline passing raise."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited waiting for {what}:\n{tail(self.log)}")
            try:
                s: dict[str, Any] | None = self.status()
            except RuntimeError:  # e.g. the database is being created
                s = None
            if s is not None and condition(s):
                return s
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{tail(self.log)}")
            time.sleep(every)

    def quiet(self, timeout: float = 600) -> dict[str, Any]:
        return self.wait(quiet, timeout, "the daemon to be idle")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the whole process (all threads), from /proc/PID/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def cpu_ns_by_thread(self) -> dict[int, int]:
        """Each live thread's CPU time in ns, from /proc/PID/task/TID/schedstat (the scheduler's
        own count). /proc/PID/stat rounds to clock ticks of 10 ms: over P4's 60 s, 6 ticks are
        its whole 0.1 % budget, so one tick either way moves the figure by a sixth."""
        out: dict[int, int] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread ended meanwhile
                out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        return out

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS since start) in bytes, from /proc/PID/status."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def io(self) -> dict[str, int]:
        """/proc/PID/io: wchar and syscw count every write(2) (log lines too), write_bytes what reached storage."""
        rows = (line.partition(":") for line in Path(f"/proc/{self.pid}/io").read_text().splitlines())
        return {k: int(v) for k, _, v in rows}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def quiet(s: dict[str, Any]) -> bool:
    """`status --json` of a running daemon with nothing to do: idle, nothing pending, no scan."""
    d = s["daemon"]
    return bool(
        d is not None
        and d["activity"] == "idle"
        and all(r["pending"] == 0 and r["state"] != "scanning" for r in s["roots"])
    )


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


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


def sh(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


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


def photo_folders(root: Path, n: int) -> list[Path]:
    """The first ``n`` folders that hold photos, walking the corpus in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(f.endswith(".JPG") for f in filenames):
            found.append(Path(dirpath))
            if len(found) == n:
                break
    return found


def restore(created: Sequence[Path], mtimes: dict[Path, int]) -> None:
    """Put a corpus back as it was generated: remove what a benchmark wrote, reset folder mtimes."""
    for path in created:
        path.unlink(missing_ok=True)
    for folder, mtime_ns in mtimes.items():
        os.utime(folder, ns=(mtime_ns, mtime_ns))
