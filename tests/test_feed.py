"""The change feed as a contract (docs/feed.md): epochs and resets, retention, --null, --follow,
snapshot + follow, save patterns — against real databases, real daemons and real programs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from daemon import feed
from daemon.config import FeedConfig
from daemon.index import Index
from tests.conftest import wait_for
from tests.daemon_harness import Daemon, write_config
from tests.engine import settle
from tests.oracle import cli, ls_json
from tests.torture_ops import apply, random_op, seed_tree

REPO = Path(__file__).resolve().parents[1]
EPOCH = re.compile(r"^[0-9a-f]{16}$")


def status(db: Path) -> dict[str, Any]:
    return dict(json.loads(cli(db, "status", "--json").stdout))


def changes(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(db, "changes", *args, check=False)


def scan(db: Path, root: Path, *extra: str) -> None:
    cli(db, *extra, "scan", "--root", str(root))


def feed_paths(db: Path) -> set[str]:
    return {row["path"] for row in ls_json(db)}


# --- epochs and resets ------------------------------------------------------------------------------


def test_status_names_the_feed_and_a_rebuilt_database_has_a_new_epoch(library: Path, db: Path) -> None:
    (library / "a.jpg").write_bytes(b"a")
    scan(db, library)
    first = status(db)
    assert EPOCH.match(first["feed"]["epoch"])
    assert first["feed"]["oldest_seq"] == 1 and first["feed"]["seq"] == first["seq"] > 0
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")
    scan(db, library)
    again = status(db)
    assert again["feed"]["epoch"] != first["feed"]["epoch"] and EPOCH.match(again["feed"]["epoch"])


def test_a_cursor_that_means_nothing_here_is_a_reset_with_exit_3(library: Path, db: Path) -> None:
    (library / "a.jpg").write_bytes(b"a")
    settle(library)  # else a.jpg is racily clean, and the next scan hashes it again (a `metadata` row)
    scan(db, library)
    old = status(db)["feed"]
    (library / "b.jpg").write_bytes(b"b")
    old_ns = time.time_ns() - 60 * 1_000_000_000  # dated back alone: settling all would move a.jpg's ctime
    os.utime(library / "b.jpg", ns=(old_ns, old_ns))
    scan(db, library)
    now = status(db)["feed"]
    # The cursor's own epoch, in range: the rest of the feed, exit 0.
    ok = changes(db, "--since", str(old["seq"]), "--epoch", old["epoch"], "--json")
    assert ok.returncode == 0 and [json.loads(line)["op"] for line in ok.stdout.splitlines()] == ["added"]
    cases = {
        "epoch": ("--since", "1", "--epoch", "0123456789abcdef"),
        "ahead": ("--since", str(now["seq"] + 5), "--epoch", now["epoch"]),
    }
    for reason, args in cases.items():
        got = changes(db, *args, "--json")
        assert got.returncode == 3, (reason, got.stderr)
        assert [json.loads(line) for line in got.stdout.splitlines()] == [{"reset": reason, **now}]
        text = changes(db, *args)
        assert text.returncode == 3 and text.stdout == ""
        assert len(text.stderr.splitlines()) == 1 and "snapshot" in text.stderr, text.stderr


# --- retention ------------------------------------------------------------------------------------


def _rows(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM changes").fetchone()[0])
    finally:
        con.close()


def test_retention_by_rows_bounds_the_feed_and_the_file_stops_growing(tmp_path: Path, library: Path, db: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'database = "{db}"\n[[roots]]\npath = "{library}"\n[feed]\nmax_rows = 300\n')
    files = [library / f"f{i:03d}.bin" for i in range(100)]
    sizes = []
    for round_ in range(30):  # every file rewritten each round: 100 `modified` rows a round
        for i, f in enumerate(files):
            f.write_bytes(bytes([round_ % 256, i]) * (50 + round_))
        cli(db, "--config", str(config), "scan")
        assert _rows(db) <= 300 + 100
        wal = Path(f"{db}-wal")  # checkpointed and removed when the last connection closes
        sizes.append(os.path.getsize(db) + (wal.stat().st_size if wal.exists() else 0))
    state = status(db)["feed"]
    assert state["oldest_seq"] > 1 and state["seq"] - state["oldest_seq"] + 1 == _rows(db)
    # The freed pages are reused: ten rounds more of the same churn do not grow the file.
    assert sizes[-1] <= sizes[19] * 1.05, sizes
    # Nothing newer than the window is lost: the held part replays to a gap-free run.
    held = [
        json.loads(line)["seq"]
        for line in changes(db, "--since", str(state["oldest_seq"] - 1), "--json").stdout.splitlines()
    ]
    assert held == list(range(state["oldest_seq"], state["seq"] + 1))
    expired = changes(db, "--since", "0", "--epoch", state["epoch"], "--json")
    assert expired.returncode == 3 and json.loads(expired.stdout)["reset"] == "expired"


def test_retention_by_age_under_the_daemon(tmp_path: Path, library: Path, db: Path) -> None:
    (library / "keep.jpg").write_bytes(b"k")
    d = Daemon(write_config(tmp_path / "c.toml", db, [library], extra="[feed]\nretention_s = 2\n"), db, [library],
               tmp_path / "d.log").start()  # fmt: skip
    try:
        d.wait_converged()
        first = status(db)["feed"]
        (library / "late.jpg").write_bytes(b"late")
        d.wait_converged()
        # The first index's rows are older than 2 s: pruned (the daemon prunes every second
        # with this window); late.jpg's row stays until it is 2 s old too.
        wait_for(lambda: status(db)["feed"]["oldest_seq"] > first["seq"], 30, what="the old rows to be pruned")
        got = changes(db, "--since", "0", "--epoch", first["epoch"], "--json")
        assert got.returncode == 3 and json.loads(got.stdout)["reset"] == "expired"
    finally:
        assert d.stop() == 0, d.log()[-2000:]


def test_pruning_goes_by_row_cap_and_by_age_oldest_first(db: Path) -> None:
    index = Index(db)
    try:
        with index.transaction():
            index.db.execute("INSERT INTO roots(path) VALUES (?)", (b"/r",))
            index.db.executemany(
                "INSERT INTO changes(seq, entry_id, root_id, op, kind, path, old_path, at)"
                " VALUES (?, 0, 1, 'added', 'file', ?, NULL, ?)",
                ((s, b"f%d" % s, 1000.0 + s) for s in range(1, 20_001)),
            )
        removed = feed.prune(index, FeedConfig(retention_s=0, max_rows=5000))
        assert removed == 15_000
        assert index.feed_state()[1:] == (15_001, 20_000)
        # Row s was written at 1000 + s: with 100 s of retention at this `now`, rows up to 17,000 go.
        removed = feed.prune(index, FeedConfig(retention_s=100.0, max_rows=0), now=1000.0 + 17_001 + 100)
        assert removed == 2000 and index.feed_state()[1] == 17_001
    finally:
        index.close()


# --- --null: what a backup job copies ---------------------------------------------------------------


def test_null_list_feeds_rsync_files_from(tmp_path: Path, library: Path, db: Path) -> None:
    (library / "old.jpg").write_bytes(b"old")
    (library / "gone.jpg").write_bytes(b"gone")
    scan(db, library)
    since = status(db)["feed"]["seq"]
    odd = [b"new\nline.jpg", b"caf\xe9.jpg", b"plain.jpg"]  # a newline, invalid UTF-8
    (library / "sub").mkdir()
    for name in odd:
        with open(os.path.join(os.fsencode(library / "sub"), name), "wb") as f:
            f.write(name * 3)
    (library / "old.jpg").write_bytes(b"old, edited")
    os.rename(library / "gone.jpg", library / "sub" / "moved.jpg")
    scan(db, library)
    result = subprocess.run([sys.executable, "-m", "daemon", "--db", str(db), "changes", "--since", str(since),
                             "--null"], capture_output=True, check=True)  # fmt: skip
    paths = result.stdout.split(b"\0")
    assert paths[-1] == b"" and len(set(paths[:-1])) == len(paths) - 1
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    subprocess.run(["rsync", "-a", "--from0", "--files-from=-", "/", str(mirror)], input=result.stdout, check=True)
    copied = {os.fsencode(p)[len(os.fsencode(mirror)) :] for p in _files_below(mirror)}
    want = {os.fsencode(library / "sub") + b"/" + n for n in [*odd, b"moved.jpg"]} | {os.fsencode(library / "old.jpg")}
    assert copied == want
    for path in want:
        with open(path, "rb") as a, open(os.fsencode(mirror) + path, "rb") as b:
            assert a.read() == b.read()


def _files_below(top: Path) -> Iterator[str]:
    for folder, _, names in os.walk(os.fsencode(top)):
        for name in names:
            yield os.fsdecode(os.path.join(folder, name))


# --- --follow ---------------------------------------------------------------------------------------


class Follower:
    """`treewatch changes --follow --json` in a subprocess, its lines read as they come."""

    def __init__(self, db: Path, since: int, epoch: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--db", str(db), "changes", "--since", str(since), "--epoch", epoch,
             "--json", "--follow"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.lines: list[dict[str, Any]] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.append(json.loads(line))

    def saw(self, pred: Any, what: str, timeout: float = 30) -> None:
        wait_for(lambda: any(pred(x) for x in self.lines) or self.proc.poll() is not None, timeout, what=what)
        assert any(pred(x) for x in self.lines), (what, self.lines[-5:], self.stderr())

    def stderr(self) -> str:
        return "" if self.proc.poll() is None or self.proc.stderr is None else self.proc.stderr.read()


def test_follow_prints_each_change_as_it_is_committed_and_stops_cleanly(library: Path, db: Path) -> None:
    (library / "a.jpg").write_bytes(b"a")
    scan(db, library)
    start = status(db)["feed"]
    f = Follower(db, 0, start["epoch"])
    try:
        f.saw(lambda c: c["seq"] == start["seq"], "the backlog")
        (library / "b.jpg").write_bytes(b"b")
        scan(db, library)
        f.saw(lambda c: c["path"].endswith("b.jpg") and c["op"] == "added", "the new change")
        seqs = [c["seq"] for c in f.lines]
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        f.proc.send_signal(signal.SIGTERM)
        assert f.proc.wait(10) == 0
    assert "Traceback" not in f.stderr()


def test_follow_ends_quietly_when_its_reader_goes(library: Path, db: Path) -> None:
    (library / "a.jpg").write_bytes(b"a")
    scan(db, library)
    follower = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--db", str(db), "changes", "--since", "0", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert follower.stdout is not None and follower.stderr is not None
    head = subprocess.Popen(["head", "-n", "1"], stdin=follower.stdout, stdout=subprocess.PIPE, text=True)
    follower.stdout.close()  # head alone holds the pipe's read end
    out, _ = head.communicate(timeout=30)  # head has taken its line and left; the follower does not know yet
    (library / "b.jpg").write_bytes(b"b")
    scan(db, library)  # its next write goes to a closed pipe
    assert follower.wait(timeout=30) == 0
    err = follower.stderr.read().decode()
    assert out.count("\n") == 1 and err == "", err


def test_watchdog_records_said_better_by_treewatch_do_not_reach_stderr(db: Path) -> None:
    """watchdog logs through `logging`, which nothing configures: Python's last-resort handler
    printed its records bare on stderr (a follower stopped while its watch read an event printed
    "InotifyEmitter.queue_events() called when the thread is inactive"). Those said better by
    treewatch are dropped; any other still reaches stderr."""
    Index(db).close()
    program = f"""
