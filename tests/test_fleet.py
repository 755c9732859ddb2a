"""The fleet (docs/fleet.md): boxes replicated into a real PostgreSQL catalogue — a private cluster
the tests start themselves — and asked together. After every fault the catalogue must equal the
union of the boxes' own `ls --json`.

Moments inside a transaction (mid-COPY, mid-stream) are reached without guessing at timing: the
test holds an uncommitted row with a key the replicator is about to write, so the replicator
waits on that row's lock exactly there; the test sees it waiting (pg_stat_activity) and strikes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import xattr

from daemon import catalogue
from daemon.catalogue import CatalogueError, redact
from daemon.replicator import Replicator
from tests import pg_cluster
from tests.conftest import wait_for
from tests.pg_cluster import Cluster

needs_pg = pytest.mark.skipif(pg_cluster.available() is not None, reason=str(pg_cluster.available()))


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    if (why := pg_cluster.available()) is not None:
        pytest.skip(why)
    cluster = Cluster()
    yield cluster
    cluster.close()


@pytest.fixture
def url(pg: Cluster) -> str:
    if not pg.running():  # a test that stopped it and failed before starting it again
        pg.start()
    return pg.new_database()


def tw(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    return result


@dataclass
class Box:
    name: str
    root: Path
    db: Path

    def scan(self) -> None:
        ok(tw("--db", str(self.db), "scan", "--root", str(self.root)))

    def replicate(self, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return tw("--db", str(self.db), "replicate", "--to", url, "--box", self.name, *extra)

    def ls(self) -> list[dict[str, Any]]:
        out = ok(tw("--db", str(self.db), "ls", "--json")).stdout
        return [{"box": self.name, **json.loads(line)} for line in out.splitlines()]

    def feed(self) -> dict[str, Any]:
        return dict(json.loads(ok(tw("--db", str(self.db), "status", "--json")).stdout)["feed"])


def make_box(tmp_path: Path, name: str, files: dict[str, bytes]) -> Box:
    root = tmp_path / name / "library"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    box = Box(name, root, tmp_path / name / "index.db")
    box.scan()
    return box


def fleet(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return tw("fleet", "--pg", url, *args)


def fleet_ls(url: str, *args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(fleet(url, "ls", "--json", *args)).stdout.splitlines()]


def key(row: dict[str, Any]) -> tuple[str, str]:
    return row["box"], row["path"]


def assert_union(url: str, boxes: list[Box]) -> None:
    """The catalogue holds exactly what each box's `ls --json` shows, and each box's position."""
    want = sorted((row for b in boxes for row in b.ls()), key=key)
    got = sorted(fleet_ls(url), key=key)
    assert [key(r) for r in got] == [key(r) for r in want]
    assert got == want
    status = json.loads(ok(fleet(url, "status", "--json")).stdout)["boxes"]
    positions = {s["box"]: (s["epoch"], s["seq"], s["entries"]) for s in status}
    for b in boxes:
        f = b.feed()
        assert positions[b.name] == (f["epoch"], f["seq"], len(b.ls())), b.name


def position(url: str, box: str) -> tuple[str, int] | None:
    with psycopg.connect(url) as conn:
        if conn.execute("SELECT to_regclass('treewatch.boxes')").fetchone() == (None,):
            return None  # no replicator has created the catalogue yet
        row = conn.execute("SELECT epoch, seq FROM treewatch.boxes WHERE box = %s", (box,)).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def count(url: str, box: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM treewatch.entries WHERE box = %s", (box,)).fetchone()
    assert row is not None
    return int(row[0])


# --- several boxes ---------------------------------------------------------------------------------

PHOTO = b"\xff\xd8 a photo" * 100
RAW = b"raw sensor data" * 300


def test_two_boxes_list_as_their_union_and_dupes_span_them(tmp_path: Path, url: str) -> None:
    photos = make_box(tmp_path, "photos", {"2024/IMG_1.jpg": PHOTO, "2024/IMG_2.raw": RAW, "notes.txt": b"only here"})
    backup = make_box(tmp_path, "backup", {"mirror/IMG_1.jpg": PHOTO, "mirror/IMG_2.raw": RAW, "other": b"x"})
    weird = photos.root / os.fsdecode(b"caf\xe9 \xff.jpg")
    weird.write_bytes(PHOTO)  # a name that is not UTF-8, and a copy of the photo on the same box
    os.symlink("2024/IMG_1.jpg", photos.root / "latest")
    xattr.set(os.fsencode(photos.root / "notes.txt"), "user.tag", b"keep")
    os.link(photos.root / "2024" / "IMG_2.raw", photos.root / "raw-link")
    photos.scan()
    for b in (photos, backup):
        ok(b.replicate(url))
    assert_union(url, [photos, backup])

    groups = json.loads(ok(fleet(url, "dupes", "--json")).stdout)["groups"]
    by_size = {g["size"]: g for g in groups}
    assert set(by_size) == {len(PHOTO), len(RAW)}
    photo = by_size[len(PHOTO)]
    assert photo["boxes"] == ["backup", "photos"] and len(photo["copies"]) == 3
    assert photo["wasted_bytes"] == len(PHOTO)  # two copies on photos, one of them is spare
    raw = by_size[len(RAW)]
    # Hard links on one box are one copy: the raw file has one copy per box, nothing to reclaim.
    assert len(raw["copies"]) == 2 and raw["wasted_bytes"] == 0
    linked = next(c for c in raw["copies"] if c["box"] == "photos")
    assert sorted(linked["paths"]) == sorted([str(photos.root / "2024" / "IMG_2.raw"), str(photos.root / "raw-link")])


def test_three_boxes_dupes_and_what_exists_on_one_box_only(tmp_path: Path, url: str) -> None:
    everywhere, two, alone = b"on every box" * 50, b"on two boxes" * 40, b"nowhere else" * 30
    a = make_box(tmp_path, "a", {"x/all.bin": everywhere, "x/two.bin": two, "x/alone.bin": alone, "x/again.bin": alone})
    b = make_box(tmp_path, "b", {"y/all.bin": everywhere, "y/two.bin": two, "y/mine.bin": b"b's own"})
    c = make_box(tmp_path, "c", {"z/all.bin": everywhere})
    for box in (a, b, c):
        ok(box.replicate(url))
    assert_union(url, [a, b, c])
    # A path below one box's root lists that box's part of it only; the boxes' roots differ.
    below = {os.path.relpath(r["path"], a.root) for r in fleet_ls(url, str(a.root / "x"))}
    assert below == {"x", "x/all.bin", "x/two.bin", "x/alone.bin", "x/again.bin"}
    assert [r["box"] for r in fleet_ls(url, "--box", "c")] == ["c", "c"]

    groups = json.loads(ok(fleet(url, "dupes", "--json")).stdout)["groups"]
    spans = {g["size"]: g["boxes"] for g in groups}
    assert spans == {len(everywhere): ["a", "b", "c"], len(two): ["a", "b"], len(alone): ["a"]}

    lonely = json.loads(ok(fleet(url, "dupes", "--only-on-one-box", "--json")).stdout)["groups"]
    assert {(g["boxes"][0], len(g["copies"])) for g in lonely} == {("a", 2), ("b", 1)}
    only_b = json.loads(ok(fleet(url, "dupes", "--only-on-one-box", "--box", "b", "--json")).stdout)["groups"]
    assert [g["copies"][0]["paths"] for g in only_b] == [[str(b.root / "y" / "mine.bin")]]
    text = ok(fleet(url, "dupes", "--only-on-one-box")).stdout
    assert "2 contents on one box only" in text

    status = json.loads(ok(fleet(url, "status", "--json")).stdout)
    assert [s["box"] for s in status["boxes"]] == ["a", "b", "c"]
    assert set(status["boxes"][0]) == {"box", "epoch", "seq", "applied_at", "entries", "bytes"}
    assert status["boxes"][2]["bytes"] == len(everywhere)


def test_the_stream_applies_every_kind_of_change_and_fleet_changes_lists_them(tmp_path: Path, url: str) -> None:
    box = make_box(
        tmp_path, "box", {f"album/{i}.jpg": bytes([i]) * 500 for i in range(20)} | {"keep": b"k", "m.txt": b"m"}
    )
    ok(box.replicate(url))
    before = time.time()
    root = box.root
    os.rename(root / "album", root / "album 2024")  # a folder and everything below it
    (root / "m.txt").write_bytes(b"edited")  # modified
    os.unlink(root / "album 2024" / "4.jpg")
    os.chmod(root / "keep", 0o600)  # metadata
    (root / "new").mkdir()
    (root / "new" / "a.txt").write_bytes(b"added")
    os.rename(root / "album 2024" / "5.jpg", root / "new" / "5.jpg")
    box.scan()
    result = ok(box.replicate(url))
    assert "applied" in result.stdout and "snapshot" not in result.stdout
    assert_union(url, [box])

    rows = [json.loads(line) for line in ok(fleet(url, "changes", "--since", "10m", "--json")).stdout.splitlines()]
    ops = {(r["op"], os.path.basename(r["path"])) for r in rows}
    assert {("renamed", "album 2024"), ("modified", "m.txt"), ("deleted", "4.jpg"), ("metadata", "keep"),
            ("added", "a.txt"), ("renamed", "5.jpg")} <= ops  # fmt: skip
    assert all(r["box"] == "box" and r["epoch"] == box.feed()["epoch"] for r in rows)
    since_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(before - 1))
    assert len(ok(fleet(url, "changes", "--since", since_iso, "--json")).stdout.splitlines()) == len(rows)
    assert ok(fleet(url, "changes", "--since", "2999-01-01", "--json")).stdout == ""


def test_a_batch_delivered_twice_is_applied_once(tmp_path: Path, url: str) -> None:
    """Two replicators of one box, racing: each batch goes in once, whoever sends it."""
    box = make_box(tmp_path, "box", {f"f{i}": b"x" * i for i in range(30)})
    conns = [catalogue.connect(url, application="test") for _ in range(2)]
    catalogue.migrate(conns[0], url)
    replicators = [Replicator(conn, url, "box", box.db) for conn in conns]
    try:
        snapshot_seq = 0
        for round_ in range(6):
            for i in range(5):
                (box.root / f"r{round_}-{i}").write_bytes(bytes([round_, i]))
            os.unlink(box.root / f"f{round_}")
            box.scan()
            results = []
            threads = [threading.Thread(target=lambda r=r: results.append(r.catch_up())) for r in replicators]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            # One of them applied the batch (or loaded the first snapshot); the other found it done.
            assert sorted(a.action for a in results) == ["none", "snapshot" if round_ == 0 else "stream"]
            with conns[0].cursor() as cur:
                cur.execute("SELECT count(*) FROM treewatch.changes WHERE box = 'box'")
                history = cur.fetchone()
            conns[0].rollback()
            assert history is not None
            feed = box.feed()
            snapshot_seq = snapshot_seq or feed["seq"]
            assert history[0] == feed["seq"] - snapshot_seq  # each feed row after the snapshot, once
    finally:
        for r in replicators:
            r.close()
        for conn in conns:
            conn.close()
    assert_union(url, [box])


def test_a_path_emptied_by_a_parked_row_is_rewritten_all_the_same(tmp_path: Path, url: str) -> None:
    """Between two batches of a scan, a row can wait under a parked name (journal.py: `mv b c;
    mv a b` in one round) with no feed row for its old path, while a new entry is `added` there.
    The stream skips deleting keys whose first mention is an arrival; here that meets the
    catalogue's row, and the batch is done again deleting every key."""
    box = make_box(tmp_path, "box", {"a.jpg": b"first", "b.jpg": b"second"})
    ok(box.replicate(url))
    con = sqlite3.connect(box.db, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        (entry_id, root_id) = con.execute("SELECT id, root_id FROM entries WHERE path = ?", (b"a.jpg",)).fetchone()
        con.execute("UPDATE entries SET path = ? WHERE id = ?", (b"\x00a.jpg", entry_id))
        columns = [r[1] for r in con.execute("PRAGMA table_info(entries)") if r[1] not in ("id", "path")]
        con.execute(
            f"INSERT INTO entries (path, {', '.join(columns)}) SELECT ?, {', '.join(columns)} FROM entries"
            " WHERE path = ?",
            (b"a.jpg", b"b.jpg"),
        )
        new_id = con.execute("SELECT id FROM entries WHERE path = ?", (b"a.jpg",)).fetchone()[0]
        con.execute(
            "INSERT INTO changes (entry_id, root_id, op, kind, path, old_path, at) VALUES (?, ?, 'added', 'file', ?,"
            " NULL, ?)",
            (new_id, root_id, b"a.jpg", time.time()),
        )
        con.execute("COMMIT")
    finally:
        con.close()
    result = ok(box.replicate(url))
    assert "applied 1 changes" in result.stdout, result.stdout
    visible = [row for row in box.ls() if "\x00" not in row["path"]]  # the parked row is no entry on disk
    assert sorted(fleet_ls(url), key=key) == sorted(visible, key=key)


# --- faults ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def blocking_row(url: str, box: str, load_id: int, root: Path, path: bytes) -> Iterator[psycopg.Connection[Any]]:
    """Hold, uncommitted, a row with the key the replicator will write for ``path``: it waits on it."""
    conn = psycopg.connect(url)
    try:
        conn.execute(
            "INSERT INTO treewatch.entries VALUES (%s, %s, %s, %s, 'file', 0, 0, 0, 0, 0, 0, 0, 0, 1, NULL, NULL,"
            " NULL, false, 0, 0)",
            (box, load_id, os.fsencode(root), path),
        )
        yield conn
    finally:
        with contextlib.suppress(psycopg.Error):  # a server stopped meanwhile has rolled it back itself
            conn.rollback()
        conn.close()


def waiting_replicator(url: str, box: str) -> dict[str, Any] | None:
    """The replicator of ``box`` while it waits on a row lock inside its transaction."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT pid, query FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (f"treewatch replicate {box}",),
        ).fetchone()
    return None if row is None else {"pid": row[0], "query": row[1]}


def next_load(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM treewatch.loads")
        value = row.fetchone()
    assert value is not None
    return int(value[0])


def start_replicate(box: Box, url: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon", "--db", str(box.db), "replicate", "--to", url, "--box", box.name, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def last_entry_path(box: Box) -> bytes:
    con = sqlite3.connect(box.db)
    try:
        return bytes(con.execute("SELECT path FROM entries ORDER BY id DESC LIMIT 1").fetchone()[0])
    finally:
        con.close()


def test_replicator_sigkilled_during_a_snapshot_load_and_during_the_stream(tmp_path: Path, url: str) -> None:
    files = {f"d{d}/f{i:04d}": b"%d" % i for d in range(3) for i in range(2500)}
    box = make_box(tmp_path, "box", files)
    other = make_box(tmp_path, "other", {"o": b"another box, replicated meanwhile"})
    conn = catalogue.connect(url, application="test")
    catalogue.migrate(conn, url)
    conn.close()

    # 1. Mid-COPY: the snapshot waits on the last row it writes; SIGKILL it there.
    with blocking_row(url, "box", next_load(url), box.root, last_entry_path(box)):
        proc = start_replicate(box, url)
        waiting = wait_for(lambda: waiting_replicator(url, "box"), what="the snapshot to reach the held row")
        assert isinstance(waiting, dict) and waiting["query"].startswith("COPY")
        ok(other.replicate(url))  # another box is not held up by this one's load
        proc.kill()
        proc.wait()
        assert position(url, "box") is None and count(url, "box") == 0  # nothing of the load is visible
    ok(box.replicate(url))
    assert_union(url, [box, other])

    # 2. Mid-stream: two folders of 2500 renamed (more than one chunk); wait on a row of the last chunk.
    os.rename(box.root / "d1", box.root / "moved")
    os.rename(box.root / "d2", box.root / "moved2")
    (box.root / "d0" / "f0000").unlink()
    box.scan()
    con = sqlite3.connect(box.db)
    last_renamed = bytes(con.execute("SELECT path FROM changes WHERE op = 'renamed' ORDER BY seq DESC").fetchone()[0])
    con.close()
    before = position(url, "box")
    with psycopg.connect(url) as c:
        load_id = c.execute("SELECT load_id FROM treewatch.boxes WHERE box = 'box'").fetchone()
    assert load_id is not None
    with blocking_row(url, "box", load_id[0], box.root, last_renamed):
        proc = start_replicate(box, url)
        waiting = wait_for(lambda: waiting_replicator(url, "box"), what="the stream to reach the held row")
        assert isinstance(waiting, dict) and waiting["query"].startswith("COPY treewatch.entries")
        proc.kill()
        proc.wait()
    assert position(url, "box") == before  # the stream's transaction rolled back whole
    result = ok(box.replicate(url))
    assert before is not None and box.feed()["seq"] - before[1] > 5000  # more than one chunk
    assert f"applied {box.feed()['seq'] - before[1]} changes" in result.stdout, result.stdout
    assert_union(url, [box, other])


def test_postgres_stopped_mid_stream_is_one_line_and_exit_1(tmp_path: Path, pg: Cluster, url: str) -> None:
    box = make_box(tmp_path, "box", {f"a/{i}": b"%d" % i for i in range(50)})
    ok(box.replicate(url))
    os.rename(box.root / "a", box.root / "b")
    box.scan()
    with psycopg.connect(url) as c:
        load_id = c.execute("SELECT load_id FROM treewatch.boxes WHERE box = 'box'").fetchone()
    assert load_id is not None
    try:
        with contextlib.suppress(psycopg.OperationalError), blocking_row(url, "box", load_id[0], box.root, b"b/7"):
            proc = start_replicate(box, url, "--follow")
            wait_for(lambda: waiting_replicator(url, "box"), what="the stream to reach the held row")
            pg.stop("immediate")
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1, stderr
        assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
        assert stderr.startswith("treewatch: catalogue postgresql://postgres@/"), stderr
        refused = box.replicate(url)  # while it is down: one line, exit 1
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "cannot connect" in refused.stderr
    finally:
        pg.start()
    ok(box.replicate(url))
    assert_union(url, [box])


def test_a_rebuilt_database_is_reloaded_under_its_new_epoch_and_never_looks_empty(tmp_path: Path, url: str) -> None:
    files = {f"p/{i:04d}.jpg": b"%d" % i for i in range(3000)}
    box = make_box(tmp_path, "box", files)
    ok(box.replicate(url))
    old_epoch = box.feed()["epoch"]
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{box.db}{suffix}")
    (box.root / "p" / "new.jpg").write_bytes(b"new")
    box.scan()
    assert box.feed()["epoch"] != old_epoch
    seen: set[int] = set()
    done = threading.Event()

    def reader() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not done.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM treewatch.entries e JOIN treewatch.boxes b"
                    " ON b.box = e.box AND b.load_id = e.load_id WHERE e.box = 'box'"
                ).fetchone()
                assert row is not None
                seen.add(int(row[0]))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = ok(box.replicate(url))
    finally:
        done.set()
        thread.join()
    assert "a new epoch" in result.stdout, result.stdout
    assert seen <= {3001, 3002}, seen  # the old load or the new one: never none, never both
    assert_union(url, [box])
    with psycopg.connect(url) as conn:
        loads = conn.execute("SELECT count(DISTINCT load_id) FROM treewatch.entries").fetchone()
    assert loads == (1,)  # the old epoch's rows are gone


def test_a_box_offline_past_its_retention_loads_a_snapshot(tmp_path: Path, url: str) -> None:
    box = make_box(tmp_path, "box", {f"f{i}": b"%d" % i for i in range(10)})
    ok(box.replicate(url))
    config = tmp_path / "c.toml"
    config.write_text(f'database = "{box.db}"\n[[roots]]\npath = "{box.root}"\n[feed]\nmax_rows = 3\n')
    for i in range(10):
        (box.root / f"f{i}").write_bytes(b"changed %d" % i)
    (box.root / "f0").unlink()
    ok(tw("--config", str(config), "scan"))  # prunes to 3 rows: the catalogue's cursor is gone
    assert box.feed()["oldest_seq"] > position(url, "box")[1] + 1  # type: ignore[index]
    result = ok(box.replicate(url))
    assert "no longer holds" in result.stdout, result.stdout
    assert_union(url, [box])


def test_follow_sends_a_change_as_it_is_committed(tmp_path: Path, url: str) -> None:
    box = make_box(tmp_path, "box", {"a": b"a"})
    proc = start_replicate(box, url, "--follow")
    try:
        wait_for(lambda: position(url, "box") is not None, what="the first snapshot")
        (box.root / "b").write_bytes(b"b")
        box.scan()
        committed = time.monotonic()
        wait_for(lambda: count(url, "box") == 2, timeout=10, interval=0.02, what="the change in the catalogue")
        assert time.monotonic() - committed < 5  # the target is 2 s (make bench measures it); slack for a busy machine
        assert_union(url, [box])
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr


# --- bad input -------------------------------------------------------------------------------------


def test_bad_catalogues_are_one_line_exit_1_without_the_password(tmp_path: Path, pg: Cluster, url: str) -> None:
    box = make_box(tmp_path, "box", {"a": b"a"})
    database = url.split("@/", 1)[1].partition("?")[0]
    wrong = pg.url(database, pg_cluster.PASSWORD_ROLE, "not-the-password")
    cases = {
        "cannot connect": f"postgresql://postgres@/x?host={tmp_path}/no-such-socket-dir",
        "password authentication failed": wrong,
        "not a PostgreSQL URL": "host=/tmp dbname=x garbage",
    }
    for expected, bad in cases.items():
        for result in (box.replicate(bad), fleet(bad, "status")):
            assert result.returncode == 1, (bad, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and expected in result.stderr, result.stderr
            assert "not-the-password" not in result.stderr and "Traceback" not in result.stderr
    assert "postgresql://tw_password@/" in box.replicate(wrong).stderr  # named, without its password
    right = pg.url(database, pg_cluster.PASSWORD_ROLE, pg_cluster.PASSWORD)
    assert pg_cluster.PASSWORD not in ok(box.replicate(right)).stdout

    nothing = fleet(pg.new_database(), "ls")
    assert nothing.returncode == 1 and "no treewatch catalogue" in nothing.stderr
    pg.psql("UPDATE treewatch.meta SET version = 99", database)
    for result in (box.replicate(url), fleet(url, "ls")):
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "newer treewatch (catalogue schema 99 > 1)" in result.stderr
    usage = box.replicate(url, "--box", "no spaces")
    assert usage.returncode == 2
    missing = tw("--db", str(tmp_path / "none.db"), "replicate", "--to", url, "--box", "b")
    assert missing.returncode == 1 and "no such database" in missing.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://tw:secret@nas.local:5432/fleet", "postgresql://tw@nas.local:5432/fleet"),
        ("postgres://tw:s%40c@h1,h2/fleet?sslmode=require&password=x", "postgres://tw@h1,h2/fleet?sslmode=require"),
        ("postgresql://tw@nas/fleet?password=x&sslmode=verify-full", "postgresql://tw@nas/fleet?sslmode=verify-full"),
        ("postgresql://nas", "postgresql://nas"),
        ("host=/run/postgresql dbname=fleet password='a b\\'c' user=tw", "host=/run/postgresql dbname=fleet user=tw"),
        ("host=nas password=secret", "host=nas"),
    ],
)
def test_a_catalogue_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_a_reason_never_carries_the_password() -> None:
    error = CatalogueError('FATAL:  password authentication failed for "secret"\n\tmore')
    assert catalogue.reason(error, "postgresql://tw:secret@nas/fleet") == (
        'FATAL: password authentication failed for "***"'
    )


# --- the daemon ------------------------------------------------------------------------------------


@needs_pg
def test_daemon_replicates_through_postgres_restarts_under_random_operations(
    tmp_path: Path, pg: Cluster, url: str
) -> None:
    import random

    from tests.daemon_harness import Daemon, write_config
    from tests.torture_ops import apply, new_burst, random_op, seed_tree

    root, outside, db = tmp_path / "library", tmp_path / "outside", tmp_path / "index.db"
    root.mkdir()
    outside.mkdir()
    rng = random.Random(20261206)
    seed_tree(rng, root)
    extra = f'[replicate]\nurl = "{url}"\nbox = "nas"\n[feed]\nretention_s = 1\n'
    d = Daemon(write_config(tmp_path / "c.toml", db, [root], extra=extra), db, [root], tmp_path / "d.log")
    box = Box("nas", root, db)

    def caught_up() -> bool:
        s = d.status()
        if s is None or s["replicate"] is None or s["replicate"]["lag"] or s["replicate"]["error"]:
            return False
        want = sorted(box.ls(), key=key)
        return want == sorted(fleet_ls(url), key=key)

    def down_shown() -> bool:
        # The replicator finds the catalogue gone at its next push, and `status` shows it from
        # the next publish on: after the index has converged, not necessarily as it does.
        s = d.status()
        return s is not None and bool(s["replicate"]["error"]) and s["replicate"]["lag"] > 0

    def burst(n: int) -> None:
        new_burst()
        for _ in range(n):
            apply(random_op(rng), rng, root, outside)

    d.start()
    try:
        d.wait_converged()
        d.wait(caught_up, 60, "the catalogue to catch up")
        for round_ in range(3):
            burst(30)
            if round_ == 1:
                pg.stop("immediate")
                burst(30)
                d.wait_converged()  # indexing goes on without the catalogue
                d.wait(down_shown, 30, "status to show the catalogue down and the lag")
                # Retention (1 s here, pruning every second) keeps what the catalogue has not taken:
                # let the rows age past it, then the catch-up below must be a stream, not a snapshot.
                aged = time.monotonic() + 3
                d.wait(lambda: time.monotonic() > aged, 10, "the feed's rows to age past retention")
                s = d.status()
                assert s is not None and s["feed"]["oldest_seq"] <= s["replicate"]["applied_seq"] + 1, s
                pg.start()
            d.wait_converged()
            d.wait(caught_up, 90, f"the catalogue to catch up after round {round_}")
        prometheus = d.cli("status", "--prometheus").stdout
        assert (
            'treewatch_replicate_lag{box="nas"} 0' in prometheus and 'treewatch_replicate_up{box="nas"} 1' in prometheus
        )
        assert "replicate: box nas to postgresql://postgres@/" in d.cli("status").stdout
        log = d.log()
        assert "reason='expired'" not in log
        d.wait(lambda: (s := d.status()) is not None and s["feed"]["oldest_seq"] > 1, 30, "retention to prune")
        assert log.count("5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b0f") == 1 and log.count("5b0e1b8c3f4a4e6b9a7d2c1e8f3a6b10") == 1
        assert "Traceback" not in log
        assert d.stop() == 0, d.log()[-3000:]
    finally:
        if not pg.running():
            pg.start()
        d.stop()
