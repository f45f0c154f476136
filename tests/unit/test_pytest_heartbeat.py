"""The heartbeat plugin reaches the terminal while pytest captures a long test's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab.paths import source_root

TESTS = """
import time
def test_slow():
    print("captured by pytest")
    time.sleep(1.6)
def test_fast():
    pass
"""


def run(tmp_path: Path, interval: str, *plugin: str) -> str:
    (tmp_path / "test_sample.py").write_text(TESTS)
    env = {**os.environ, "ZVOLT_TEST_HEARTBEAT": interval, "PYTHONPATH": str(source_root())}
    proc = subprocess.run([sys.executable, "-m", "pytest", *plugin, "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_long_test_gets_lines_naming_it_and_a_short_one_none(tmp_path: Path) -> None:
    out = run(tmp_path, "0.5", "-p", "lab.pytest_heartbeat")
    beats = [ln for ln in out.splitlines() if "still running" in ln]
    assert beats and all("test_sample.py::test_slow (" in ln for ln in beats), out
    assert "captured by pytest" not in out  # capturing itself is untouched


@pytest.mark.parametrize(("interval", "plugin"), [("0", ("-p", "lab.pytest_heartbeat")), ("0.5", ())])
def test_silent_when_off_or_not_loaded(tmp_path: Path, interval: str, plugin: tuple[str, ...]) -> None:
    assert "still running" not in run(tmp_path, interval, *plugin)