import logging
from pathlib import Path
from daemon import feed
emitter, reader = logging.getLogger("watchdog.observers.inotify"), logging.getLogger("watchdog.observers.inotify_c")
with feed.Waker(Path({str(db)!r})):
    emitter.error("InotifyEmitter.queue_events() called when the thread is inactive")
    reader.warning("Inotify queue overflowed; filesystem events were lost")
    emitter.error("a record of a later watchdog")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    assert done.stderr == "a record of a later watchdog\n"


def test_follow_survives_a_daemon_restart_and_ends_when_the_database_is_replaced(
    tmp_path: Path, library: Path, db: Path
) -> None:
    (library / "a.jpg").write_bytes(b"a")
    config = write_config(tmp_path / "c.toml", db, [library])
    d = Daemon(config, db, [library], tmp_path / "d.log").start()
    d.wait_converged()
    start = status(db)["feed"]
    f = Follower(db, start["seq"], start["epoch"])
    try:
        assert d.stop() == 0
        d = Daemon(config, db, [library], tmp_path / "d.log").start()
        (library / "after-restart.jpg").write_bytes(b"x")
        f.saw(lambda c: c["path"].endswith("after-restart.jpg"), "a change after the daemon restarted")
        assert d.stop() == 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{db}{suffix}")
        scan(db, library)  # a new database, a new epoch
        assert f.proc.wait(30) == 3
        assert f.lines[-1]["reset"] == "epoch" and f.lines[-1]["epoch"] != start["epoch"]
    finally:
        if f.proc.poll() is None:
            f.proc.kill()
        if d.alive():
            d.stop()


