"""Configuration: one frozen object, loaded from TOML and validated. Defaults live here only."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/treewatch/config.toml")
DEFAULT_DATABASE = Path("/var/lib/treewatch/index.db")
OBSERVERS = ("auto", "inotify", "polling")
LOG_LEVELS = ("debug", "info", "warning", "error")
# What every root leaves out unless its `exclude` says otherwise: partial and lock files of
# editors and Syncthing, and what NAS systems and desktops put into shares that nobody wants in a
# library index (config.example.toml names each one's maker).
DEFAULT_EXCLUDE = (
    ".stversions",
    "*.tmp",
    ".~lock.*#",
    "@eaDir",
    "#recycle",
    "#snapshot",
    "@Recycle",
    ".@__thumb",
    ".snapshots",
    ".zfs",
    ".Trash-*",
    "lost+found",
)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key and the file."""


@dataclass(frozen=True, slots=True)
class RootConfig:
    path: Path
    observer: str = "auto"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # `exclude` (or the defaults) followed by `exclude_extra`
    # Like `find -xdev`, `rsync -x`: other mounted filesystems below the root are neither indexed
    # nor watched. The boundary is a mount (mountinfo), not a new st_dev: btrfs subvolumes stay in.
    one_filesystem: bool = False


@dataclass(frozen=True, slots=True)
class WatchConfig:
    debounce_s: float = 20.0
    max_delay_s: float = 300.0
    max_paths_per_dir: int = 128
    max_pending: int = 10000
    poll_interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class SyncConfig:
    full_interval_s: float = 86400.0
    startup: bool = True
    hash_workers: int = 2
    batch_size: int = 1000


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    textfile: Path | None = None  # node_exporter's textfile collector; None: not written
    interval_s: float = 60.0


@dataclass(frozen=True, slots=True)
class FeedConfig:
    """How long the change feed keeps what it said (docs/feed.md, "Retention")."""

    retention_s: float = 30 * 86400.0  # rows older than this are pruned; 0 keeps everything
    max_rows: int = 0  # at most this many rows, the oldest going first; 0: no cap


# A box's name in the catalogue: a host name's characters, so it reads well in a query and a log.
BOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def box_problem(name: str) -> str | None:
    """Why ``name`` cannot name a box in the catalogue, or None when it can."""
    if BOX_NAME.fullmatch(name) is None:
        return f"{name!r} is not a box name (1-63 letters, digits, '.', '_' or '-', starting with a letter or digit)"
    return None


@dataclass(frozen=True, slots=True)
class ReplicateConfig:
    """Where the daemon replicates its index: a PostgreSQL catalogue shared by several boxes (docs/fleet.md)."""

    url: str | None = None  # a libpq URL or conninfo string; None: the daemon replicates nothing
    box: str | None = None  # this box's name in the catalogue; None: the host name

    def box_name(self) -> str:
        if self.box is not None:
            return self.box
        import socket

        return socket.gethostname()


@dataclass(frozen=True, slots=True)
class Config:
    database: Path = DEFAULT_DATABASE
    roots: tuple[RootConfig, ...] = ()
    watch: WatchConfig = field(default_factory=WatchConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    feed: FeedConfig = field(default_factory=FeedConfig)
    replicate: ReplicateConfig = field(default_factory=ReplicateConfig)
    source: str = "(defaults)"  # where it was read from, for messages

    def with_overrides(self, database: Path | None, roots: Sequence[Path]) -> Config:
        """Apply `--db` and `--root` (which replaces the list, keeping the file's settings)."""
        cfg = self
        if database is not None:
            cfg = dataclasses.replace(cfg, database=database)
        if roots:
            new_roots = tuple(RootConfig(path=_root_path(str(p), "--root", "command line")) for p in roots)
            _check_nesting(new_roots, "command line")
            cfg = dataclasses.replace(cfg, roots=new_roots)
        return cfg


def _root_path(raw: str, key: str, source: str) -> Path:
    if not raw:
        raise ConfigError(f"{source}: {key}: a root path is empty")
    if not os.path.isabs(raw):
        raise ConfigError(f"{source}: {key}: root {raw!r} is not an absolute path")
    # normpath, not resolve(): the root may be a symlink or an unmounted mount point, and
    # what the admin wrote is what the index records.
    return Path(os.path.normpath(raw))


def _check_nesting(roots: Sequence[RootConfig], source: str) -> None:
    for i, a in enumerate(roots):
        for b in roots[i + 1 :]:
            if a.path == b.path:
                raise ConfigError(f"{source}: roots: {a.path} is listed twice")
            if a.path in b.path.parents or b.path in a.path.parents:
                inner, outer = (a, b) if b.path in a.path.parents else (b, a)
                raise ConfigError(f"{source}: roots: {inner.path} is inside another root, {outer.path}")


def _typed(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int in Python; a duration or count of `true` is a mistake, not a 1.
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}.{key}: expected {name}, got {type(value).__name__} {value!r}")
    return value


def _no_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(allowed))})")


