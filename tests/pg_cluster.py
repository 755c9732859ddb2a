"""A private PostgreSQL cluster for the fleet tests: initdb and pg_ctl as the `postgres` user, a
Unix socket in the cluster's own folder, no TCP. Nothing depends on a server being there already.

The folder is made under /tmp and opened to the postgres user: pytest's tmp folders are 0700 under
/tmp/pytest-of-root, and a checkout may sit in a 0700 folder like /root.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"
# A role that must give a password (scram-sha-256); every other connection over the socket is trusted.
PASSWORD_ROLE = "tw_password"
PASSWORD = "s3cret-Pa55word"


def available() -> str | None:
    """Why no cluster can be started here, or None when one can."""
    if not (BIN / "initdb").exists():
        return f"PostgreSQL's server is not installed ({BIN}/initdb; Debian package `postgresql`)"
    if shutil.which("runuser") is None or os.geteuid() != 0:
        return "the tests start PostgreSQL as its own user: they need root and runuser"
    try:
        import pwd

        pwd.getpwnam(USER)
    except KeyError:
        return f"no `{USER}` user (Debian's postgresql package makes it)"
    return None


class Cluster:
    """One cluster: start, stop (any mode), and fresh databases by name."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="treewatch-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, USER)
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.names = itertools.count(1)
        self._as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust", "--no-sync",
                          "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
        # First match wins: the password role must authenticate; everyone else is trusted.
        (self.data / "pg_hba.conf").write_text(f"local all {PASSWORD_ROLE} scram-sha-256\nlocal all all trust\n")
        self.start()
        self.psql(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD '{PASSWORD}'")

    def _as_postgres(self, *argv: str) -> subprocess.CompletedProcess[str]:
        # In the cluster's folder: initdb and pg_ctl fail in a working directory their user cannot
        # enter (a checkout under /root).
        result = subprocess.run(
            ["runuser", "-u", USER, "--", *argv], capture_output=True, text=True, timeout=120, cwd=self.dir
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {result.stdout}{result.stderr}")
        return result

    def start(self) -> None:
        # fsync off: a test's cluster never outlives a power cut; a server crash (-m immediate)
        # is still recovered from its WAL, which the operating system holds. A benchmark's
        # cluster keeps PostgreSQL's defaults, as a catalogue in service would.
        options = f"-k {self.dir} -c listen_addresses='' -c max_connections=60"
        if not self.durable:
            options += " -c fsync=off -c full_page_writes=off"
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", options, "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        result = subprocess.run(["runuser", "-u", USER, "--", str(BIN / "pg_ctl"), "-D", str(self.data), "status"],
                                capture_output=True, text=True, cwd=self.dir)  # fmt: skip
        return result.returncode == 0

    def url(self, database: str = "postgres", user: str = USER, password: str | None = None) -> str:
        auth = user if password is None else f"{user}:{password}"
        return f"postgresql://{auth}@/{database}?host={self.dir}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-U", USER, "-d", database,
             "-c", sql],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {result.stderr}")
        return result.stdout.strip()

    def new_database(self, prefix: str = "fleet") -> str:
        """A fresh, empty database; its URL."""
        name = f"{prefix}_{next(self.names)}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