# --- snapshot, and the replay property under the daemon --------------------------------------------


def test_snapshot_is_ls_with_a_header(library: Path, db: Path) -> None:
    seed_tree(random.Random(3), library)
    scan(db, library)
    lines = [json.loads(x) for x in cli(db, "snapshot", "--json").stdout.splitlines()]
    state = status(db)["feed"]
    assert lines[0] == {"epoch": state["epoch"], "seq": state["seq"]}
    assert lines[1:] == ls_json(db)


def test_a_consumer_from_a_cursor_or_a_snapshot_ends_with_the_index(tmp_path: Path, library: Path, db: Path) -> None:
    """Under the running daemon with random operations: a consumer applying the feed from its
    stored cursor, and one that loaded a snapshot taken mid-burst and follows from it, both hold
    exactly the index's paths after every burst (the feed is a faithful log, and the snapshot
    is one position of it)."""
    rng = random.Random(20261206)
    outside = tmp_path / "outside"
    outside.mkdir()
    seed_tree(rng, library)
    d = Daemon(write_config(tmp_path / "c.toml", db, [library]), db, [library], tmp_path / "d.log").start()
    try:
        d.wait_converged()
        state = status(db)["feed"]
        cursor, held = 0, set()
        for burst in range(6):
            snap: list[dict[str, Any]] = []

            def take_snapshot() -> None:
                snap.extend(json.loads(x) for x in cli(db, "snapshot", "--json").stdout.splitlines())

            taker = threading.Thread(target=take_snapshot)
            for i in range(20):
                apply(random_op(rng), rng, library, outside)
                if i == 10:
                    taker.start()  # while the daemon writes the burst
            taker.join()
            d.wait_converged()
            for line in changes(db, "--since", str(cursor), "--epoch", state["epoch"], "--json").stdout.splitlines():
                c = json.loads(line)
                if c["op"] in ("deleted", "renamed"):
                    held.discard(c["old_path"] or c["path"])
                if c["op"] != "deleted":
                    held.add(c["path"])
                cursor = c["seq"]
            assert held == feed_paths(db), f"burst {burst}"
            from_snap = {row["path"] for row in snap[1:]}
            after = changes(db, "--since", str(snap[0]["seq"]), "--epoch", snap[0]["epoch"], "--json")
            for line in after.stdout.splitlines():
                c = json.loads(line)
                if c["op"] in ("deleted", "renamed"):
                    from_snap.discard(c["old_path"] or c["path"])
                if c["op"] != "deleted":
                    from_snap.add(c["path"])
            assert from_snap == feed_paths(db), f"burst {burst}: snapshot + feed"
    finally:
        assert d.stop() == 0, d.log()[-2000:]


