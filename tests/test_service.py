"""treewatch as a systemd service, against the real things: systemd-journald, a `systemd --user`
manager running the packaged unit, a NOTIFY_SOCKET the test binds, systemd-analyze.

The harness (tests/systemd_harness.py) explains how systemd runs here without being PID 1. These
tests need root and the systemd binaries; they skip, saying why, only when one of those is missing.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.index import sqlite_uri
from daemon.logs import MessageId
from tests.systemd_harness import (
    UNIT_FILE,
    Journal,
    Namespace,
    NotifySocket,
    UserManager,
    hidden_by_private_tmp,
    hidden_by_protect_home,
    missing_requirements,
    packaged_unit,
    roots_dropin,
    venv_treewatch,
    wait_until,
)

SKIP_REASON = missing_requirements()
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))]

UNIT = "treewatch.service"
MAX_EXPOSURE = 2.0
# systemd's catalog ids (sd-messages.h) for "Main process exited" and "Deactivated successfully".
SD_MESSAGE_UNIT_PROCESS_EXIT = "98e322203f7a4ed290d09fe03c09fe15"
SD_MESSAGE_UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"
WATCHDOG_SEC = 2  # the test drop-in's WatchdogSec=, so that a SIGSTOP is noticed quickly
FAST_WATCH = {"debounce_s": 0.2, "max_delay_s": 2.0, "poll_interval_s": 0.3}


def write_config(path: Path, database: Path, roots: list[Path], *, observer: str = "auto",
                 extra: str = "") -> Path:  # fmt: skip
    lines = [f'database = "{database}"']
    for root in roots:
        lines += ["[[roots]]", f'path = "{root}"', f'observer = "{observer}"']
    lines += ["[watch]", *(f"{k} = {v}" for k, v in FAST_WATCH.items())]
    lines += ["[sync]", "full_interval_s = 0", "[log]", 'level = "info"']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def make_tree(root: Path, files: int) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(files):
        (root / ("sub" if i % 2 else "") / f"f{i}.bin").write_bytes(os.urandom(100 + i))
    return root


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "--db", str(db), *args],
                          check=False, capture_output=True, text=True, timeout=60)  # fmt: skip


def status(db: Path) -> dict[str, Any] | None:
    if not db.exists():
        return None
    out = cli(db, "status", "--json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def root_status(db: Path, root: Path) -> dict[str, Any] | None:
    s = status(db)
    return next((r for r in s["roots"] if r["path"] == str(root)), None) if s else None


def indexed_paths(db: Path, root: Path) -> set[str]:
    out = cli(db, "ls", str(root), "--json")
    return {json.loads(line)["path"] for line in out.stdout.splitlines()} if out.returncode == 0 else set()


# --- the real systemd pieces, shared by the module -------------------------------------------


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """The test's folder on the real file system, outside /tmp (PrivateTmp=) and /root (ProtectHome=)."""
    base = "/srv" if os.path.isdir("/srv") else "/var/lib"
    path = Path(tempfile.mkdtemp(prefix="treewatch-test-", dir=base))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    ns = Namespace()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture(scope="module")
def journal(namespace: Namespace, home: Path) -> Journal:
    return Journal(namespace, home / "journald.log")


@pytest.fixture(scope="module")
def manager(namespace: Namespace, journal: Journal, home: Path) -> Iterator[UserManager]:
    m = UserManager(namespace, home, home / "manager.log")
    try:
        yield m
    finally:
        m.close()


