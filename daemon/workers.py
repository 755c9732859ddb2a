"""A scan's worker process and the two pipes to it: requests out, answers back, each framed as
``multiprocessing.connection`` frames them. The hash workers (``hasher``) and the listers
(``listers``) are both one of these, with their own requests and answers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

PIPE_BYTES = 1024 * 1024  # Linux's default pipe-max-size


class WorkerProcess:
    """``python -P -c "from <module> import serve; serve(requests, results)"`` and its pipes.

    A subclass says how answers are read (``receive_ready``) and what becomes of the requests
    of a worker that died or never started (``died``); ``alive`` is False from then on.
    """

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
        full answer pipe: the answers waiting are read meanwhile."""
        frame = memoryview(struct.pack("!i", len(payload)) + payload)
        while frame and self.alive:
            try:
                frame = frame[os.write(self.request_fd, frame) :]
            except BlockingIOError:
                self.writable_or_readable.poll()
                self.receive_ready()
            except BrokenPipeError:
                self.died()

    def receive_ready(self) -> None:
        raise NotImplementedError

    def died(self) -> None:
        raise NotImplementedError

    def close(self, *, kill: bool = False) -> None:
        os.close(self.request_fd)  # the worker ends at its next read
        self.results.close()
        if self.process is not None:
            if kill:  # a worker deep in a long request reads nothing for long
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
            self.process.wait()
