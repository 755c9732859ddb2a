"""Prometheus metrics: `status --prometheus`, and the textfile the daemon writes for node_exporter.

The text exposition format, version 0.0.4. Names follow Prometheus' conventions: a
``treewatch_`` prefix, base units in the name (``_bytes``, ``_seconds``), ``_total`` on
counters, one metric per meaning with labels (``root``, ``state``, ``kind``) for the rest.
Counters come from the index's persistent counters, so they survive restarts as a counter
should not need to (Prometheus copes with resets either way).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from daemon import queries, rebuild
from daemon.config import Config
from daemon.index import Index
from daemon.model import RootState, ScanKind

Sample = tuple[dict[str, str], float]


def escape(value: str) -> str:
    """A label value: backslash, double quote and newline escaped, as the format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def root_label(path: bytes) -> str:
    # The format is UTF-8; a path that is not shows its bad bytes as \xNN.
    return path.decode("utf-8", "backslashreplace")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return "\n".join(lines) + "\n"


def render(index: Index, config: Config) -> str:
    """Every metric, from the index (and the daemon's row in it)."""
    data = queries.status(index, config)
    rows = {root_label(r.path): r for r in index.roots()}
    per_root = [(root_label(os.fsencode(r["path"])), r) for r in data["roots"]]

    def by_root(field: str) -> list[Sample]:
        return [({"root": name}, r[field]) for name, r in per_root]

    counters = index.counters()
    c = data["counters"]
    out = [
        family("treewatch_up", "gauge", "1 when a treewatch daemon is running on this index.",
               [({}, 1 if data["daemon"] else 0)]),
        family("treewatch_root_state", "gauge", "1 for the root's current state (online, offline, scanning), else 0.",
               [({"root": name, "state": s.value}, 1 if r["state"] == s.value else 0)
                for name, r in per_root for s in RootState]),
        family("treewatch_volume_online", "gauge",
               "1 while a filesystem mounted below the root is online, 0 while it is offline (kept as indexed).",
               [({"root": name, "path": v["path"], "fs_type": v["fs_type"]}, 1 if v["state"] == "online" else 0)
                for name, r in per_root for v in r["volumes"]]),
        family("treewatch_root_files", "gauge", "Regular files indexed under the root.", by_root("files")),
        family("treewatch_root_dirs", "gauge", "Folders indexed under the root.", by_root("dirs")),
        family("treewatch_root_size_bytes", "gauge", "Total size of the files indexed under the root.",
               by_root("bytes")),
        family("treewatch_root_pending_events", "gauge", "Paths with filesystem events waiting to be scanned.",
               by_root("pending")),
        family("treewatch_root_last_full_sync_timestamp_seconds", "gauge",
               "Unix time the last full sync of the root finished (0: never).",
               [({"root": name}, rows[name].last_full_sync or 0) for name, _ in per_root]),
        family("treewatch_root_overflows_total", "counter",
               "Event queue overflows and watch-limit failures (each forces a full sync).", by_root("overflows")),
        family("treewatch_root_errors", "gauge", "Entries under the root that could not be indexed.",
               [({"root": name}, index.error_count(rows[name].id)) for name, _ in per_root]),
        family("treewatch_root_corrupt_files", "gauge",
               "Files `verify` found changed under an unchanged size and mtime, not yet accepted.",
               by_root("corrupt")),
        family("treewatch_events_total", "counter", "Filesystem events received.", [({}, c["events"])]),
        family("treewatch_escalations_total", "counter", "Pending paths escalated to a folder or root scan.",
               [({}, c["escalations"])]),
        family("treewatch_scans_total", "counter", "Scans finished, by kind.",
               [({"kind": k.value}, c["scans"][k.value]) for k in ScanKind]),
        family("treewatch_files_hashed_total", "counter", "Files hashed by scans and rebuilds.",
               [({}, c["files_hashed"])]),
        family("treewatch_hashed_bytes_total", "counter", "Bytes hashed by scans and rebuilds.",
               [({}, c["bytes_hashed"])]),
        family("treewatch_verified_files_total", "counter", "Files re-hashed by `verify`.",
               [({}, counters.get("verified_files", 0))]),
        family("treewatch_verified_bytes_total", "counter", "Bytes re-hashed by `verify`.",
               [({}, counters.get("verified_bytes", 0))]),
        family("treewatch_rebuild_pending_files", "gauge", "Files whose derivation predates this version.",
               [({}, rebuild.needs_rebuild(index))]),
        family("treewatch_change_sequence", "gauge", "The change feed's last sequence number.", [({}, data["seq"])]),
    ]  # fmt: skip
    r = data["replicate"]
    if r is not None:  # [replicate]: how far behind the fleet catalogue is, and whether it answers
        labels = {"box": r["box"]}
        out += [
            family("treewatch_replicate_lag", "gauge", "Feed rows the fleet catalogue has not taken yet.",
                   [(labels, r["lag"])]),
            family("treewatch_replicate_up", "gauge", "1 when the last attempt to reach the fleet catalogue succeeded.",
                   [(labels, 0 if r["error"] else 1)]),
        ]  # fmt: skip
    return "".join(out)


def write_textfile(index: Index, config: Config, path: Path) -> None:
    """Write `render`'s text to ``path`` atomically (node_exporter never reads half a file).

    A temporary file in the same folder, fsync'd, mode 0644 (node_exporter runs as another
    user), then ``os.replace``; the temporary name ends in ``.tmp`` and starts with a dot,
    which the textfile collector ignores.
    """
    import tempfile  # the daemon's: `status --prometheus` does not need it

    text = render(index, config)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