def _documented_consumer() -> str:
    text = (REPO / "docs" / "feed.md").read_text()
    return text.split("## A consumer", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_consumer_in_docs_feed_md_works(tmp_path: Path, library: Path, db: Path) -> None:
    consumer = tmp_path / "consumer.py"
    consumer.write_text(_documented_consumer())
    state = tmp_path / "state.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run_it() -> set[str]:
        subprocess.run([sys.executable, str(consumer), str(db), str(state)], check=True, env=env, timeout=120)
        return set(json.loads(state.read_text())["paths"])

    rng = random.Random(7)
    seed_tree(rng, library)
    scan(db, library)
    assert run_it() == feed_paths(db)  # from a snapshot
    for _ in range(3):
        for _ in range(15):
            apply(random_op(rng), rng, library, tmp_path)
        scan(db, library)
        assert run_it() == feed_paths(db)  # from its cursor
    for suffix in ("", "-wal", "-shm"):  # a rebuilt database: the consumer starts over
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{db}{suffix}")
    scan(db, library)
    assert run_it() == feed_paths(db)


# --- save patterns: what the person did -----------------------------------------------------------

# The smallest JPEG exiftool writes tags into (1x1, JFIF, 134 bytes).
JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////////////////////"
    "////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQABPxA="
)


@pytest.fixture
def watched(tmp_path: Path, library: Path, db: Path) -> Iterator[Daemon]:
    for i in range(3):
        (library / f"IMG_{i}.jpg").write_bytes(JPEG)
    (library / "notes.txt").write_text("first\n")
    settle(library)
    d = Daemon(write_config(tmp_path / "c.toml", db, [library]), db, [library], tmp_path / "d.log").start()
    d.wait_converged()
    yield d
    assert d.stop() == 0, d.log()[-2000:]


