"""What is left out of a root: the `exclude` globs, matched on names and root-relative paths.

Pure (no I/O): the walk and the watcher both ask it, and neither pulls in the other.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence

from daemon.model import name_of


class Excluder:
    """`exclude` globs, matched against an entry's name and its root-relative path."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self.regexes = [re.compile(os.fsencode(fnmatch.translate(p))) for p in patterns]
        # All patterns as one alternation: two matches per entry instead of two per pattern.
        self.combined = re.compile(b"|".join(b"(?:" + r.pattern + b")" for r in self.regexes)) if patterns else None

    def __call__(self, rel: bytes) -> bool:
        if self.combined is None:  # asked of every entry a walk sees
            return False
        return self.combined.match(name_of(rel)) is not None or self.combined.match(rel) is not None

    def any_component(self, rel: bytes) -> bool:
        parts = rel.split(b"/")
        return any(self(b"/".join(parts[: i + 1])) for i in range(len(parts)))