class Service:
    """The packaged unit installed in the user manager with one test's config and drop-ins."""

    def __init__(self, manager: UserManager, journal: Journal, home: Path, name: str) -> None:
        self.manager, self.journal = manager, journal
        self.dir = home / name
        self.dir.mkdir()
        self.config = self.dir / "config.toml"
        # StateDirectory=treewatch is the only folder the sandbox lets the daemon write.
        self.db = manager.state_directory("treewatch") / f"{name}.db"
        self.start_cursor = ""

    def install(self, roots: list[Path], extra_dropins: dict[str, str] | None = None) -> None:
        treewatch = venv_treewatch()
        dropins = {
            "roots.conf": roots_dropin(roots),
            # Test timing only: a quick watchdog and restarts.
            "timing.conf": f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nRestartSec=200ms\n",
            **(extra_dropins or {}),
        }
        if hidden_by_protect_home(treewatch, Path(sys.prefix).resolve(), Path(__file__).resolve()):
            # Only when the checkout itself lives under /root or /home (a CI quirk, not a NAS):
            # ProtectHome=yes would hide the venv and the unit could not start at all.
            dropins["checkout.conf"] = "[Service]\nProtectHome=read-only\n"
        checkout = Path(__file__).resolve().parents[1]
        if hidden_by_private_tmp(treewatch, Path(sys.prefix).resolve(), checkout):
            # Likewise for a checkout under /tmp: the service's private /tmp would hide it, so
            # it is bound in read-only (the way X11's socket is usually shown to such units).
            dropins["checkout-tmp.conf"] = f"[Service]\nBindReadOnlyPaths={checkout}\n"
        self.manager.install(UNIT, packaged_unit(f"{treewatch} --config {self.config} run"), dropins)

    def state(self) -> Any:
        return self.manager.state(UNIT)

    def diagnostics(self) -> str:
        st = self.state()
        tail = self.journal.text("--since=-5min")[-6000:]
        return f"\nunit: {st.raw}\njournal (last lines):\n{tail}"

    def entries(self, message_id: str, **fields: str) -> list[dict[str, Any]]:
        matches = [f"MESSAGE_ID={message_id}", "SYSLOG_IDENTIFIER=treewatch"]
        matches += [f"TREEWATCH_{k.upper()}={v}" for k, v in fields.items()]
        return self.journal.entries(*matches)

    def wait_entry(self, message_id: str, timeout: float = 30, **fields: str) -> dict[str, Any]:
        try:
            found: list[dict[str, Any]] = wait_until(lambda: self.entries(message_id, **fields), timeout,
                                                     f"journal entry {message_id} {fields}", interval=0.2)  # fmt: skip
        except AssertionError as e:
            raise AssertionError(f"{e}{self.diagnostics()}") from None
        return found[-1]

    def wait_state(self, what: str, condition: Any, timeout: float = 30) -> Any:
        try:

            def check() -> Any:
                st = self.state()
                return st if condition(st) else None

            return wait_until(check, timeout, what, interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}{self.diagnostics()}") from None

    def stop(self) -> None:
        self.manager.ctl("stop", UNIT, timeout=120)
        self.manager.ctl("reset-failed", UNIT)


@pytest.fixture
def service(request: pytest.FixtureRequest, manager: UserManager, journal: Journal, home: Path) -> Iterator[Service]:
    svc = Service(manager, journal, home, request.node.name)
    try:
        yield svc
    finally:
        svc.stop()


# --- 1. journald: structured fields and MESSAGE_IDs ------------------------------------------


