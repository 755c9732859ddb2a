"""The daemon's replication to the fleet catalogue (`[replicate]`): a thread of its own that keeps
the catalogue caught up with the index, so that a catalogue that is slow, down or unreachable
never slows indexing.

While the catalogue is away the box keeps its feed (retention holds what the catalogue has not
taken: `hold`), retries with a growing delay, and logs one line when it goes and one when it is
back. Where it stands is published in the index (the `replication` table, written by the
scheduler with the rest of what `status` shows).
"""

from __future__ import annotations

import importlib.util
import sqlite3
import threading
import time
from dataclasses import replace

from daemon import logs
from daemon.catalogue import CatalogueError, connect, migrate, redact
from daemon.config import Config
from daemon.index import IndexError_, ReplicationRow
from daemon.logs import MessageId
from daemon.replicator import Applied, Replicator

# After a failure the next attempt waits this long, doubled for each failure in a row up to the
# maximum: a catalogue back after an outage is caught up within half a minute.
RETRY_S = 1.0
RETRY_MAX_S = 30.0
# How long a stopping daemon waits for a batch in flight to roll back.
CLOSE_TIMEOUT_S = 10.0


class Replication:
    """Replicates the index at ``config.database`` to ``config.replicate.url`` until closed."""

    def __init__(self, config: Config, published: ReplicationRow | None) -> None:
        assert config.replicate.url is not None
        self.url = config.replicate.url
        self.box = config.replicate.box_name()
        self.database = config.database
        self.keep_s = config.feed.retention_s
        self.log = logs.get()
        self.stop = threading.Event()
        shown = redact(self.url)
        same = published is not None and (published.url, published.box) == (shown, self.box)
        # Until the catalogue answers, what it held when this daemon last heard from it.
        self.state = ReplicationRow(
            url=shown,
            box=self.box,
            epoch=published.epoch if same and published else None,
            applied_seq=published.applied_seq if same and published else None,
            last_ok=published.last_ok if same and published else None,
            error=None,
        )
        self.thread = threading.Thread(target=self._run, name="replicate", daemon=True)
        self.down = False
        self.failures = 0

    def start(self) -> None:
        if importlib.util.find_spec("psycopg") is None:
            why = "psycopg 3 is not installed (pip install 'treewatch[fleet]')"
            self.state = replace(self.state, error=why)
            self.log.error("cannot replicate to the fleet catalogue", url=self.state.url, box=self.box, reason=why)
            return
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(CLOSE_TIMEOUT_S)

    def hold(self) -> tuple[str, int] | None:
        """The cursor whose rows retention keeps: what the catalogue has taken so far."""
        s = self.state
        return None if s.epoch is None or s.applied_seq is None else (s.epoch, s.applied_seq)

    def _applied(self, applied: Applied) -> None:
        was = self.state
        fresh = applied.action != "none" or was.error is not None or was.last_ok is None
        self.state = replace(was, epoch=applied.epoch, applied_seq=applied.seq, error=None,
                             last_ok=time.time() if fresh else was.last_ok)  # fmt: skip
        if applied.action == "snapshot":
            self.log.info("fleet catalogue: snapshot loaded", box=self.box, url=was.url, reason=applied.reason,
                          entries=applied.rows, seq=applied.seq, seconds=round(applied.seconds, 3))  # fmt: skip
        if self.down:
            self.down = False
            self.log.info("the fleet catalogue is back; caught up", url=was.url, box=self.box, seq=applied.seq,
                          message_id=MessageId.CATALOGUE_BACK)  # fmt: skip
        self.failures = 0

    def _failed(self, reason: str) -> float:
        """Note a failure; the delay before the next attempt."""
        self.state = replace(self.state, error=reason)
        delay = min(RETRY_MAX_S, RETRY_S * float(2 ** min(self.failures, 16)))
        self.failures += 1
        if not self.down:
            self.down = True
            self.log.warning("the fleet catalogue cannot be reached; the box keeps its feed and retries",
                             url=self.state.url, box=self.box, reason=reason, retry_in_s=delay,
                             message_id=MessageId.CATALOGUE_DOWN)  # fmt: skip
        return delay

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self._session()
                return  # stopped
            except CatalogueError as e:
                delay = self._failed(str(e))
            except (IndexError_, sqlite3.Error) as e:  # the index busy past its timeout, being replaced
                delay = self._failed(f"the index: {e}")
            except Exception as e:  # a bug must not end replication for good; it is said, then retried
                self.log.exception("replication failed", box=self.box, reason=str(e))
                delay = self._failed(f"{type(e).__name__}: {e}")
            self.stop.wait(delay)

    def _session(self) -> None:
        """One connection's life: migrate, then follow the index until stopped or a failure."""
        conn = connect(self.url, application=f"treewatch {self.box}")
        try:
            migrate(conn, self.url)
            replicator = Replicator(conn, self.url, self.box, self.database)
            try:
                replicator.follow(self.stop, self._applied, keep_s=self.keep_s)
            finally:
                replicator.close()
        finally:
            conn.close()
