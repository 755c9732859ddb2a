"""Configuration validation: every mistake names its key and file; the CLI exits 78 with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import DEFAULT_EXCLUDE, ConfigError, load
from tests.oracle import cli

BAD = [
    ("unknown top-level key", 'databse = "/x.db"\n', ["databse"]),
    ("unknown key in a root", '[[roots]]\npath = "/srv/a"\nobserve = "auto"\n', ["observe", "roots[0]"]),
    ("unknown key in [watch]", "[watch]\ndebounce = 1.0\n", ["debounce", "watch"]),
    ("unknown key in [sync]", "[sync]\nworkers = 2\n", ["workers", "sync"]),
    ("wrong type: string for a number", '[watch]\ndebounce_s = "20"\n', ["debounce_s"]),
    ("wrong type: float for an int", "[sync]\nbatch_size = 1.5\n", ["batch_size"]),
    ("wrong type: number for a bool", "[sync]\nstartup = 1\n", ["startup"]),
    ("bool as number", "[watch]\ndebounce_s = true\n", ["debounce_s"]),
    ("bool as count", "[sync]\nhash_workers = false\n", ["hash_workers"]),
    ("relative root", '[[roots]]\npath = "photos"\n', ["roots[0].path", "photos"]),
    ("empty root", '[[roots]]\npath = ""\n', ["roots[0].path"]),
    ("root without path", '[[roots]]\nobserver = "auto"\n', ["roots[0]", "path"]),
    ("nested roots", '[[roots]]\npath = "/srv/a"\n[[roots]]\npath = "/srv/a/b"\n', ["roots", "/srv/a/b", "/srv/a"]),
    ("duplicate root", '[[roots]]\npath = "/srv/a"\n[[roots]]\npath = "/srv/a/"\n', ["roots", "/srv/a", "twice"]),
    ("bad observer", '[[roots]]\npath = "/srv/a"\nobserver = "fanotify"\n', ["observer", "fanotify"]),
    ("bad exclude", '[[roots]]\npath = "/srv/a"\nexclude = [""]\n', ["exclude"]),
    ("bad exclude_extra", '[[roots]]\npath = "/srv/a"\nexclude_extra = "@eaDir"\n', ["exclude_extra"]),
    ("one_filesystem not a bool", '[[roots]]\npath = "/srv/a"\none_filesystem = 1\n', ["one_filesystem"]),
    ("bad level", '[log]\nlevel = "verbose"\n', ["level", "verbose"]),
    ("max_delay < debounce", "[watch]\ndebounce_s = 30\nmax_delay_s = 10\n", ["max_delay_s", "debounce_s"]),
    ("zero batch", "[sync]\nbatch_size = 0\n", ["batch_size"]),
    ("negative interval", "[sync]\nfull_interval_s = -1\n", ["full_interval_s"]),
    ("relative database", 'database = "index.db"\n', ["database"]),
    ("section not a table", "watch = 3\n", ["watch"]),
    ("roots not tables", 'roots = ["/srv/a"]\n', ["roots"]),
    ("not TOML", "[watch\n", ["TOML"]),
    ("replicate without url", '[replicate]\nbox = "nas"\n', ["replicate", "url"]),
    ("replicate url empty", '[replicate]\nurl = " "\n', ["replicate.url", "empty"]),
    ("replicate url not a string", "[replicate]\nurl = 5432\n", ["replicate.url"]),
    ("replicate bad box", '[replicate]\nurl = "postgresql://nas/fleet"\nbox = "my box"\n', ["replicate.box"]),
    ("replicate unknown key", '[replicate]\nurl = "postgresql://nas/fleet"\npassword = "x"\n', ["password"]),
]


@pytest.mark.parametrize(("name", "text", "words"), BAD, ids=[b[0] for b in BAD])
def test_validation_error_names_key_and_file(tmp_path: Path, name: str, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(("name", "text", "words"), BAD[::4], ids=[b[0] for b in BAD[::4]])
def test_cli_exits_78_with_one_line(tmp_path: Path, name: str, text: str, words: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in ("check-config", "scan", "status"):
        result = cli(tmp_path / "i.db", "--config", str(path), command, check=False)
        assert result.returncode == 78, (command, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert str(path) in lines[0] and words[0] in lines[0]
    assert not (tmp_path / "i.db").exists()


def test_missing_config_file_is_78(tmp_path: Path) -> None:
    result = cli(tmp_path / "i.db", "--config", str(tmp_path / "nope.toml"), "check-config", check=False)
    assert result.returncode == 78
    assert result.stderr.strip() == f"treewatch: {tmp_path / 'nope.toml'}: no such file"


def test_config_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text("[sync]\nbatch_size = yes\n")
    env = {**os.environ, "TREEWATCH_CONFIG": str(path)}
    result = cli(tmp_path / "i.db", "check-config", check=False, env=env)
    assert result.returncode == 78 and str(path) in result.stderr


def test_check_config_ok(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    path = tmp_path / "good.toml"
    path.write_text(
        f'database = "{tmp_path / "x.db"}"\n[[roots]]\npath = "{tmp_path / "a"}"\nobserver = "polling"\n'
        'exclude = ["*.tmp"]\n[watch]\ndebounce_s = 0.2\nmax_delay_s = 1\n[sync]\nbatch_size = 5\n'
        'startup = false\n[log]\nlevel = "debug"\n'
    )
    cfg = load(path)
    assert cfg.watch.debounce_s == 0.2 and cfg.watch.max_delay_s == 1.0 and cfg.sync.batch_size == 5
    assert cfg.roots[0].exclude == ("*.tmp",) and cfg.roots[0].observer == "polling"
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(path), "check-config"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and str(tmp_path / "a") in result.stdout
    assert not (tmp_path / "x.db").exists()  # checking the configuration writes nothing


EXCLUDES = [
    ("no key: the defaults", "", DEFAULT_EXCLUDE),
    ("exclude replaces the defaults", 'exclude = ["*.part"]', ("*.part",)),
    ("exclude_extra adds to the defaults", 'exclude_extra = ["Cache"]', (*DEFAULT_EXCLUDE, "Cache")),
    ("exclude_extra adds to exclude", 'exclude = ["*.part"]\nexclude_extra = ["Cache"]', ("*.part", "Cache")),
    ("a pattern given twice counts once", 'exclude_extra = ["@eaDir"]', DEFAULT_EXCLUDE),
    ("an empty exclude leaves nothing out", "exclude = []", ()),
]


@pytest.mark.parametrize(("name", "keys", "want"), EXCLUDES, ids=[e[0] for e in EXCLUDES])
def test_exclude_and_exclude_extra(tmp_path: Path, name: str, keys: str, want: tuple[str, ...]) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[[roots]]\npath = "/srv/a"\n{keys}\n')
    assert load(path).roots[0].exclude == want


def test_default_excludes_cover_the_nas_junk_folders() -> None:
    for name in ("@eaDir", "#recycle", "#snapshot", "@Recycle", ".@__thumb", ".snapshots", ".zfs", "lost+found"):
        assert name in DEFAULT_EXCLUDE
    assert ".Trash-*" in DEFAULT_EXCLUDE and {".stversions", "*.tmp", ".~lock.*#"} <= set(DEFAULT_EXCLUDE)


def test_one_filesystem_defaults_to_false(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[roots]]\npath = "/srv/a"\n[[roots]]\npath = "/srv/b"\none_filesystem = true\n')
    assert [r.one_filesystem for r in load(path).roots] == [False, True]


def test_replicate_section_is_read_and_the_box_defaults_to_the_host_name(tmp_path: Path) -> None:
    import socket

    from daemon.config import parse

    config = parse({"replicate": {"url": "host=/run/postgresql dbname=fleet"}}, "t.toml")
    assert config.replicate.url == "host=/run/postgresql dbname=fleet"
    assert config.replicate.box is None and config.replicate.box_name() == socket.gethostname()
    named = parse({"replicate": {"url": "postgresql://nas/fleet", "box": "photos-1"}}, "t.toml")
    assert named.replicate.box_name() == "photos-1"
    assert parse({}, "t.toml").replicate.url is None


def test_example_config_is_valid() -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    if not example.exists():
        pytest.skip("config.example.toml is not written yet")
    load(example)


def test_root_on_command_line_missing_and_never_indexed_is_78(tmp_path: Path, db: Path) -> None:
    missing = tmp_path / "typo"
    result = cli(db, "scan", "--root", str(missing), check=False)
    assert result.returncode == 78, result.stderr
    assert len(result.stderr.splitlines()) == 1 and str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_relative_root_on_command_line_is_78(tmp_path: Path, db: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--db", str(db), "scan", "--root", "relative/dir"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert result.returncode == 78, result.stderr
    assert "relative/dir" in result.stderr and "--root" in result.stderr


def test_nested_roots_on_command_line_are_78(library: Path, db: Path) -> None:
    (library / "sub").mkdir()
    result = cli(db, "scan", "--root", str(library), "--root", str(library / "sub"), check=False)
    assert result.returncode == 78 and "inside another root" in result.stderr


def test_scan_path_outside_every_root_is_usage_error(library: Path, db: Path, tmp_path: Path) -> None:
    result = cli(db, "scan", "--root", str(library), "/not/in/root", check=False)
    assert result.returncode == 2, result.stderr
    assert "/not/in/root" in result.stderr and "not inside any root" in result.stderr
    # A sibling that shares the root's name as a prefix is not inside it either.
    result = cli(db, "scan", "--root", str(library), str(tmp_path / "library2"), check=False)
    assert result.returncode == 2


def test_unknown_command_is_usage_error(db: Path) -> None:
    result = cli(db, "frobnicate", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
