"""Property: after any sequence of filesystem operations and a scan, the index equals an
independent walk of the disk, and replaying the change feed from seq 0 gives the same paths.

Names come from a tiny alphabet so that operations collide: renames onto existing names,
chains (`mv b c; mv a b`), a file replaced by a folder of the same name and back, entries
moved into a folder created in the same round, names matching an `exclude` glob.
The engine runs in-process (the same code the CLI runs) to keep each example fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import xattr
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from daemon.config import RootConfig, SyncConfig
from daemon.index import Index
from daemon.model import ScanScope
from daemon.scan import scan
from tests.engine import replay, rows, run_scan
from tests.oracle import diff, expected

NAMES = st.sampled_from(["a", "b", "c", "dd", "x.tmp"])  # "*.tmp" is excluded
# Few distinct contents (equal ones exercise the rename-by-content rule); 300 kB is above the
# hasher's small-file threshold, so its chunked path runs too.
CONTENT = st.builds(lambda b, n: bytes([b]) * n, st.integers(0, 3), st.sampled_from([0, 1, 5, 300_000]))
EXCLUDE = ("*.tmp",)


class ScanMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="tw-prop-"))
        self.root = self.tmp / "lib"
        self.root.mkdir()
        # Never touched by the operations: an emptied root is offline by design (nothing deleted).
        (self.root / ".keep").write_bytes(b"")
        self.index = Index(self.tmp / "index.db")
        self.scans = 0

    def teardown(self) -> None:
        self.index.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- picking existing entries --------------------------------------------------------

    def _all(self) -> list[Path]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for n in dirnames + filenames:
                out.append(Path(dirpath) / n)
        return sorted(p for p in out if p != self.root / ".keep")

    def _dirs(self) -> list[Path]:
        return [self.root] + [p for p in self._all() if p.is_dir() and not p.is_symlink()]

    def _files(self) -> list[Path]:
        return [p for p in self._all() if p.is_file() and not p.is_symlink()]

    @staticmethod
    def _pick(items: list[Path], i: int) -> Path | None:
        return items[i % len(items)] if items else None

    # --- operations ----------------------------------------------------------------------

    @initialize(names=st.lists(NAMES, min_size=1, max_size=4), data=st.lists(CONTENT, min_size=4, max_size=4))
    def start(self, names: list[str], data: list[bytes]) -> None:
        (self.root / "a").mkdir()
        for i, name in enumerate(names):
            p = self.root / ("a" if i % 2 else "") / (name + str(i))
            p.write_bytes(data[i])
        self.scan()

    @rule(d=st.integers(0, 50), name=NAMES, data=CONTENT)
    def create(self, d: int, name: str, data: bytes) -> None:
        folder = self._pick(self._dirs(), d)
        assert folder is not None
        target = folder / name
        if not target.exists() and not target.is_symlink():
            target.write_bytes(data)

    @rule(f=st.integers(0, 50), data=CONTENT)
    def modify(self, f: int, data: bytes) -> None:
        if (p := self._pick(self._files(), f)) is not None:
            p.write_bytes(data)

    @rule(f=st.integers(0, 50))
    def truncate(self, f: int) -> None:
        if (p := self._pick(self._files(), f)) is not None:
            os.truncate(p, 0)

    @rule(f=st.integers(0, 50))
    def append(self, f: int) -> None:
        if (p := self._pick(self._files(), f)) is not None:
            with p.open("ab") as fh:
                fh.write(b"more")

    @rule(src=st.integers(0, 50), name=NAMES)
    def rename(self, src: int, name: str) -> None:
        if (p := self._pick(self._all(), src)) is not None:
            self._move(p, p.parent / name)

    @rule(src=st.integers(0, 50), d=st.integers(0, 50), name=NAMES)
    def move(self, src: int, d: int, name: str) -> None:
        p = self._pick(self._all(), src)
        folder = self._pick(self._dirs(), d)
        if p is not None and folder is not None:
            self._move(p, folder / name)

    @rule(src=st.integers(0, 50), other=st.integers(0, 50), name=NAMES)
    def chain(self, src: int, other: int, name: str) -> None:
        """`mv p NAME; mv q p`: the path p changes hands (log rotation does this)."""
        p, q = self._pick(self._all(), src), self._pick(self._all(), other)
        if p is not None and q is not None and p != q:
            self._move(p, p.parent / name)
            self._move(q, p)

    @rule(src=st.integers(0, 50), other=st.integers(0, 50))
    def swap(self, src: int, other: int) -> None:
        """`mv p t; mv q p; mv t q`: a cycle, which no order of plain renames describes."""
        p, q = self._pick(self._all(), src), self._pick(self._all(), other)
        if p is not None and q is not None and p != q:
            self._move(p, self.root / "swap-tmp")
            self._move(q, p)
            self._move(self.root / "swap-tmp", q)

    @staticmethod
    def _move(src: Path, dst: Path) -> None:
        # A folder into itself, a folder onto a file or a non-empty folder: mv refuses too.
        with contextlib.suppress(OSError):
            os.rename(src, dst)  # replaces a file (or an empty folder) at dst, like mv

    @rule(src=st.integers(0, 50))
    def delete(self, src: int) -> None:
        if (p := self._pick(self._all(), src)) is not None:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    @rule(src=st.integers(0, 50), mode=st.sampled_from([0o600, 0o644, 0o755, 0o700]))
    def chmod(self, src: int, mode: int) -> None:
        if (p := self._pick(self._all(), src)) is not None and not p.is_symlink():
            os.chmod(p, mode)

    @rule(src=st.integers(0, 50), value=st.binary(min_size=1, max_size=8))
    def set_xattr(self, src: int, value: bytes) -> None:
        if (p := self._pick(self._files() + self._dirs()[1:], src)) is not None:
            xattr.set(os.fsencode(p), b"user.prop", value)

    @rule(d=st.integers(0, 50), name=NAMES)
    def mkdir(self, d: int, name: str) -> None:
        folder = self._pick(self._dirs(), d)
        assert folder is not None
        if not (folder / name).exists() and not (folder / name).is_symlink():
            (folder / name).mkdir()

    @rule(d=st.integers(0, 50))
    def rmdir(self, d: int) -> None:
        folder = self._pick(self._dirs()[1:], d)
        if folder is not None:
            shutil.rmtree(folder)

    @rule(d=st.integers(0, 50), name=NAMES, to=st.sampled_from(["a", "../a", "/etc/passwd", "dd/x", "nowhere"]))
    def symlink(self, d: int, name: str, to: str) -> None:
        folder = self._pick(self._dirs(), d)
        assert folder is not None
        if not (folder / name).exists() and not (folder / name).is_symlink():
            (folder / name).symlink_to(to)

    @rule(src=st.integers(0, 50), to=st.sampled_from(["b", "c/d"]))
    def retarget_symlink(self, src: int, to: str) -> None:
        links = [p for p in self._all() if p.is_symlink()]
        if (p := self._pick(links, src)) is not None:
            p.unlink()
            p.symlink_to(to)

    @rule(d=st.integers(0, 50))
    def folder_swapped_for_a_symlink_or_back(self, d: int) -> None:
        """`mv f f.away; ln -s elsewhere f`, or its undoing (torture's symlink swap)."""
        links = [p for p in self._all() if p.is_symlink() and p.with_name(p.name + ".away").is_dir()]
        if (link := self._pick(links, d)) is not None:
            link.unlink()
            link.with_name(link.name + ".away").rename(link)
        elif (folder := self._pick(self._dirs()[1:], d)) is not None and not folder.name.endswith(".away"):
            away = folder.with_name(folder.name + ".away")
            if not away.exists() and not away.is_symlink():
                folder.rename(away)
                folder.symlink_to("nowhere")

    @rule(data=st.data())
    def scoped_scan(self, data: st.DataObject) -> None:
        """A daemon's round: a few scopes, some of them gone, as events name them. It need not
        bring the index equal to the disk (what it was not told of stays), but what it writes
        holds together: every row below a folder row, at that folder's path."""
        seen = [p.relative_to(self.root) for p in self._all()]
        names = sorted({os.fsencode(p) for p in seen} | {b"a/a0", b"dd", b"c/b"})
        picks = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True))
        recursive = data.draw(st.lists(st.booleans(), min_size=len(picks), max_size=len(picks)))
        root = os.fsencode(self.root)
        scopes = [ScanScope(root, p, r) for p, r in zip(picks, recursive, strict=True)]
        report = scan(self.index, RootConfig(path=self.root, exclude=EXCLUDE), scopes, SyncConfig(batch_size=3))
        assert report.clean, report
        misplaced = [
            (bytes(child), bytes(parent), kind)
            for child, parent, kind in self.index.db.execute(
                "SELECT c.path, p.path, p.kind FROM entries c JOIN entries p ON p.id = c.parent_id"
            )
            if kind != "dir" or not bytes(child).startswith(bytes(parent) + b"/")
        ]
        assert misplaced == []

    @rule(minutes=st.integers(1, 3))
    def settle(self, minutes: int) -> None:
        # Entries written in the tick of a scan stay racily clean, and a folder with one keeps
        # no listing digest; aged ones let later scans store digests and skip those folders.
        old = time.time_ns() - minutes * 60 * 1_000_000_000
        for p in [self.root, *self._all()]:
            os.utime(p, ns=(old, old), follow_symlinks=False)

    @rule()
    def scan(self) -> None:
        report = run_scan(self.index, self.root, exclude=EXCLUDE, batch_size=3)
        self.scans += 1
        assert report.clean, report
        want = expected(self.root, exclude_names=(b"x.tmp",))
        got = rows(self.index, self.root)
        assert diff(want, got) == []
        assert replay(self.index) == set(got)

    @invariant()
    def nothing_parked(self) -> None:
        # No row may be left under a parked (NUL-prefixed) name between scans.
        parked = self.index.db.execute("SELECT count(*) FROM entries WHERE substr(path, 1, 1) = x'00'").fetchone()
        assert parked[0] == 0


ScanMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("TW_EXAMPLES", "30")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_scan_matches_disk = ScanMachine.TestCase
