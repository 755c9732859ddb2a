"""A damaged index of a 1 GB library: how much `treewatch repair` re-reads, and how long it takes.

The library is a photos corpus (bench/corpus.py, reused between runs, never committed). It is
indexed by a real `scan`; then runs of 4 KiB of the index file, at random offsets, are
overwritten with random bytes (as a failing card or a lying disk cache leaves it; page 1, the
schema, and the page of `roots` are spared: without either nothing can be salvaged, and all is
read again). `treewatch repair --root` then sets the file aside, salvages it, builds the new
index and syncs the library; the new index's counters say how many bytes the sync hashed.

    python -m bench.repair_bench [--entries 60000] [--chunks 8] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpus import ensure, human, photos_spec
from tests.damage import damage

CORPUS = Path(__file__).resolve().parent / "corpus"


def treewatch(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "--db", str(db), *args], capture_output=True, text=True,
                          check=False)  # fmt: skip


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=60_000, help="files and folders of the corpus (~1 GB at 60000)")
    p.add_argument("--chunks", type=int, default=8, help="4 KiB runs overwritten")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    corpus = ensure(CORPUS / f"repair-{args.entries}", photos_spec(args.entries, min_size=8192, max_size=32768))
    print(f"library: {corpus.describe()}")
    work = Path(tempfile.mkdtemp(prefix="tw-repair-bench-"))
    try:
        db = work / "index.db"
        started = time.monotonic()
        treewatch(db, "scan", "--root", str(corpus.root)).check_returncode()
        print(f"first index: {time.monotonic() - started:.1f} s; index {human(db.stat().st_size)}")
        offsets = damage(db, args.seed, args.chunks)
        print(f"damaged: {len(offsets)} runs of 4 KiB at {', '.join(str(o) for o in offsets)}")
        status = treewatch(db, "status")
        print(f"status: exit {status.returncode}: {status.stderr.strip()}")
        started = time.monotonic()
        repaired = treewatch(db, "repair", "--root", str(corpus.root))
        total = time.monotonic() - started
        if repaired.returncode != 0:
            print(repaired.stdout, repaired.stderr, file=sys.stderr)
            return 1
        print(repaired.stdout.strip())
        counters = json.loads(treewatch(db, "status", "--json").stdout)["counters"]
        salvage = re.search(r"repaired in ([0-9.]+) s", repaired.stdout)
        sync = re.search(r"synced \d+ roots in ([0-9.]+) s", repaired.stdout)
        reread = counters["bytes_hashed"]
        print(
            f"re-read {counters['files_hashed']:,} files, {human(reread)} of {human(corpus.bytes)}"
            f" ({100 * reread / corpus.bytes:.2f} %); repair {salvage and salvage[1]} s + sync {sync and sync[1]} s,"
            f" {total:.1f} s in all (with the process's start)"
        )
        print(f"machine: {cpu_model()}, {time.strftime('%Y-%m-%d')}")
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
