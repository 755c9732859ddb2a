"""Run this checkout's Python as another user, wherever the checkout was cloned.

Root's home (/root) and every ``mktemp -d`` folder are 0700, and so is pytest's
``/tmp/pytest-of-root``: another user cannot reach the checkout, its .venv (whose python and
editable install of ``daemon`` live there) or the test's folders. Opening those folders on the
host would change modes that other runs on the machine rely on (pytest closes
``pytest-of-<user>`` again at the start of every session), so nothing on the host changes.
The command runs in a private mount namespace instead, where a small tmpfs covers each
closed folder and the paths the command needs are bind-mounted back into it at their own
paths: ``sys.executable``, the editable finder's mapping and every path in a config or a
database mean the same inside and out, and inotify sees the same inodes.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("unshare", "mount", "setpriv")

needs_other_user = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in TOOLS),
    reason="needs root with unshare, mount and setpriv to run treewatch as another user",
)


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost folder above ``path`` that others may not traverse (None: all open)."""
    for parent in reversed(path.parents):
        if not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _outermost(paths: list[Path]) -> list[Path]:
    """``paths`` without those inside another (a bind mount of a folder brings its contents)."""
    unique = sorted(set(paths), key=lambda p: len(p.parts))
    kept: list[Path] = []
    for p in unique:
        if not any(p.is_relative_to(k) for k in kept):
            kept.append(p)
    return kept


def as_user(user: str, *reach: Path) -> list[str]:
    """A command prefix: what follows it runs as ``user`` (and its primary group), able to reach
    this checkout, the running virtualenv and the folders ``reach`` at their usual paths.

    The folders in ``reach`` are the test's own: they are opened to others (o+rx) here; what is
    inside them keeps its modes, so a test still decides what the user may read or write.
    """
    for folder in reach:
        folder.chmod(stat.S_IMODE(folder.stat().st_mode) | stat.S_IROTH | stat.S_IXOTH)
    exposed = _outermost([REPO, Path(sys.prefix).resolve(), *(f.resolve() for f in reach)])
    for path in exposed:
        if not path.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(f"{path} itself is closed to other users (cloned with umask 077?): open it (o+rx)")
    hidden = {p: a for p in exposed if (a := _closed_ancestor(p)) is not None}
    if Path("/") in hidden.values():
        raise RuntimeError("/ is closed to other users: nothing can be made reachable below it")
    # dash opens descriptors 3-9 only; each bound folder holds one until it is mounted.
    assert len(hidden) <= 7, hidden
    fds = {p: 3 + i for i, p in enumerate(hidden)}
    q = shlex.quote
    # Each folder is opened before any tmpfs covers its path: the bind mount is taken from the
    # descriptor (/proc/self/fd/N), and -c keeps mount(8) from resolving that link to a path,
    # which by then would name the empty folder in the tmpfs.
    lines = ["set -e", "umask 022"]  # the folders made in the tmpfs must be open to the user
    lines += [f"exec {fd}<{q(str(p))}" for p, fd in fds.items()]
    lines += [f"mount -t tmpfs -o mode=0755,size=1m treewatch-reach {q(str(a))}" for a in sorted(set(hidden.values()))]
    for p, fd in fds.items():
        lines += [f"mkdir -p {q(str(p))}", f"mount -c --rbind /proc/self/fd/{fd} {q(str(p))}", f"exec {fd}<&-"]
    account = pwd.getpwnam(user)
    lines.append(f'exec setpriv --reuid={account.pw_uid} --regid={account.pw_gid} --clear-groups "$@"')
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(lines), "sh"]
