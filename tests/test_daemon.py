"""The running daemon, end to end: real inotify, real files, real programs as event sources.

Every test ends with the index equal to an independent walk of the disk, reached through
watch events (periodic full syncs are off), and checks the feed for what users rely on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, write_config
from tests.engine import HASH_WORKER, many_small_files, processes
from tests.oracle import diff, expected, indexed


@pytest.fixture
def daemon(tmp_path: Path, library: Path) -> Iterator[Daemon]:
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "config.toml", db, [library])
    d = Daemon(config, db, [library], tmp_path / "daemon.log").start()
    try:
        d.wait_converged()
        yield d
    finally:
        code = d.stop()
        assert code == 0, d.log()[-3000:]


def changes(d: Daemon, since: int = 0) -> list[dict[str, object]]:
    out = d.cli("changes", "--since", str(since), "--json").stdout
    return [json.loads(line) for line in out.splitlines()]


def scans(d: Daemon) -> dict[str, int]:
    s = d.status()
    assert s is not None
    return dict(s["counters"]["scans"])


def test_file_and_folder_operations_converge_through_events(daemon: Daemon, library: Path) -> None:
    full_before = scans(daemon)["full"]
    (library / "a").mkdir()
    (library / "a" / "one.jpg").write_bytes(b"1" * 1000)
    (library / "two.jpg").write_bytes(b"2" * 2000)
    daemon.wait_converged()
    (library / "two.jpg").write_bytes(b"22" * 2000)  # modified
    (library / "a" / "one.jpg").rename(library / "a" / "uno.jpg")  # renamed
    (library / "a" / "sub").mkdir()
    (library / "a" / "sub" / "deep.bin").write_bytes(os.urandom(50_000))
    daemon.wait_converged()
    shutil.rmtree(library / "a" / "sub")  # deleted folder
    os.chmod(library / "two.jpg", 0o600)  # metadata only
    daemon.wait_converged()
    after = scans(daemon)
    assert after["full"] == full_before, "the watcher, not a full sync, must have found these"
    assert after["file"] + after["folder"] + after["subtree"] > 0
    feed = changes(daemon)
    renamed = [c for c in feed if c["op"] == "renamed"]
    assert any(str(c["path"]).endswith("a/uno.jpg") and str(c["old_path"]).endswith("a/one.jpg") for c in renamed)
    assert any(c["op"] == "metadata" and str(c["path"]).endswith("two.jpg") for c in feed)


def test_folder_moved_keeps_identity_of_everything_below(daemon: Daemon, library: Path) -> None:
    tree = library / "2024" / "trip"
    tree.mkdir(parents=True)
    for i in range(30):
        (tree / f"IMG_{i}.jpg").write_bytes(os.urandom(2000))
    daemon.wait_converged()
    before = {r["path"]: r["id"] for r in map(json.loads, daemon.cli("ls", "--json").stdout.splitlines())}
    (library / "2024" / "trip").rename(library / "2024" / "holiday")
    daemon.wait_converged()
    after = {r["path"]: r["id"] for r in map(json.loads, daemon.cli("ls", "--json").stdout.splitlines())}
    for i in range(30):
        old = str(tree / f"IMG_{i}.jpg")
        new = str(library / "2024" / "holiday" / f"IMG_{i}.jpg")
        assert after[new] == before[old]


def test_moves_in_and_out_of_the_root(daemon: Daemon, library: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "incoming").mkdir()
    (outside / "incoming" / "x.jpg").write_bytes(b"x" * 100)
    (library / "leaving.jpg").write_bytes(b"bye")
    daemon.wait_converged()
    (outside / "incoming").rename(library / "incoming")  # moved in: an add
    (library / "leaving.jpg").rename(outside / "leaving.jpg")  # moved out: a delete
    daemon.wait_converged()
    ops = {(c["op"], Path(str(c["path"])).name) for c in changes(daemon)}
    assert ("added", "x.jpg") in ops
    assert ("deleted", "leaving.jpg") in ops


def test_an_excluded_folder_moved_into_another_folder_refreshes_the_folder_it_left(
    daemon: Daemon, library: Path
) -> None:
    # lost+found is excluded by default; moving it out of a volume's top changes that folder's
    # mtime, which only the move's excluded source names (torture seed 7072).
    def converged() -> bool:
        want = expected(library, exclude_names=(b"lost+found",))
        return daemon.quiet() and diff(want, indexed(daemon.db, library)) == [] and daemon.quiet()

    (library / "vol" / "lost+found").mkdir(parents=True)
    (library / "vol" / "a" / "b").mkdir(parents=True)
    daemon.wait(converged, 60, "the tree indexed")
    (library / "vol" / "lost+found").rename(library / "vol" / "a" / "b" / "c")
    daemon.wait(converged, 60, "vol's own row refreshed")
    (library / "vol" / "a" / "b" / "c").rename(library / "vol" / "lost+found")  # back: to an excluded name
    daemon.wait(converged, 60, "b's own row refreshed")


def test_rsync_into_the_root_records_temp_file_renames(daemon: Daemon, library: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "album").mkdir(parents=True)
    for i in range(50):
        (source / "album" / f"p{i}.jpg").write_bytes(os.urandom(3000))
    subprocess.run(["rsync", "-a", f"{source}/", f"{library}/"], check=True)
    daemon.wait_converged()
    (source / "album" / "p1.jpg").write_bytes(os.urandom(3000))
    subprocess.run(["rsync", "-a", f"{source}/", f"{library}/"], check=True)
    daemon.wait_converged()


def test_tar_extract_of_thousands_of_files(daemon: Daemon, library: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    for d in range(20):
        folder = source / f"d{d:02d}"
        folder.mkdir(parents=True)
        for f in range(150):
            (folder / f"f{f:03d}.dat").write_bytes(f"{d}-{f}".encode() * 10)
    archive = tmp_path / "a.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(source), "."], check=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(library)], check=True)
    daemon.wait_converged(timeout=120)


def test_git_clone_and_checkout(daemon: Daemon, library: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e"}  # fmt: skip
    git = ["git", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True, env=env)
    for i in range(40):
        (repo / f"file{i}.txt").write_text(f"v1 {i}\n")
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True, env=env)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "one"], check=True, env=env)
    for i in range(0, 40, 2):
        (repo / f"file{i}.txt").write_text(f"v2 {i}\n")
    (repo / "file1.txt").unlink()
    (repo / "new").mkdir()
    (repo / "new" / "added.txt").write_text("new\n")
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True, env=env)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "two"], check=True, env=env)
    clone = library / "clone"
    subprocess.run([*git, "clone", "-q", str(repo), str(clone)], check=True, env=env)
    daemon.wait_converged(timeout=90)
    subprocess.run([*git, "-C", str(clone), "checkout", "-q", "HEAD~1"], check=True, env=env)
    daemon.wait_converged(timeout=90)


def test_editor_safe_save_is_recorded_as_a_rename(daemon: Daemon, library: Path) -> None:
    doc = library / "notes.txt"
    doc.write_text("draft 1\n")
    daemon.wait_converged()
    seq = daemon.status()["seq"]  # type: ignore[index]
    tmp = library / ".notes.txt.swp-new"
    with tmp.open("w") as f:
        f.write("draft 2, longer\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(doc)
    daemon.wait_converged()
    feed = changes(daemon, seq)
    assert feed, "the save must reach the feed"
    assert all(not str(c["path"]).endswith(".swp-new") or c["op"] in ("added", "renamed", "deleted") for c in feed)
    content = [c for c in feed if str(c["path"]) == str(doc)]
    assert content and content[-1]["op"] in ("renamed", "modified")


def test_daemon_rebuilds_an_older_scheme_and_writes_metrics(tmp_path: Path, library: Path) -> None:
    import sqlite3

    from prometheus_client.parser import text_string_to_metric_families

    for i in range(20):
        (library / f"f{i}.bin").write_bytes(os.urandom(4096))
    db = tmp_path / "index.db"
    textfile = tmp_path / "metrics" / "treewatch.prom"
    textfile.parent.mkdir()
    config = write_config(
        tmp_path / "c.toml", db, [library], extra=f'[metrics]\ntextfile = "{textfile}"\ninterval_s = 0.2\n'
    )
    first = Daemon(config, db, [library], tmp_path / "d1.log").start()
    first.wait_converged()
    assert first.stop() == 0
    # What an upgrade to a new hash scheme looks like to the index: rows derived by the old one.
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE entries SET scheme = 0 WHERE kind = 'file' AND rowid % 2 = 0")
        bumped = conn.execute("SELECT count(*) FROM entries WHERE scheme = 0").fetchone()[0]
    assert bumped > 0
    before = dict(first.status()["counters"])  # type: ignore[index]
    seq_before = first.status()["seq"]  # type: ignore[index]
    second = Daemon(config, db, [library], tmp_path / "d2.log").start()
    try:
        target = before["files_hashed"] + bumped

        def rebuilt() -> bool:
            s = second.status()
            return s is not None and s["rebuild"] is None and s["counters"]["files_hashed"] >= target

        second.wait(rebuilt, 60, "the rebuild")
        second.wait_converged()
        status = second.status()
        assert status is not None
        assert status["counters"]["files_hashed"] == before["files_hashed"] + bumped  # exactly those
        assert status["seq"] == seq_before  # unchanged content: the feed is untouched
        assert "older hash scheme" in second.log()
        second.wait(textfile.exists, 10, "the metrics textfile")
        families = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
        assert "treewatch_files_hashed" in families or "treewatch_files_hashed_total" in families
        assert oct(textfile.stat().st_mode & 0o777) == "0o644"
    finally:
        assert second.stop() == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="worker processes leave one core to the scan")
def test_sigterm_during_a_first_index_in_worker_processes_drains_and_resumes(tmp_path: Path, library: Path) -> None:
    # Enough files that step 2 lasts ~1 s here (~40 µs a file), so SIGTERM lands in it.
    files = 20_000
    total = many_small_files(library, files)
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "c.toml", db, [library], sync={"startup": True, "batch_size": 200})
    first = Daemon(config, db, [library], tmp_path / "d1.log").start()
    assert first.proc is not None
    daemon_pid = first.proc.pid
    first.wait(lambda: processes(HASH_WORKER, daemon_pid), 60, "a hash worker process")
    assert first.stop() == 0, first.log()[-3000:]
    log = first.log()
    assert "Traceback" not in log, log[-3000:]
    assert "scan interrupted; the next one resumes it" in log, log[-3000:]
    assert processes(HASH_WORKER, None) == []  # none left behind, not even re-parented

    second = Daemon(config, db, [library], tmp_path / "d2.log").start()
    try:
        second.wait_converged()
        counters = second.status()["counters"]  # type: ignore[index]
        assert counters["files_hashed"] == files
        assert counters["bytes_hashed"] == total  # what the first daemon committed was not hashed again
    finally:
        assert second.stop() == 0
