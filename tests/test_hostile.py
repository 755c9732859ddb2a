"""Hostile entries: nothing blocks, nothing outside the root is read, every name round-trips,
and per-path errors are recorded, shown and cleared without losing anything else."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3

from tests.as_user import as_user, needs_other_user
from tests.oracle import cli, diff, expected, indexed, ls_json

REPO = Path(__file__).resolve().parent.parent
is_root = os.geteuid() == 0


def scan(
    db: Path, root: Path, *extra: str, timeout: float = 60, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "daemon", "--db", str(db), "scan", "--root", str(root), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd="/")


def by_path(db: Path) -> dict[bytes, dict[str, Any]]:
    return {os.fsencode(r["path"]): r for r in ls_json(db)}


def test_special_files_are_recorded_never_opened(library: Path, db: Path, tmp_path: Path) -> None:
    os.mkfifo(library / "fifo")  # open() on it would block until a writer came: the scan must not
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(library / "sock"))
    if is_root:
        os.mknod(library / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not indexed")
    (library / "loop").symlink_to("loop")
    (library / "ping").symlink_to("pong")
    (library / "pong").symlink_to("ping")
    (library / "out").symlink_to(outside)
    (library / "abs").symlink_to("/etc/passwd")
    try:
        result = scan(db, library, timeout=30)  # a blocked open would hit the timeout
    finally:
        sock.close()
    assert result.returncode == 0, result.stderr
    rows = by_path(db)
    for name in ("fifo", "sock") + (("null",) if is_root else ()):
        assert rows[os.fsencode(library / name)]["kind"] == "other"
        assert rows[os.fsencode(library / name)]["blake3"] is None
    assert rows[os.fsencode(library / "loop")]["target"] == "loop"
    assert rows[os.fsencode(library / "out")]["kind"] == "symlink"
    assert rows[os.fsencode(library / "out")]["target"] == str(outside)
    assert rows[os.fsencode(library / "abs")]["target"] == "/etc/passwd"
    assert not any(p.startswith(os.fsencode(outside)) for p in rows)
    assert diff(expected(library), indexed(db, library)) == []


def test_folder_swapped_for_symlink_out_of_root_is_not_followed(library: Path, db: Path, tmp_path: Path) -> None:
    (library / "d").mkdir()
    (library / "d" / "f").write_bytes(b"f")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    assert scan(db, library).returncode == 0
    shutil.rmtree(library / "d")
    (library / "d").symlink_to(outside)
    assert scan(db, library).returncode == 0
    rows = by_path(db)
    assert rows[os.fsencode(library / "d")]["kind"] == "symlink"
    assert os.fsencode(library / "d" / "secret") not in rows and os.fsencode(library / "d" / "f") not in rows
    # A scan of a path *through* the symlink is not a way out either.
    result = scan(db, library, str(library / "d" / "secret"))
    assert os.fsencode(library / "d" / "secret") not in by_path(db), result.stderr


def test_names_round_trip_exactly(library: Path, db: Path) -> None:
    top = os.fsencode(library)
    names = [
        b"bad\xff\xfename",
        b"new\nline",
        b"tab\tand space ",
        b"\xe9t\xe9 latin-1",
        "日本語.jpg".encode(),
        b"-dash",
    ]
    for n in names:
        with open(top + b"/" + n, "wb") as f:
            f.write(n)
    os.mkdir(top + b"/dir\xff")
    with open(top + b"/dir\xff/in\nside", "wb") as f:
        f.write(b"x")
    result = scan(db, library)
    assert result.returncode == 0, result.stderr
    raw = cli(db, "ls", "--json").stdout
    assert "\\udcff" in raw  # a lone surrogate, as json.dumps writes it
    rows = by_path(db)
    for n in [*names, b"dir\xff", b"dir\xff/in\nside"]:
        assert top + b"/" + n in rows, n
        assert rows[top + b"/" + n]["path"] == os.fsdecode(top + b"/" + n)
    assert rows[top + b"/" + names[0]]["blake3"] == blake3.blake3(names[0]).hexdigest()
    assert diff(expected(library), indexed(db, library)) == []
    # The feed and a scoped scan take such names too.
    feed = [json.loads(line) for line in cli(db, "changes", "--since", "0", "--json").stdout.splitlines()]
    assert {os.fsencode(c["path"]) for c in feed} == set(rows)
    os.unlink(top + b"/dir\xff/in\nside")
    assert scan(db, library, os.fsdecode(top + b"/dir\xff")).returncode == 0
    assert top + b"/dir\xff/in\nside" not in by_path(db)


def test_empty_sparse_and_hard_linked_files(library: Path, db: Path) -> None:
    (library / "empty").write_bytes(b"")
    with open(library / "sparse", "wb") as f:
        f.seek(50 * 1024 * 1024)
        f.write(b"end")
    (library / "one").write_bytes(b"linked content")
    os.link(library / "one", library / "two")
    result = scan(db, library)
    assert result.returncode == 0, result.stderr
    rows = by_path(db)
    assert rows[os.fsencode(library / "empty")]["blake3"] == blake3.blake3(b"").hexdigest()
    sparse = b"\0" * (50 * 1024 * 1024) + b"end"
    assert rows[os.fsencode(library / "sparse")]["blake3"] == blake3.blake3(sparse).hexdigest()
    assert rows[os.fsencode(library / "sparse")]["size"] == len(sparse)
    one, two = rows[os.fsencode(library / "one")], rows[os.fsencode(library / "two")]
    assert one["inode"] == two["inode"] and one["nlink"] == two["nlink"] == 2
    assert one["blake3"] == two["blake3"] and one["id"] != two["id"]
    # Removing one name keeps the other (no rename confusion between the two names).
    os.unlink(library / "one")
    assert scan(db, library).returncode == 0
    rows = by_path(db)
    assert os.fsencode(library / "one") not in rows and rows[os.fsencode(library / "two")]["id"] == two["id"]
    assert diff(expected(library), indexed(db, library)) == []


@needs_other_user
def test_unreadable_entries_are_recorded_and_cleared(tmp_path: Path) -> None:
    library = tmp_path / "lib"
    library.mkdir()
    (library / "ok").write_bytes(b"fine")
    (library / "locked").write_bytes(b"secret")
    os.chmod(library / "locked", 0o600)  # root's: unreadable to nobody
    (library / "closed").mkdir()
    (library / "closed" / "inside").write_bytes(b"i")
    dbdir = tmp_path / "db"
    dbdir.mkdir()
    db = dbdir / "index.db"
    # First index as root, so we can see that nothing indexed is lost by the failing scan.
    assert scan(db, library).returncode == 0
    before = by_path(db)
    shutil.chown(dbdir, "nobody", "nogroup")
    for f in dbdir.iterdir():
        shutil.chown(f, "nobody", "nogroup")
    os.chmod(library / "closed", 0o700)  # unlistable to nobody
    (library / "ok").write_bytes(b"changed, readable")
    os.chmod(library / "ok", 0o644)
    (library / "locked").write_bytes(b"secret, changed")  # must be re-read: cannot be

    result = scan(db, library, prefix=as_user("nobody", tmp_path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    status = json.loads(cli(db, "status", "--json").stdout)
    errors = {e["path"]: e["error"] for e in status["roots"][0]["errors"]}
    assert errors, result.stderr
    assert str(library / "locked") in errors and "ermission" in errors[str(library / "locked")]
    assert str(library / "closed") in errors
    after = by_path(db)
    assert set(after) == set(before)  # nothing lost: the unlistable folder keeps what it held
    assert after[os.fsencode(library / "ok")]["blake3"] == blake3.blake3(b"changed, readable").hexdigest()
    assert after[os.fsencode(library / "locked")]["blake3"] != before[os.fsencode(library / "locked")]["blake3"]

    result = scan(db, library)  # as root: readable again
    assert result.returncode == 0, result.stderr
    status = json.loads(cli(db, "status", "--json").stdout)
    assert status["roots"][0]["errors"] == []
    assert diff(expected(library), indexed(db, library)) == []


def test_file_changing_while_hashed_is_not_stored_as_hashed(library: Path, db: Path) -> None:
    big = library / "growing.bin"
    big.write_bytes(os.urandom(64 * 1024 * 1024))
    stop = threading.Event()

    def writer() -> None:
        with big.open("ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()
                time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--db", str(db), "scan", "--root", str(library)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = proc.communicate(timeout=120)
    finally:
        stop.set()
        t.join()
    # While it kept growing, no scan could have stored a hash for it as if it were stable.
    assert proc.returncode == 1, (out, err)
    assert "kept changing" in err
    listed = cli(db, "ls", "--json", check=False)
    assert listed.returncode == 0, (listed.stderr, out, err)
    row = by_path(db).get(os.fsencode(big))
    assert row is None or row["blake3"] is None or row["size"] != big.stat().st_size
    # Once quiet, a scan brings it in line with the disk.
    result = scan(db, library)
    assert result.returncode == 0, result.stderr
    assert diff(expected(library), indexed(db, library)) == []
