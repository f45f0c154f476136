"""Build steps report which step failed, with its log tail, and never leave children behind."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import pytest

from lab.steps import StepFailed, Steps, slug


def test_step_line_and_log(tmp_path: Path) -> None:
    out = io.StringIO()
    steps = Steps(tmp_path, out=out)
    with steps.step("base packages"):
        steps.run([sys.executable, "-c", "print('hello from step')"])
    assert "base packages ... ok (" in out.getvalue()
    assert "hello from step" in (tmp_path / "base-packages.log").read_text()


def test_failed_command_names_the_step_and_shows_the_tail(tmp_path: Path) -> None:
    steps = Steps(tmp_path, out=io.StringIO())
    with pytest.raises(StepFailed) as err, steps.step("debootstrap"):
        steps.run([sys.executable, "-c", "import sys; print('E: mirror unreachable'); sys.exit(3)"])
    assert err.value.step == "debootstrap"
    assert "exited 3" in str(err.value) and "E: mirror unreachable" in str(err.value)


def test_exception_inside_a_step_becomes_step_failed(tmp_path: Path) -> None:
    steps = Steps(tmp_path, out=io.StringIO())
    with pytest.raises(StepFailed, match="'image' failed: no kernel"), steps.step("image"):
        raise RuntimeError("no kernel")


def test_timeout_kills_the_whole_process_tree(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    steps = Steps(tmp_path, out=io.StringIO())
    with pytest.raises(StepFailed, match="timed out"), steps.step("dkms"):
        steps.run([sys.executable, "-c", code], timeout=2)
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("grandchild survived the step timeout")


def test_slug() -> None:
    assert slug("kernel + zfs + nvme (backports)") == "kernel-zfs-nvme-backports"


def test_a_long_command_is_never_silent_longer_than_the_heartbeat(tmp_path: Path) -> None:
    out = io.StringIO()
    steps = Steps(tmp_path, out=out, heartbeat=0.3)
    code = "import sys, time\nfor i in range(4):\n    print(f'CC module {i}', flush=True); time.sleep(0.3)\n"
    with steps.step("dkms build"):
        steps.run([sys.executable, "-c", code])
    lines = out.getvalue().splitlines()
    beats = [ln for ln in lines if "dkms build: still running" in ln]
    assert len(beats) >= 2, lines
    assert "log: CC module" in beats[0]
    assert lines[0].endswith("dkms build ... ") and lines[-1].split("] ")[1].startswith("dkms build ok ("), lines


def test_a_short_step_keeps_its_one_line(tmp_path: Path) -> None:
    out = io.StringIO()
    steps = Steps(tmp_path, out=out, heartbeat=5)
    with steps.step("mkfs"):
        steps.run([sys.executable, "-c", "pass"])
    assert len(out.getvalue().splitlines()) == 1 and "mkfs ... ok (" in out.getvalue()
