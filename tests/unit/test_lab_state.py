"""Per-instance state files and paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import state
from lab.cli import parse_size
from lab.paths import Cache, check_instance


def sample(run_dir: Path) -> state.RunState:
    return state.RunState(
        instance="a", pid=123, ssh_port=40022, forwards={"agent": 40001}, image="/img", run_dir=str(run_dir),
        pool_disk=str(run_dir / "pool.img"), pool_disk_reused=False, memory_mb=4096, started=1.0,
    )


def test_state_round_trips(tmp_path: Path) -> None:
    st = sample(tmp_path)
    state.save(tmp_path, st)
    assert state.load(tmp_path) == st
    assert st.overlay == tmp_path / "overlay.qcow2" and st.console_log == tmp_path / "console.log"
    state.clear(tmp_path)
    assert state.load(tmp_path) is None
    state.clear(tmp_path)


def test_corrupt_or_foreign_state_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / state.STATE_FILE).write_text("{not json")
    assert state.load(tmp_path) is None
    (tmp_path / state.STATE_FILE).write_text('{"pid": 1}')
    assert state.load(tmp_path) is None


def test_instances_get_separate_run_dirs(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    assert cache.run_dir("a") != cache.run_dir("b")
    assert cache.run_dir("a").parent == tmp_path / "runs"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", "x" * 40])
def test_bad_instance_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_instance(bad)


def test_cache_location_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZVOLT_LAB_CACHE", str(tmp_path / "c"))
    assert Cache.from_env().root == tmp_path / "c"
    monkeypatch.delenv("ZVOLT_LAB_CACHE")
    assert Cache.from_env().root == Path.home() / ".cache" / "zvolt-lab"


def test_sizes_parse() -> None:
    assert parse_size("16G") == 16 * 1024**3
    assert parse_size("512M") == 512 * 1024**2
    assert parse_size("1GiB") == 1024**3
    assert parse_size("4096") == 4096


def test_reboot_of_an_instance_that_is_not_running_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lab import cli

    monkeypatch.setenv("ZVOLT_LAB_CACHE", str(tmp_path))
    monkeypatch.setenv("ZVOLT_LAB_NAME", "nothere")
    assert cli.main(["reboot"]) == 1
    assert "lab instance 'nothere' is not running" in capsys.readouterr().err
