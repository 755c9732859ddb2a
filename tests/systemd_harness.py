"""Real systemd pieces for the service tests: a private mount namespace, journald, a user manager,
and a NOTIFY_SOCKET the test binds itself. Nothing here imitates systemd; it starts the real one.

How the pieces fit (facts found on these machines, where systemd is installed but is not PID 1):

* :class:`Namespace` is a process (``unshare -m --propagation private sh -c '...; exec sleep'``)
  that holds a private mount namespace. Inside it a fresh tmpfs is mounted over ``/run``, with
  an empty ``/run/systemd/system`` (what ``sd_booted()`` looks for). Every other program is run
  inside with ``nsenter -t PID -m`` (no fork: the pid we get is the program's), and the test
  reads the namespace's files through ``/proc/PID/root``. When the last process in it exits the
  namespace and its mounts are gone, so nothing leaks into the host's ``/run``.
* ``/run`` must be a *mount point*, not just a directory: a unit with ProtectKernelTunables=,
  ProtectControlGroups= or ProtectProc= gets its API file systems mounted, and systemd then
  mounts an empty tmpfs over ``/run`` unless it is already a mount point (on a booted system it
  always is). On this machine ``/run`` is a plain directory of the root file system, so without
  the tmpfs the service sees an empty ``/run``: no journal socket, no NOTIFY_SOCKET.
* The namespace is made private (cut off from the host), then ``rshared`` again, as PID 1 makes
  every mount at boot: systemd makes each service's namespace a *slave* of it, and only a
  shared parent propagates an unmount (a NAS disk going away) into the service. Left private,
  the service keeps seeing a disk unmounted outside.
* ``/run/systemd/inaccessible/{reg,dir,chr,blk,fifo,sock}`` are made here as PID 1 would make
  them at boot: ProtectHome=yes, InaccessiblePaths= and ProtectKernel*= bind-mount them over
  what they hide, and without them every such unit fails with 226/NAMESPACE. (A user manager
  running as root looks for them there, not under its ``$XDG_RUNTIME_DIR``.)
* ``/lib/systemd/systemd-journald`` runs in the namespace; it listens on
  ``/run/systemd/journal/{socket,stdout}`` and keeps a volatile journal in ``/run/log/journal``
  (``/var/log/journal``, if it exists, is covered by a tmpfs too, so nothing is persisted).
* ``/lib/systemd/systemd --user`` runs in the namespace as root with ``XDG_RUNTIME_DIR`` a fresh
  0700 folder under ``/run`` (a service with PrivateTmp= cannot see ``/tmp``) and
  ``XDG_CONFIG_HOME``/``XDG_STATE_HOME``/... in the test's own folder under ``/srv``, so units go
  to ``$XDG_CONFIG_HOME/systemd/user``. ``StateDirectory=`` of a user unit is *not*
  ``$XDG_STATE_HOME/<name>`` on systemd 252 but ``$XDG_CONFIG_HOME/<name>`` (254 moved it), so
  :meth:`UserManager.state_directory` asks the manager instead of guessing.
  ``systemctl --user`` reaches it through ``$XDG_RUNTIME_DIR/systemd/private`` (no D-Bus).
  Its own log goes to the journal (SYSTEMD_LOG_TARGET=journal), so "Watchdog timeout" and the
  like can be read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEMD = Path("/lib/systemd/systemd")
JOURNALD = Path("/lib/systemd/systemd-journald")
TOOLS = ("systemctl", "journalctl", "systemd-analyze", "unshare", "nsenter")
REPO = Path(__file__).resolve().parent.parent
UNIT_FILE = REPO / "packaging" / "systemd" / "treewatch.service"
ROOTS_DROPIN = REPO / "packaging" / "systemd" / "roots.conf.example"

# Mounted inside the private namespace before anything else runs there.
NAMESPACE_SETUP = r"""
set -eu
mount -t tmpfs -o mode=0755,size=256m tmpfs /run
mkdir -p /run/systemd/system /run/log/journal
if [ -d /var/log/journal ]; then mount -t tmpfs -o mode=0755,size=64m tmpfs /var/log/journal; fi
cd /run/systemd && mkdir -m 0755 inaccessible && cd inaccessible
: > reg; mkdir dir; mkfifo fifo; mknod chr c 0 0; mknod blk b 0 0
chmod 0000 reg dir fifo chr blk
# PID 1 makes every mount shared at boot; a service's namespace is a slave of it, which is how a
# disk unmounted on the host disappears inside the service too. Cut off from the host above
# (private), shared again from here on: new peer groups that stay inside this namespace.
mount --make-rshared /
echo ready
exec sleep infinity
"""


def missing_requirements() -> str | None:
    """Why these tests cannot run here, or None. Only two reasons count: not root, no systemd."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, a systemd user manager and journald running as root)"
    missing = [str(p) for p in (SYSTEMD, JOURNALD) if not os.access(p, os.X_OK)]
    missing += [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return "systemd binaries missing: " + ", ".join(missing)
    return None


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``condition()`` is truthy; raise AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class Namespace:
    """A private mount namespace held open by one process; see the module docstring."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE_SETUP],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.pid = self.holder.pid
        self.procs: list[subprocess.Popen[bytes]] = []
        assert self.holder.stdout is not None
        ready, _, _ = select.select([self.holder.stdout], [], [], 30)
        line = self.holder.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self.close()
            err = self.holder.stderr.read().decode(errors="replace") if self.holder.stderr else ""
            raise RuntimeError(f"could not set up the mount namespace: {line!r} {err}")
        # The sixth inaccessible node, a socket, is easier to make from here than from sh.
        node = self.path("/run/systemd/inaccessible/sock")
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(node))
        node.chmod(0)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "--", *argv]

    def path(self, path: str) -> Path:
        """A path inside the namespace, as the test (outside it) can open it."""
        return Path(f"/proc/{self.pid}/root{path}")

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(self.argv(argv), env=env, capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, argv: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None
              ) -> subprocess.Popen[bytes]:  # fmt: skip
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(self.argv(argv), env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill what was started in here (and their children), then the holder: the mounts go."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                _kill(reversed(descendants(proc.pid)))
                proc.kill()
            proc.wait()
        _kill(reversed(descendants(self.pid)))
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait()
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream is not None:
                stream.close()


class Journal:
    """systemd-journald in the namespace, read back with journalctl there."""

    def __init__(self, ns: Namespace, log: Path) -> None:
        self.ns = ns
        self.proc = ns.popen([str(JOURNALD)], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, log=log)
        wait_until(
            lambda: (
                self.proc.poll() is not None
                or all(ns.path(f"/run/systemd/journal/{s}").exists() for s in ("socket", "stdout"))
            ),
            30,
            "journald's sockets",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-journald exited ({self.proc.returncode}): {log.read_text(errors='replace')}")

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        """Every entry matching journalctl ``matches`` (FIELD=value, +), as JSON objects."""
        out = self.ns.run(["journalctl", "--no-pager", "-o", "json", *matches], timeout=60)
        if out.returncode not in (0, 1):  # 1: no entries match
            raise AssertionError(f"journalctl failed ({out.returncode}): {out.stderr}")
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def text(self, *matches: str) -> str:
        out = self.ns.run(["journalctl", "--no-pager", "-o", "short-monotonic", *matches], timeout=60)
        return out.stdout


@dataclass
class UnitState:
    active: str
    sub: str
    main_pid: int
    n_restarts: int
    exec_main_code: int
    exec_main_status: int
    result: str
    status_text: str
    raw: dict[str, str]


class UserManager:
    """`systemd --user` in the namespace, running as root, driven with `systemctl --user`."""

    def __init__(self, ns: Namespace, home: Path, log: Path) -> None:
        self.ns = ns
        self.home = home
        self.runtime = "/run/treewatch-test-runtime"
        os.mkdir(ns.path(self.runtime), 0o700)
        self.config_home = home / "config"
        self.state_home = home / "state"
        self.unit_dir = self.config_home / "systemd" / "user"
        self.unit_dir.mkdir(parents=True)
        self.state_home.mkdir()
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(home),  # never the real /root: nothing of the test lands there
            "XDG_RUNTIME_DIR": self.runtime,
            "XDG_CONFIG_HOME": str(self.config_home),
            "XDG_STATE_HOME": str(self.state_home),
            "XDG_DATA_HOME": str(home / "data"),
            "XDG_CACHE_HOME": str(home / "cache"),
            "SYSTEMD_LOG_TARGET": "journal",
            "SYSTEMD_LOG_LEVEL": "info",
            "LANG": "C.UTF-8",
        }
        self.proc = ns.popen([str(SYSTEMD), "--user"], env=self.env, log=log)
        wait_until(
            lambda: (
                self.proc.poll() is not None or self.ctl("is-system-running").stdout.strip() in ("running", "degraded")
            ),
            60,
            "the user manager to start",
            interval=0.1,
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd --user exited ({self.proc.returncode}): {log.read_text(errors='replace')}")

    def state_directory(self, name: str) -> Path:
        """Where StateDirectory=name puts a user unit's state, asked of the manager itself: it is
        $XDG_CONFIG_HOME/name up to systemd 253 (the same folder as ConfigurationDirectory=name)
        and $XDG_STATE_HOME/name from 254 on."""
        out = self.ns.run(["systemd-run", "--user", "--quiet", "--wait", "--pipe", f"--property=StateDirectory={name}",
                           "/bin/sh", "-c", 'echo "$STATE_DIRECTORY"'], env=self.env)  # fmt: skip
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        return Path(out.stdout.strip())

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["systemctl", "--user", "--no-pager", *args], env=self.env, timeout=timeout)

    def state(self, unit: str) -> UnitState:
        props = ("ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainCode", "ExecMainStatus", "Result",
                 "StatusText")  # fmt: skip
        out = self.ctl("show", unit, *(f"--property={p}" for p in props)).stdout
        raw = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return UnitState(
            active=raw.get("ActiveState", ""),
            sub=raw.get("SubState", ""),
            main_pid=int(raw.get("MainPID") or 0),
            n_restarts=int(raw.get("NRestarts") or 0),
            exec_main_code=int(raw.get("ExecMainCode") or 0),
            exec_main_status=int(raw.get("ExecMainStatus") or 0),
            result=raw.get("Result", ""),
            status_text=raw.get("StatusText", ""),
            raw=raw,
        )

    def install(self, name: str, unit_text: str, dropins: dict[str, str]) -> None:
        """Write the unit and exactly these drop-ins (older ones removed), then daemon-reload."""
        (self.unit_dir / name).write_text(unit_text)
        dropin_dir = self.unit_dir / f"{name}.d"
        shutil.rmtree(dropin_dir, ignore_errors=True)
        if dropins:
            dropin_dir.mkdir()
            for file, text in dropins.items():
                (dropin_dir / file).write_text(text)
        out = self.ctl("daemon-reload")
        assert out.returncode == 0, out.stderr

    def close(self) -> None:
        """Ask the manager to stop its units and exit; kill what is left if it does not."""
        if self.proc.poll() is None:
            self.ctl("exit", timeout=30)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc.poll() is None:
            _kill(reversed(descendants(self.proc.pid)))
            self.proc.kill()
            self.proc.wait()


def packaged_unit(exec_start: str) -> str:
    """The packaged unit with ExecStart= replaced: the one edit the tests make to it."""
    lines = UNIT_FILE.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ExecStart=")]
    assert len(starts) == 1, "the packaged unit should have exactly one ExecStart="
    lines[starts[0]] = f"ExecStart={exec_start}"
    return "\n".join(lines) + "\n"


def roots_dropin(roots: Sequence[Path]) -> str:
    """packaging/systemd/roots.conf.example with its example roots replaced by these."""
    kept = [line for line in ROOTS_DROPIN.read_text().splitlines() if not line.startswith("ReadOnlyPaths=")]
    return "\n".join(kept + [f"ReadOnlyPaths=-{r}" for r in roots]) + "\n"


def venv_treewatch() -> Path:
    """The treewatch entry point of the venv running the tests (CI's clone or /work/main)."""
    return Path(sys.executable).parent / "treewatch"


def hidden_by_protect_home(*paths: Path) -> bool:
    """ProtectHome=yes hides /root, /home and /run/user: a venv there cannot start in the unit."""
    hidden = (Path("/root"), Path("/home"), Path("/run/user"))
    return any(h == p or h in p.parents for p in paths for h in hidden)


def hidden_by_private_tmp(*paths: Path) -> bool:
    """PrivateTmp=yes gives the service its own /tmp and /var/tmp: a checkout there is unseen."""
    hidden = (Path("/tmp"), Path("/var/tmp"))
    return any(h == p or h in p.parents for p in paths for h in hidden)


# --- NOTIFY_SOCKET --------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() when received
    pid: int  # the sender, from SCM_CREDENTIALS (what NotifyAccess=main checks)
    fields: dict[str, str]
    raw: str


class NotifySocket:
    """An AF_UNIX datagram socket bound where NOTIFY_SOCKET will point, read by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self._messages: list[Notification] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        creds_size = struct.calcsize("3i")
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:creds_size])[0]
            text = data.decode(errors="replace")
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self._lock:
                self._messages.append(Notification(at, pid, fields, text))

    @property
    def messages(self) -> list[Notification]:
        with self._lock:
            return list(self._messages)

    def wait_for(self, key: str, value: str | None = None, *, after: int = 0, timeout: float = 30) -> int:
        """Index of the first message from index ``after`` on that has ``key`` (= ``value``)."""

        def find() -> int | None:
            for i, m in enumerate(self.messages[after:], after):
                if key in m.fields and (value is None or m.fields[key] == value):
                    return i + 1  # truthy even for index 0
            return None

        return int(wait_until(find, timeout, f"{key}={value or '*'} on NOTIFY_SOCKET")) - 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