def test_journal_fields_and_message_ids(service: Service) -> None:
    """Under the unit, with stderr on the journal, every alertable event is one journal entry
    with its stable MESSAGE_ID and TREEWATCH_* fields; `journalctl TREEWATCH_ROOT=...` finds them."""
    root = make_tree(service.dir / "photos", 6)
    secret = root / "private"
    secret.mkdir()
    (secret / "diary.txt").write_bytes(b"not for the indexer")
    secret.chmod(0)
    write_config(service.config, service.db, [root], observer="polling")
    # Root without capabilities cannot list a mode-0000 folder it owns: a real per-path EACCES,
    # the same one a treewatch user meets on a folder it may not read. (An unreadable *file*
    # would be the natural choice, but its error is not recorded today: reported to the lead.)
    service.install([root], {"nocaps.conf": "[Service]\nCapabilityBoundingSet=\nAmbientCapabilities=\n"})
    started = service.manager.ctl("start", UNIT)
    assert started.returncode == 0, started.stderr + service.diagnostics()

    entry = service.wait_entry(MessageId.STARTED)
    assert entry["TREEWATCH_ROOTS"] == "1"
    assert entry["TREEWATCH_DATABASE"] == str(service.db)
    assert entry["PRIORITY"] == "6"
    # stderr was the journal stream, so the daemon chose journald (JOURNAL_STREAM matched).
    assert entry.get("_SYSTEMD_USER_UNIT", UNIT) == UNIT

    synced = service.wait_entry(MessageId.FULL_SYNC_FINISHED, root=str(root))
    assert synced["TREEWATCH_FILES"] == "6", synced
    assert float(synced["TREEWATCH_SECONDS"]) >= 0
    assert "full sync finished" in synced["MESSAGE"]

    error = service.wait_entry(MessageId.SCAN_ERROR, root=str(root))
    assert error["TREEWATCH_PATH"] == str(secret)
    assert "Permission denied" in error["TREEWATCH_REASON"]
    assert error["PRIORITY"] == "4"
    assert str(secret) in error["MESSAGE"]

    away = root.with_name("photos.unplugged")
    root.rename(away)
    offline = service.wait_entry(MessageId.ROOT_OFFLINE, root=str(root))
    assert offline["TREEWATCH_REASON"]
    assert offline["PRIORITY"] == "4"
    away.rename(root)
    service.wait_entry(MessageId.ROOT_ONLINE, root=str(root))

    # What an admin types: everything about one root, and nothing about it is lost on the way.
    about_root = service.journal.entries(f"TREEWATCH_ROOT={root}")
    ids = {e.get("MESSAGE_ID") for e in about_root}
    assert {MessageId.FULL_SYNC_FINISHED, MessageId.SCAN_ERROR, MessageId.ROOT_OFFLINE, MessageId.ROOT_ONLINE} <= ids
    # The unreadable file was reported once, not on every polling pass.
    assert len(service.entries(MessageId.SCAN_ERROR, path=str(secret))) == 1

    assert service.manager.ctl("stop", UNIT).returncode == 0
    service.wait_entry(MessageId.STOPPED)


def test_journal_keeps_tracebacks_and_byte_paths(journal: Journal, namespace: Namespace) -> None:
    """daemon.logs straight into journald: a logged exception keeps its traceback (it was lost:
    only TREEWATCH_EXC_INFO=True arrived), a path that is not UTF-8 arrives as its exact bytes
    (the log call raised UnicodeEncodeError), the level becomes PRIORITY."""
    program = (
        "from daemon import logs\n"
        "logs.configure('info', journald=True)\n"
        "try:\n"
        "    raise ZeroDivisionError('boom')\n"
        "except ZeroDivisionError:\n"
        "    logs.get().exception('scan failed', root=b'/srv/caf\\xe9',\n"
        f"                         message_id='{MessageId.SCAN_ERROR}', exception_source='test')\n"
    )
    out = namespace.run(
        [sys.executable, "-c", program], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    )
    assert out.returncode == 0, out.stderr
    entries = journal.entries(f"MESSAGE_ID={MessageId.SCAN_ERROR}", "TREEWATCH_EXCEPTION_SOURCE=test")
    entry = entries[-1]
    assert entry["PRIORITY"] == "3"
    assert "ZeroDivisionError: boom" in entry["TREEWATCH_EXCEPTION"]
    assert "TREEWATCH_EXC_INFO" not in entry
    # journald stores a field's bytes as they come: the root's name, not a replacement.
    root = entry["TREEWATCH_ROOT"]
    assert (bytes(root) if isinstance(root, list) else root.encode()) == b"/srv/caf\xe9", root


# --- 2. sd_notify over a real NOTIFY_SOCKET --------------------------------------------------


