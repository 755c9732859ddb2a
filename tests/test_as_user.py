"""tests/as_user.py: another user reaches the checkout and a test's folder, the host is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.as_user import REPO, as_user, needs_other_user

PROBE = """
import json, os, sys
import daemon
folder, closed = sys.argv[1:]
print(json.dumps({"uid": os.getuid(), "daemon": daemon.__file__, "prefix": sys.prefix,
                  "read": open(os.path.join(folder, "note"), encoding="ascii").read(),
                  "listed": sorted(os.listdir(closed))}))
"""


def mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


@needs_other_user
def test_nobody_runs_the_checkouts_python_and_reaches_a_folder_below_closed_ones(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    folder = closed / "inner" / "work"
    folder.mkdir(parents=True)
    closed.chmod(0o700)
    (closed / "private").write_bytes(b"not for nobody")
    (folder / "note").write_text("hello")
    modes = {p: p.stat().st_mode for p in (closed, *tmp_path.parents)}
    before = mounts()

    result = subprocess.run(
        [*as_user("nobody", folder), sys.executable, "-c", PROBE, str(folder), str(closed)],
        capture_output=True, text=True, timeout=60, cwd="/", check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 65534
    assert seen["daemon"] == str(REPO / "daemon" / "__init__.py")
    assert seen["prefix"] == sys.prefix
    assert seen["read"] == "hello"
    assert seen["listed"] == ["inner"]  # the way there, nothing else of the closed folder
    assert {p: p.stat().st_mode for p in modes} == modes
    assert mounts() == before
