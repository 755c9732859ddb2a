"""A scan's worker process and the two pipes to it: requests out, answers back, each framed as
``multiprocessing.connection`` frames them. The hash workers (``hasher``) and the listers
(``listers``) are both one of these, with their own requests and answers; ``worker_pipes`` is
the worker's own side.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size
STOP_POLL_MS = 200  # how often a send waiting on a full request pipe looks at its stop flag


def never_stopping() -> bool:
    """The stop flag of an owner that gives its workers up only at ``close``."""
    return False


class WorkerProcess:
    """``python -P -c "from <module> import serve; serve(requests, results)"`` and its pipes.

    A subclass says how answers are read (``receive_ready``) and what becomes of the requests
    of a worker that died or never started (``died``); ``alive`` is False from then on.
    ``stopping`` is the owner's stop flag, looked at while a send waits for room.
    """

    stopping: Callable[[], bool] = staticmethod(never_stopping)

    def __init__(self, module: str) -> None:
        child_requests, self.request_fd = os.pipe()
        try:
            self.result_fd, child_results = os.pipe()
        except OSError:
            os.close(child_requests)
            os.close(self.request_fd)
            raise
        try:
            # -P: not the current folder first on sys.path, where a `daemon` of another
            # checkout would give the workers other code than the scan's.
            serve_call = f"from {module} import serve; serve({child_requests}, {child_results})"
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-P", "-c", serve_call],
                pass_fds=(child_requests, child_results),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError:
            self.process = None  # its requests are the scan's own to do, as for a worker that died
        finally:
            os.close(child_requests)
            os.close(child_results)
        from multiprocessing.connection import Connection  # 5 ms of imports: only where used

        os.set_blocking(self.request_fd, False)
        for fd in (self.request_fd, self.result_fd):
            # Room for dozens of requests each way (the default 64 KiB holds ~10 hash groups): a
            # full pipe stalls the scan or the worker, never both (see send). Refused beyond
            # pipe-max-size or the user's pipe quota: the default then.
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self.results: Connection = Connection(self.result_fd, writable=False)
        self.alive = self.process is not None
        self.readable = select.poll()
        self.readable.register(self.result_fd, select.POLLIN)
        self.writable_or_readable = select.poll()
        self.writable_or_readable.register(self.result_fd, select.POLLIN)
        self.writable_or_readable.register(self.request_fd, select.POLLOUT)

    def send(self, payload: bytes) -> None:
        """One request, for the worker's recv_bytes. Never blocks while the worker blocks on a
        full answer pipe: the answers waiting are read meanwhile. Waiting for room in a full
        request pipe (a worker deep in a long request reads nothing), it gives the worker up
        once ``stopping``: a SIGTERM is not held up by the longest request in the pipe."""
        frame = memoryview(struct.pack("!i", len(payload)) + payload)
        while frame and self.alive:
            try:
                frame = frame[os.write(self.request_fd, frame) :]
            except BlockingIOError:
                if self.stopping():
                    self.give_up()
                    return
                self.writable_or_readable.poll(STOP_POLL_MS)
                self.receive_ready()
            except BrokenPipeError:
                self.died()

    def give_up(self) -> None:
        """Stop using the worker, mid-request or not: a part-written frame leaves its request
        stream unreadable, so the process is killed now (``close`` waits for it)."""
        self.alive = False
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    def receive_ready(self) -> None:
        raise NotImplementedError

    def died(self) -> None:
        raise NotImplementedError

    def close(self, *, kill: bool = False) -> None:
        os.close(self.request_fd)  # the worker ends at its next read
        self.results.close()
        if kill:  # a worker deep in a long request reads nothing for long
            self.give_up()
        if self.process is not None:
            self.process.wait()


def worker_pipes(request_fd: int, result_fd: int) -> tuple[Connection, Connection]:
    """In a worker process: its two pipes (requests in, answers out), with Ctrl-C and SIGTERM
    ignored. Ctrl-C in a terminal reaches the whole process group (and `systemctl kill` the
    whole cgroup): the scan stops and closes the pipes, and the worker's loop ends at its next
    read or write, instead of a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from multiprocessing.connection import Connection  # 5 ms of imports: only where used

    return Connection(request_fd, writable=False), Connection(result_fd, readable=False)