def _ops_since(db: Path, seq: int, root: Path) -> list[tuple[str, str, str | None]]:
    top = len(str(root)) + 1
    rows = [json.loads(x) for x in changes(db, "--since", str(seq), "--json").stdout.splitlines()]
    return [(r["op"], r["path"][top:], r["old_path"][top:] if r["old_path"] else None) for r in rows]


def _ids(db: Path) -> dict[str, int]:
    return {r["path"]: r["id"] for r in ls_json(db)}


@pytest.mark.skipif(not os.path.exists("/usr/bin/exiftool"), reason="needs exiftool (Debian libimage-exiftool-perl)")
def test_exiftool_edit_says_modified_and_keeps_the_photo(watched: Daemon, library: Path, db: Path) -> None:
    before, seq = _ids(db), status(db)["feed"]["seq"]
    photos = sorted(map(str, library.glob("IMG_*.jpg")))
    subprocess.run(["exiftool", "-q", "-Artist=Jane", "-Keywords=holiday", *photos], check=True)
    watched.wait_converged()
    ops = _ops_since(db, seq, library)
    for i in range(3):
        assert ("modified", f"IMG_{i}.jpg", None) in ops, ops
        assert ("added", f"IMG_{i}.jpg_original", None) in ops, ops
        assert _ids(db)[str(library / f"IMG_{i}.jpg")] == before[str(library / f"IMG_{i}.jpg")]
    assert not [op for op in ops if op[0] in ("renamed", "deleted")], ops


@pytest.mark.skipif(not os.path.exists("/usr/bin/exiftool"), reason="needs exiftool (Debian libimage-exiftool-perl)")
def test_exiftool_overwrite_original_says_modified(watched: Daemon, library: Path, db: Path) -> None:
    before, seq = _ids(db), status(db)["feed"]["seq"]
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-Artist=Jane", str(library / "IMG_0.jpg")], check=True)
    watched.wait_converged()
    assert _ops_since(db, seq, library) == [("modified", "IMG_0.jpg", None)]
    assert _ids(db)[str(library / "IMG_0.jpg")] == before[str(library / "IMG_0.jpg")]


def test_editor_backup_says_modified_and_the_backup_added(watched: Daemon, library: Path, db: Path) -> None:
    before, seq = _ids(db), status(db)["feed"]["seq"]
    notes = library / "notes.txt"
    os.rename(notes, library / "notes.txt~")  # what emacs (and vim with `backup`) do before saving
    notes.write_text("first\nsecond\n")
    watched.wait_converged()
    assert sorted(_ops_since(db, seq, library)) == [("added", "notes.txt~", None), ("modified", "notes.txt", None)]
    assert _ids(db)[str(notes)] == before[str(notes)]


def test_write_temp_then_rename_over_says_modified(watched: Daemon, library: Path, db: Path) -> None:
    before, seq = _ids(db), status(db)["feed"]["seq"]
    tmp = library / ".notes.txt.tmp-1234"
    tmp.write_text("rewritten\n")
    os.rename(tmp, library / "notes.txt")  # LibreOffice, rsync, most editors
    watched.wait_converged()
    assert _ops_since(db, seq, library) == [("modified", "notes.txt", None)]
    assert _ids(db)[str(library / "notes.txt")] == before[str(library / "notes.txt")]


def test_in_place_rewrite_says_modified(watched: Daemon, library: Path, db: Path) -> None:
    seq = status(db)["feed"]["seq"]
    with open(library / "notes.txt", "r+") as f:
        f.write("FIRST\n")
    watched.wait_converged()
    assert _ops_since(db, seq, library) == [("modified", "notes.txt", None)]