def test_notify_protocol(tmp_path: Path) -> None:
    """READY (with STATUS), WATCHDOG at half of WATCHDOG_USEC, RELOADING+MONOTONIC_USEC then
    READY on SIGHUP (also for an invalid new config, which is refused), STOPPING on SIGTERM,
    exit 0 — in that order, every datagram from the main pid (what NotifyAccess=main accepts)."""
    root_a = make_tree(tmp_path / "a", 4)
    root_b = make_tree(tmp_path / "b", 2)
    db = tmp_path / "index.db"
    config = write_config(tmp_path / "config.toml", db, [root_a])
    sock_dir = Path(tempfile.mkdtemp(prefix="tw-", dir="/tmp"))  # sun_path is short: 108 bytes
    notify = NotifySocket(sock_dir / "notify")
    log = tmp_path / "daemon.log"
    watchdog_usec = 2_000_000
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "run"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        ready = notify.wait_for("READY", "1")
        # Before READY only requests for more start time (while watches are placed) may come.
        early = notify.messages[:ready]
        assert all(set(m.fields) == {"EXTEND_TIMEOUT_USEC", "STATUS"} for m in early), early
        assert notify.messages[ready].fields.get("STATUS", "").startswith("1 roots"), notify.messages[ready]

        # WATCHDOG=1 keeps coming, about every WATCHDOG_USEC/2, never close to WATCHDOG_USEC.
        first = notify.wait_for("WATCHDOG", "1")
        wait_until(lambda: sum("WATCHDOG" in m.fields for m in notify.messages) >= 4, 10, "four WATCHDOG=1")
        pings = [m.at for m in notify.messages[first:] if "WATCHDOG" in m.fields]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        half = watchdog_usec / 2e6
        assert all(0.5 * half <= g <= 1.5 * half for g in gaps), gaps

        # The ping does not wait for the database: with another process holding its write lock
        # (a long scan transaction, a checkpoint on a slow disk) the loop is alive and must say so.
        locker = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            mark = len(notify.messages)
            wait_until(lambda: sum("WATCHDOG" in m.fields for m in notify.messages[mark:]) >= 3, 3 * half + 1,
                       "WATCHDOG=1 to go on while the database is locked")  # fmt: skip
        finally:
            locker.rollback()
            locker.close()

        # SIGHUP with a new root: RELOADING=1 stamped with CLOCK_MONOTONIC, then READY=1.
        write_config(config, db, [root_a, root_b])
        mark = len(notify.messages)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=mark)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        stamp = int(notify.messages[reloading].fields["MONOTONIC_USEC"])
        assert before <= stamp <= after
        ready = notify.wait_for("READY", "1", after=reloading + 1)
        assert notify.messages[ready].fields.get("STATUS", "").startswith("2 roots"), notify.messages[ready]
        wait_until(lambda: (r := root_status(db, root_b)) and r["state"] == "online" and r["files"] == 2, 30,
                   "the reloaded configuration's new root to be indexed")  # fmt: skip

        # SIGHUP with an invalid configuration: the same two messages, the old configuration stays.
        config.write_text(config.read_text() + "\nbogus_key = 1\n")
        mark = len(notify.messages)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING", "1", after=mark)
        notify.wait_for("READY", "1", after=reloading + 1)
        assert proc.poll() is None
        wait_until(lambda: "bogus_key" in log.read_text(errors="replace"), 10, "the refused config to be logged")
        assert {r["path"] for r in (status(db) or {"roots": []})["roots"]} >= {str(root_a), str(root_b)}

        # SIGTERM: STOPPING=1, then a clean exit.
        mark = len(notify.messages)
        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING", "1", after=mark)
        assert proc.wait(60) == 0, log.read_text(errors="replace")[-3000:]
        kinds = [k for m in notify.messages for k in ("READY", "RELOADING", "STOPPING") if k in m.fields]
        assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], kinds
        assert stopping == max(i for i, m in enumerate(notify.messages) if "STOPPING" in m.fields)
        assert {m.pid for m in notify.messages} == {proc.pid}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- 3. the packaged unit under a real service manager ---------------------------------------


