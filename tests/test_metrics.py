"""`status --prometheus` and the textfile, read back with prometheus_client's own parser; [metrics] config."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import Config, ConfigError, MetricsConfig, parse
from daemon.index import Index
from daemon.metrics import write_textfile
from tests.oracle import cli

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parsed(text: str) -> tuple[dict[str, str], Samples]:
    """({family name: type}, {(sample name, sorted labels): value}) from the real parser."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


@pytest.fixture
def odd_library(tmp_path: Path) -> Path:
    """A root whose name needs escaping in a label: quote, backslash, and a byte that is not UTF-8."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b'/lib "q" \\ \xff'))
    root.mkdir()
    return root


def test_status_prometheus_parses_with_every_metric(odd_library: Path, db: Path) -> None:
    (odd_library / "a").mkdir()
    (odd_library / "a" / "one.bin").write_bytes(b"1" * 1000)
    (odd_library / "two.bin").write_bytes(b"2" * 24)
    assert cli(db, "scan", "--root", str(odd_library)).returncode == 0
    text = cli(db, "status", "--prometheus").stdout
    types, samples = parsed(text)
    root = (("root", os.fsencode(odd_library).decode("utf-8", "backslashreplace")),)
    assert samples[("treewatch_root_files", root)] == 2
    assert samples[("treewatch_root_dirs", root)] == 1
    assert samples[("treewatch_root_size_bytes", root)] == 1024
    assert samples[("treewatch_root_pending_events", root)] == 0
    assert samples[("treewatch_root_overflows_total", root)] == 0
    assert samples[("treewatch_root_errors", root)] == 0
    assert samples[("treewatch_root_corrupt_files", root)] == 0
    states = {s: samples[("treewatch_root_state", (*root, ("state", s)))] for s in ("online", "offline", "scanning")}
    assert states == {"online": 1, "offline": 0, "scanning": 0}
    assert samples[("treewatch_root_last_full_sync_timestamp_seconds", root)] > 1.6e9
    assert samples[("treewatch_files_hashed_total", ())] == 2
    assert samples[("treewatch_hashed_bytes_total", ())] == 1024
    assert samples[("treewatch_scans_total", (("kind", "full"),))] == 1
    assert samples[("treewatch_scans_total", (("kind", "file"),))] == 0
    assert samples[("treewatch_events_total", ())] == 0
    assert samples[("treewatch_up", ())] == 0
    # Counters are typed as counters (the parser names their family without `_total`).
    for name in ("treewatch_files_hashed", "treewatch_hashed_bytes", "treewatch_scans", "treewatch_events",
                 "treewatch_root_overflows"):  # fmt: skip
        assert types[name] == "counter", name
    assert types["treewatch_root_size_bytes"] == "gauge"
    assert all(line.startswith(("# HELP treewatch_", "# TYPE treewatch_", "treewatch_")) for line in text.splitlines())


def test_write_textfile_is_atomic_and_world_readable(library: Path, db: Path, tmp_path: Path) -> None:
    (library / "f").write_bytes(b"x")
    assert cli(db, "scan", "--root", str(library)).returncode == 0
    folder = tmp_path / "textfile_collector"
    folder.mkdir()
    target = folder / "treewatch.prom"
    target.write_text("stale\n")
    old_umask = os.umask(0o077)
    try:
        with closing(Index(db)) as index:
            write_textfile(index, Config(), target)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in folder.iterdir()] == ["treewatch.prom"]  # no temporary file left behind
    _, samples = parsed(target.read_text())
    assert samples[("treewatch_root_files", (("root", str(library)),))] == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"textfile": "relative.prom"}, "metrics.textfile: 'relative.prom' is not an absolute path"),
        ({"interval_s": 0}, "metrics.interval_s: must be more than zero"),
        ({"interval_s": "60"}, "metrics.interval_s: expected float"),
        ({"textfiles": "/x"}, "metrics: unknown key 'textfiles'"),
    ],
    ids=["relative textfile", "zero interval", "string interval", "unknown key"],
)
def test_metrics_config_is_validated(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse({"metrics": table}, "t.toml")


def test_metrics_config_defaults_and_values(tmp_path: Path) -> None:
    assert parse({}, "t.toml").metrics == MetricsConfig(textfile=None, interval_s=60.0)
    cfg = parse({"metrics": {"textfile": "/var/lib/node_exporter/t.prom", "interval_s": 15}}, "t.toml")
    assert cfg.metrics == MetricsConfig(textfile=Path("/var/lib/node_exporter/t.prom"), interval_s=15.0)
    bad = tmp_path / "bad.toml"
    bad.write_text('[metrics]\ntextfile = "t.prom"\n')
    result = subprocess.run([sys.executable, "-m", "daemon", "--config", str(bad), "check-config"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 78 and "metrics.textfile" in result.stderr


def test_example_config_documents_the_metrics_section() -> None:
    example = Path(__file__).resolve().parent.parent / "config.example.toml"
    import tomllib

    doc = tomllib.loads(example.read_text())
    assert set(doc["metrics"]) <= {"textfile", "interval_s"}
    assert parse({"metrics": doc["metrics"]}, str(example)).metrics.interval_s > 0
