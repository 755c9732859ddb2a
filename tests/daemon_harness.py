"""A real treewatch daemon in a subprocess, with short windows, and ways to wait for it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.oracle import diff, expected, indexed

FAST = {"debounce_s": 0.2, "max_delay_s": 2.0, "poll_interval_s": 1.0}


def write_config(path: Path, db: Path, roots: list[Path], *, watch: dict[str, Any] | None = None,
                 sync: dict[str, Any] | None = None, observer: str = "auto", extra: str = "") -> Path:  # fmt: skip
    lines = [f'database = "{db}"']
    for root in roots:
        lines += ["[[roots]]", f'path = "{root}"', f'observer = "{observer}"']
    lines.append("[watch]")
    lines += [f"{k} = {v}" for k, v in {**FAST, **(watch or {})}.items()]
    lines.append("[sync]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in {"full_interval_s": 0, **(sync or {})}.items()]
    lines += ["[log]", 'level = "debug"']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


@dataclass
class Daemon:
    config: Path
    db: Path
    roots: list[Path]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prefix: list[str] = field(default_factory=list)  # e.g. ["unshare", "-U", "-r", ...]
    proc: subprocess.Popen[bytes] | None = None
    peak_rss_kb: int = 0

    def start(self) -> Daemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "daemon", "--config", str(self.config), "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        self.wait(lambda: (s := self.status()) is not None and s["daemon"] is not None, 30, "the daemon to start")
        return self

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon", "--config", str(self.config), *args],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def status(self) -> dict[str, Any] | None:
        result = self.cli("status", "--json")
        return json.loads(result.stdout) if result.returncode == 0 else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mismatches(self) -> list[str]:
        problems: list[str] = []
        for root in self.roots:
            problems += diff(expected(root), indexed(self.db, root))
        return problems

    def quiet(self) -> bool:
        s = self.status()
        return bool(
            s is not None
            and s["daemon"] is not None
            and s["daemon"]["activity"] == "idle"
            and all(r["pending"] == 0 and r["state"] != "scanning" for r in s["roots"])
        )

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            self.peak_rss_kb = max(self.peak_rss_kb, self.rss_kb())
            if not self.alive():
                raise AssertionError(f"daemon exited ({self.proc and self.proc.returncode}) waiting for {what}:\n"
                                     + self.log()[-4000:])  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n" + self.log()[-4000:])
            time.sleep(0.1)

    def wait_converged(self, timeout: float = 60) -> None:
        """The tree is quiet and the index equals the oracle (checked twice, a publish apart)."""
        last: list[str] = []

        def converged() -> bool:
            nonlocal last
            if not self.quiet():
                return False
            last = self.mismatches()
            return not last and self.quiet()

        try:
            self.wait(converged, timeout, "convergence")
        except AssertionError as e:
            # Not quiet means it never compared: say what the daemon was doing instead.
            raise AssertionError(f"{e}\nmismatches: {last[:20]}\n{self.describe()}") from None

    def describe(self) -> str:
        """What `status --json` says the daemon is doing: activity, and per root its state,
        pending paths (the oldest, with the age of the oldest) and the scan in progress."""
        s = self.status()
        if s is None:
            return "status: unavailable"
        lines = [f"status: daemon {json.dumps(s['daemon'])}"]
        for r in s["roots"]:
            lines.append(
                f"  root {r['path']}: {r['state']}, pending {r['pending']}"
                f" (oldest {r.get('oldest_pending_s')} s: {r.get('pending_paths')}), scan {json.dumps(r['scan'])}"
            )
        return "\n".join(lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_kb(self) -> int:
        """The daemon's resident memory (the python process, also when started under a prefix)."""
        assert self.proc is not None
        pids = [self.proc.pid]
        with contextlib.suppress(OSError):
            pids += [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total = max(total, int(line.split()[1]))
        return total