def _globs(table: Mapping[str, Any], key: str, where: str, default: list[str]) -> list[str]:
    value = _typed(table, key, list, where, default)
    if not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{where}.{key}: expected a list of non-empty glob strings")
    return list(value)


def _section(doc: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    section = doc.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    return section


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be {'zero or more' if allow_zero else 'more than zero'}, got {value}")


def parse(doc: Mapping[str, Any], source: str) -> Config:
    """Build a Config from a parsed TOML document; every problem names its key and file."""
    _no_unknown(doc, {"database", "roots", "watch", "sync", "log", "metrics", "feed", "replicate"}, source)
    database = Path(_typed(doc, "database", str, source, str(DEFAULT_DATABASE)))
    if not database.is_absolute():
        raise ConfigError(f"{source}: database: {str(database)!r} is not an absolute path")

    raw_roots = doc.get("roots", [])
    if not isinstance(raw_roots, list):
        raise ConfigError(f"{source}: roots: use [[roots]] tables, one per root")
    roots: list[RootConfig] = []
    defaults = RootConfig(path=Path("/"))
    for i, raw in enumerate(raw_roots):
        where = f"{source}: roots[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table with a path")
        _no_unknown(raw, {"path", "observer", "exclude", "exclude_extra", "one_filesystem"}, where)
        if "path" not in raw:
            raise ConfigError(f"{where}: path is missing")
        path = _root_path(_typed(raw, "path", str, where, ""), f"roots[{i}].path", source)
        observer = _typed(raw, "observer", str, where, defaults.observer)
        if observer not in OBSERVERS:
            raise ConfigError(f"{where}.observer: {observer!r} is not one of {', '.join(OBSERVERS)}")
        exclude = _globs(raw, "exclude", where, list(defaults.exclude))
        # `exclude` replaces the defaults; `exclude_extra` adds to whichever list that leaves, so
        # a root can leave one more folder out and keep every default.
        extra = _globs(raw, "exclude_extra", where, [])
        one_filesystem = _typed(raw, "one_filesystem", bool, where, defaults.one_filesystem)
        patterns = tuple(dict.fromkeys([*exclude, *extra]))  # in order, each once
        roots.append(RootConfig(path=path, observer=observer, exclude=patterns, one_filesystem=one_filesystem))
    _check_nesting(roots, source)

    w = _section(doc, "watch", source)
    wd = WatchConfig()
    where = f"{source}: watch"
    _no_unknown(w, {f.name for f in dataclasses.fields(WatchConfig)}, where)
    watch = WatchConfig(
        debounce_s=_typed(w, "debounce_s", float, where, wd.debounce_s),
        max_delay_s=_typed(w, "max_delay_s", float, where, wd.max_delay_s),
        max_paths_per_dir=_typed(w, "max_paths_per_dir", int, where, wd.max_paths_per_dir),
        max_pending=_typed(w, "max_pending", int, where, wd.max_pending),
        poll_interval_s=_typed(w, "poll_interval_s", float, where, wd.poll_interval_s),
    )
    for f in dataclasses.fields(WatchConfig):
        _positive(getattr(watch, f.name), f"{where}.{f.name}", allow_zero=f.name == "debounce_s")
    if watch.max_delay_s < watch.debounce_s:
        raise ConfigError(f"{where}.max_delay_s: {watch.max_delay_s} is shorter than debounce_s {watch.debounce_s}")

    s = _section(doc, "sync", source)
    sd = SyncConfig()
    where = f"{source}: sync"
    _no_unknown(s, {f.name for f in dataclasses.fields(SyncConfig)}, where)
    sync = SyncConfig(
        full_interval_s=_typed(s, "full_interval_s", float, where, sd.full_interval_s),
        startup=_typed(s, "startup", bool, where, sd.startup),
        hash_workers=_typed(s, "hash_workers", int, where, sd.hash_workers),
        batch_size=_typed(s, "batch_size", int, where, sd.batch_size),
    )
    _positive(sync.full_interval_s, f"{where}.full_interval_s", allow_zero=True)
    _positive(sync.hash_workers, f"{where}.hash_workers")
    _positive(sync.batch_size, f"{where}.batch_size")

    lg = _section(doc, "log", source)
    where = f"{source}: log"
    _no_unknown(lg, {"level"}, where)
    level = _typed(lg, "level", str, where, LogConfig().level)
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where}.level: {level!r} is not one of {', '.join(LOG_LEVELS)}")

    metrics = _metrics(_section(doc, "metrics", source), f"{source}: metrics")
    feed = _feed(_section(doc, "feed", source), f"{source}: feed")
    replicate = _replicate(doc, source)
    return Config(
        database=database,
        roots=tuple(roots),
        watch=watch,
        sync=sync,
        log=LogConfig(level),
        metrics=metrics,
        feed=feed,
        replicate=replicate,
        source=source,
    )