def test_unit_lifecycle(service: Service) -> None:
    """READY makes `start` return with the unit active (running); `reload` applies a new root
    without a restart; SIGKILL is restarted by Restart=; SIGSTOP is caught by the watchdog and
    restarted; `stop` drains and exits 0."""
    photos = make_tree(service.dir / "photos", 8)
    music = make_tree(service.dir / "music", 3)
    write_config(service.config, service.db, [photos])
    service.install([photos, music])
    ctl = service.manager.ctl

    started = ctl("start", UNIT)  # Type=notify: returns once READY=1 arrived
    assert started.returncode == 0, started.stderr + service.diagnostics()
    st = service.state()
    assert (st.active, st.sub) == ("active", "running"), service.diagnostics()
    assert st.status_text.startswith("1 roots"), st.status_text
    assert "active (running)" in ctl("status", UNIT).stdout
    first_pid = st.main_pid
    # The database is in the StateDirectory, the only place the sandbox lets it write.
    wait_until(lambda: (r := root_status(service.db, photos)) and r["files"] == 8 and r["state"] == "online", 30,
               "the first sync of photos")  # fmt: skip
    assert (status(service.db) or {})["daemon"]["pid"] == first_pid

    # reload: a new root, same process.
    write_config(service.config, service.db, [photos, music])
    reloaded = ctl("reload", UNIT)
    assert reloaded.returncode == 0, reloaded.stderr
    wait_until(lambda: (r := root_status(service.db, music)) and r["files"] == 3 and r["state"] == "online", 30,
               "the reloaded root to be indexed")  # fmt: skip
    service.wait_state("ready again after the reload", lambda s: s.status_text.startswith("2 roots"))
    st = service.state()
    assert (st.main_pid, st.n_restarts, st.active) == (first_pid, 0, "active")
    (music / "new.bin").write_bytes(b"watched")
    wait_until(lambda: str(music / "new.bin") in indexed_paths(service.db, music), 30, "a new file to be indexed")

    # SIGKILL: Restart=on-failure brings it back; it resumes watching.
    os.kill(first_pid, signal.SIGKILL)
    st = service.wait_state(
        "a restart after SIGKILL",
        lambda s: s.n_restarts == 1 and s.sub == "running" and s.main_pid not in (0, first_pid),
    )
    second_pid = st.main_pid
    wait_until(lambda: (s := status(service.db)) and s["daemon"] and s["daemon"]["pid"] == second_pid, 30,
               "the restarted daemon to publish its status")  # fmt: skip
    (photos / "after-kill.bin").write_bytes(b"resumed")
    wait_until(lambda: str(photos / "after-kill.bin") in indexed_paths(service.db, photos), 30,
               "the restarted daemon to index a new file")  # fmt: skip

    # SIGSTOP: the loop stops pinging, WatchdogSec= fires (SIGABRT, with a SIGCONT), Restart= again.
    os.kill(second_pid, signal.SIGSTOP)
    st = service.wait_state("the watchdog to restart a stopped daemon",
                            lambda s: s.n_restarts == 2 and s.sub == "running" and s.main_pid not in (0, second_pid),
                            timeout=WATCHDOG_SEC + 30)  # fmt: skip
    third_pid = st.main_pid
    assert not Path(f"/proc/{second_pid}").exists()
    assert f"{UNIT}: Watchdog timeout" in service.journal.text("SYSLOG_IDENTIFIER=systemd")
    wait_until(lambda: (s := status(service.db)) and s["daemon"] and s["daemon"]["pid"] == third_pid, 30,
               "the daemon restarted by the watchdog to publish its status")  # fmt: skip

    # stop: SIGTERM, drain, exit 0, well inside TimeoutStopSec. A unit stopped cleanly is
    # unloaded at once (CollectMode=inactive), taking ExecMainStatus= with it, so the exit
    # status is read from the manager's own record of it, which it logs at debug level.
    assert ctl("log-level", "debug").returncode == 0
    t0 = time.monotonic()
    stopped = ctl("stop", UNIT)
    elapsed = time.monotonic() - t0
    assert ctl("log-level", "info").returncode == 0
    assert stopped.returncode == 0, stopped.stderr
    assert elapsed < 30
    assert service.state().active == "inactive"
    exits = service.journal.entries(f"MESSAGE_ID={SD_MESSAGE_UNIT_PROCESS_EXIT}", f"USER_UNIT={UNIT}",
                                    f"_PID={service.manager.proc.pid}")  # fmt: skip
    assert exits, service.diagnostics()
    assert (exits[-1]["EXIT_CODE"], exits[-1]["EXIT_STATUS"]) == ("exited", "0"), exits[-1]["MESSAGE"]
    assert service.journal.entries(f"MESSAGE_ID={SD_MESSAGE_UNIT_SUCCESS}", f"USER_UNIT={UNIT}")
    service.wait_entry(MessageId.STOPPED)
    final = status(service.db)
    assert final is not None and final["daemon"] is None
    assert {r["path"]: r["files"] for r in final["roots"]} == {str(photos): 9, str(music): 4}


def test_unit_follows_a_root_disk_unmounted_and_mounted(service: Service) -> None:
    """The NAS case: a root is a mount point and its disk goes away, then comes back. The
    service's sandbox (its own mount namespace, plus the roots drop-in) must still see the
    unmount, so the root goes offline (nothing deleted) and comes back online."""
    ns = service.manager.ns
    disk = service.dir / "usbdisk"
    disk.mkdir()

    def mount_disk() -> None:
        # Mounted in the manager's namespace, as the host would: the service's namespace follows.
        assert ns.run(["mount", "-t", "tmpfs", "-o", "size=16m", "usbdisk", str(disk)]).returncode == 0
        make_tree(ns.path(str(disk)), 5)

    mount_disk()
    write_config(service.config, service.db, [disk], observer="polling")
    service.install([disk])
    started = service.manager.ctl("start", UNIT)
    assert started.returncode == 0, started.stderr + service.diagnostics()
    wait_until(lambda: (r := root_status(service.db, disk)) and r["files"] == 5 and r["state"] == "online", 30,
               "the disk's first sync")  # fmt: skip

    unmounted = ns.run(["umount", str(disk)])
    assert unmounted.returncode == 0, unmounted.stderr
    service.wait_entry(MessageId.ROOT_OFFLINE, root=str(disk))
    offline = root_status(service.db, disk)
    assert offline is not None and offline["state"] == "offline" and offline["files"] == 5, offline

    mount_disk()
    service.wait_entry(MessageId.ROOT_ONLINE, root=str(disk))
    wait_until(lambda: (r := root_status(service.db, disk)) and r["state"] == "online", 30, "the disk back online")
    assert service.state().n_restarts == 0


def test_unit_follows_a_volume_mounted_and_unmounted_below_a_root(service: Service) -> None:
    """A disk mounted below a root after the service started, then unmounted and mounted again,
    on the host: the mounts reach the service's sandbox (its namespace is a slave of the host's,
    and so is the roots drop-in's read-only bind), its poll() on the mount table sees them, and
    the journal says offline and online once each, with their MESSAGE_IDs."""
    ns = service.manager.ns
    root = make_tree(service.dir / "photos", 3)
    usb, disk = root / "usb", service.dir / "usbdisk"
    usb.mkdir()
    disk.mkdir()
    write_config(service.config, service.db, [root])
    service.install([root])
    assert service.manager.ctl("start", UNIT).returncode == 0, service.diagnostics()
    wait_until(lambda: (r := root_status(service.db, root)) and r["files"] == 3, 30, "the first sync")

    assert ns.run(["mount", "-t", "tmpfs", "-o", "size=16m", "usbdisk", str(disk)]).returncode == 0
    make_tree(ns.path(str(disk)), 4)
    assert ns.run(["mount", "--bind", str(disk), str(usb)]).returncode == 0

    def volume() -> dict[str, Any] | None:
        r = root_status(service.db, root)
        return next((v for v in r["volumes"] if v["path"] == str(usb)), None) if r else None

    wait_until(lambda: (v := volume()) and v["state"] == "online" and v["entries"] == 5, 30,
               "the new volume synced")  # fmt: skip
    assert ns.run(["umount", str(usb)]).returncode == 0
    entry = service.wait_entry(MessageId.VOLUME_OFFLINE, root=str(root))
    assert entry["TREEWATCH_PATH"] == str(usb) and entry["PRIORITY"] == "4", entry
    v = volume()
    assert v is not None and v["state"] == "offline" and v["entries"] == 5, v
    assert ns.run(["mount", "--bind", str(disk), str(usb)]).returncode == 0
    service.wait_entry(MessageId.VOLUME_ONLINE, root=str(root), path=str(usb))
    assert len(service.entries(MessageId.VOLUME_OFFLINE, root=str(root))) == 1
    assert (r := root_status(service.db, root)) is not None and r["files"] == 3 + 4
    assert ns.run(["umount", str(usb)]).returncode == 0
    assert ns.run(["umount", str(disk)]).returncode == 0


def test_unit_starts_with_a_root_missing(service: Service) -> None:
    """A root that is away when the service starts (a disk not mounted at boot) is offline; the
    service itself starts — the roots drop-in must not turn a missing root into 226/NAMESPACE."""
    root = make_tree(service.dir / "photos", 3)
    write_config(service.config, service.db, [root])
    service.install([root])
    assert service.manager.ctl("start", UNIT).returncode == 0, service.diagnostics()
    wait_until(lambda: (r := root_status(service.db, root)) and r["files"] == 3, 30, "the first sync")
    assert service.manager.ctl("stop", UNIT).returncode == 0
    root.rename(root.with_name("photos.away"))

    started = service.manager.ctl("start", UNIT)
    assert started.returncode == 0, started.stderr + service.diagnostics()
    assert service.state().sub == "running"
    service.wait_entry(MessageId.ROOT_OFFLINE, root=str(root))