def _metrics(table: Mapping[str, Any], where: str) -> MetricsConfig:
    _no_unknown(table, {f.name for f in dataclasses.fields(MetricsConfig)}, where)
    raw = _typed(table, "textfile", str, where, None)
    if raw is not None and not os.path.isabs(raw):
        raise ConfigError(f"{where}.textfile: {raw!r} is not an absolute path")
    interval_s = _typed(table, "interval_s", float, where, MetricsConfig().interval_s)
    _positive(interval_s, f"{where}.interval_s")
    return MetricsConfig(textfile=Path(raw) if raw is not None else None, interval_s=interval_s)


def _feed(table: Mapping[str, Any], where: str) -> FeedConfig:
    _no_unknown(table, {f.name for f in dataclasses.fields(FeedConfig)}, where)
    default = FeedConfig()
    feed = FeedConfig(
        retention_s=_typed(table, "retention_s", float, where, default.retention_s),
        max_rows=_typed(table, "max_rows", int, where, default.max_rows),
    )
    _positive(feed.retention_s, f"{where}.retention_s", allow_zero=True)
    _positive(feed.max_rows, f"{where}.max_rows", allow_zero=True)
    return feed


def _replicate(doc: Mapping[str, Any], source: str) -> ReplicateConfig:
    if "replicate" not in doc:
        return ReplicateConfig()
    table = _section(doc, "replicate", source)
    where = f"{source}: replicate"
    _no_unknown(table, {f.name for f in dataclasses.fields(ReplicateConfig)}, where)
    if "url" not in table:
        raise ConfigError(f'{where}: url is missing (the catalogue, e.g. "postgresql://treewatch@nas/fleet")')
    url = _typed(table, "url", str, where, None)
    if not url.strip():
        raise ConfigError(f"{where}.url: is empty")
    box = _typed(table, "box", str, where, None)
    if box is not None and (problem := box_problem(box)) is not None:
        raise ConfigError(f"{where}.box: {problem}")
    return ReplicateConfig(url=url, box=box)


def load(path: Path) -> Config:
    import tomllib  # here: a command run without a configuration file does not need it

    source = str(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{source}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return parse(doc, source)


def locate(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """`--config`, then `$TREEWATCH_CONFIG`, then /etc/treewatch/config.toml if it exists."""
    if explicit is not None:
        return explicit
    if environ.get("TREEWATCH_CONFIG"):
        return Path(environ["TREEWATCH_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