def test_unit_repairs_a_damaged_database_in_place(service: Service) -> None:
    """Leaves of the index overwritten while the service was stopped: under the unit's sandbox
    the daemon sets the file aside in its state directory, salvages it and goes on, without a
    restart; the journal has both entries with the damaged file's path and the counts."""
    root = make_tree(service.dir / "photos", 400)
    write_config(service.config, service.db, [root])
    service.install([root])
    assert service.manager.ctl("start", UNIT).returncode == 0, service.diagnostics()
    wait_until(lambda: (r := root_status(service.db, root)) and r["files"] == 400, 30, "the first sync")
    assert service.manager.ctl("stop", UNIT).returncode == 0
    con = sqlite3.connect(sqlite_uri(service.db, "mode=ro"), uri=True)
    pages = [p for (p,) in con.execute("SELECT pageno FROM dbstat WHERE name = 'entries' AND pagetype = 'leaf'")]
    con.close()
    with service.db.open("r+b") as f:
        f.seek((pages[len(pages) // 2] - 1) * 4096)
        f.write(os.urandom(4096))

    assert service.manager.ctl("start", UNIT).returncode == 0, service.diagnostics()
    damaged = service.wait_entry(MessageId.DAMAGED, database=str(service.db))
    assert "malformed" in damaged["TREEWATCH_REASON"] and damaged["PRIORITY"] == "3"
    repaired = service.wait_entry(MessageId.REPAIRED, database=str(service.db))
    kept = Path(repaired["TREEWATCH_DAMAGED"])
    assert kept.parent == service.db.parent and kept.name.startswith(service.db.name + ".damaged-") and kept.exists()
    assert 0 < int(repaired["TREEWATCH_ENTRIES"]) < 402 and int(repaired["TREEWATCH_HASHED"]) > 300, repaired
    wait_until(lambda: indexed_paths(service.db, root) == {str(p) for p in root.rglob("*")}, 30, "the sync")
    st = service.state()
    assert (st.sub, st.n_restarts) == ("running", 0), st.raw


def test_unit_bad_config_exits_78_and_is_not_restarted(service: Service) -> None:
    """A configuration error is EX_CONFIG (78), which RestartPreventExitStatus= keeps from a restart loop."""
    root = make_tree(service.dir / "photos", 1)
    write_config(service.config, service.db, [root], extra="\n[watch2]\nx = 1\n")
    service.install([root])
    started = service.manager.ctl("start", UNIT)
    assert started.returncode != 0
    # systemd decides on a restart when the process exits, before `start` returns: a unit that
    # would be restarted is in "auto-restart" now, one that is not is "failed".
    st = service.state()
    assert (st.active, st.sub, st.result) == ("failed", "failed", "exit-code"), st.raw
    assert (st.exec_main_code, st.exec_main_status, st.n_restarts) == (1, 78, 0), st.raw
    assert "watch2" in service.journal.text("--since=-2min", "SYSLOG_IDENTIFIER=treewatch")


# --- 4. the unit file itself -----------------------------------------------------------------


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the packaged unit (ExecStart= pointed at a real file)."""
    unit = tmp_path / UNIT
    unit.write_text(packaged_unit(f"{venv_treewatch()} --config /etc/treewatch/config.toml run"))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], check=False, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    # Warnings about the unit itself (not about other units on this machine) are failures too.
    own = [line for line in (out.stdout + out.stderr).splitlines() if str(unit) in line or UNIT in line]
    # This libseccomp predates two syscalls systemd 252's @system-service names; harmless, not ours.
    own = [line for line in own if not re.search(r"Failed to parse system call, ignoring: \w+", line)]
    assert not own, "\n".join(own)


def test_unit_security_exposure() -> None:
    """`systemd-analyze security --offline=true` rates the packaged unit at most MAX_EXPOSURE."""
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT_FILE)],
                         check=False, capture_output=True, text=True, timeout=120)  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, out.stdout
