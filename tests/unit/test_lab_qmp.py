"""Telling a hung boot from a slow one: qemu's own state over QMP, free space, and one second boot."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from lab import control, qemu, qmp
from lab import state as statefile
from lab.guest import GuestCommandError
from lab.paths import Cache
from lab.state import RunState


def _qemu_with_qmp(sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("qemu-system-x86_64 is not installed (the lab's host packages bring it)")
    proc = subprocess.Popen(
        [binary, "-machine", "none", "-nodefaults", "-display", "none", *qmp.socket_argv(sock), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


@pytest.fixture
def short_dir() -> Any:
    # A unix socket path must fit in 108 bytes; pytest's tmp_path may not.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qmp", dir="/tmp") as d:
        yield Path(d)


@pytest.mark.parametrize(("extra", "want"), [(("-S",), "prelaunch"), ((), "running")])
def test_status_reads_a_real_qemus_run_state(short_dir: Path, extra: tuple[str, ...], want: str) -> None:
    sock = short_dir / "qmp.sock"
    proc = _qemu_with_qmp(sock, *extra)
    try:
        assert qmp.status(sock) == want
    finally:
        proc.kill()
        proc.wait(timeout=20)


def test_status_is_none_when_qemu_cannot_be_asked(tmp_path: Path) -> None:
    assert qmp.status(tmp_path / "absent.sock") is None
    long = Path("/tmp") / ("x" * 120) / "qmp.sock"
    assert qmp.socket_argv(long) == [] and qmp.status(long) is None


def _state(run_dir: Path) -> RunState:
    return RunState(instance="t", pid=1, ssh_port=1, forwards={}, image="", run_dir=str(run_dir),
                    pool_disk=str(run_dir / "pool.img"), pool_disk_reused=False, memory_mb=1, started=0.0)


class _SilentLab:
    def run(self, argv: list[str], **_: Any) -> None:
        raise GuestCommandError(argv, None, "ssh to the guest failed: Connection timed out during banner exchange")


def test_a_guest_paused_on_a_disk_error_fails_at_once_and_says_why(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "console.log").write_text("[    3.1] EXT4-fs (vda): mounted\n")
    monkeypatch.setattr(qemu, "alive", lambda pid, marker: True)
    monkeypatch.setattr(qmp, "status", lambda path, timeout=3.0: "io-error")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    start = time.monotonic()
    with pytest.raises(control.LabError) as err:
        control._wait_ssh(_SilentLab(), _state(tmp_path), 60.0, 0.0, io.StringIO())  # type: ignore[arg-type]
    assert not isinstance(err.value, control.BootTimeout)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert "disk write" in msg and "qemu status io-error" in msg and "MiB free" in msg and "EXT4-fs" in msg


def test_a_guest_that_never_answers_times_out_with_its_diagnosis(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(qemu, "alive", lambda pid, marker: True)
    monkeypatch.setattr(qmp, "status", lambda path, timeout=3.0: "running")
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with pytest.raises(control.BootTimeout, match=r"within 0s; qemu status running; \d+ MiB free.*\(no console log\)"):
        control._wait_ssh(_SilentLab(), _state(tmp_path), 0.0, 0.0, io.StringIO())  # type: ignore[arg-type]


def test_boot_refuses_without_room_for_the_guests_disks(tmp_path: Path, monkeypatch: Any) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (200 << 20), 200 << 20))
    with pytest.raises(control.LabError, match=r"only 200 MiB free .* needs 3 GiB"):
        control._check_free_space(tmp_path)


def test_a_boot_that_hangs_once_is_booted_again_but_not_twice(tmp_path: Path, monkeypatch: Any) -> None:
    boots: list[int] = []
    stops: list[int] = []

    def boot(*args: Any) -> RunState:
        boots.append(len(boots))
        st = _state(tmp_path)
        st.pid = 100 + len(boots)
        return st

    hangs = {"n": 1}

    def wait(lab: Any, st: RunState, *args: Any) -> None:
        if st.pid - 100 <= hangs["n"]:
            raise control.BootTimeout(f"guest {st.pid} did not answer ssh")

    monkeypatch.delenv("ZVOLT_LAB_KEEP", raising=False)
    monkeypatch.setattr(control, "running_state", lambda cache, instance: None)
    monkeypatch.setattr(control, "current_image", lambda cache: object())
    monkeypatch.setattr(control, "_boot", boot)
    monkeypatch.setattr(control, "_wait_ssh", wait)
    def stop(cache: Any, run_dir: Any, st: RunState, out: Any, timeout: float) -> bool:
        stops.append(st.pid)
        return True

    monkeypatch.setattr(control, "_stop", stop)
    monkeypatch.setattr(control, "setup_guest", lambda *a: None)
    monkeypatch.setattr(control, "lab_for", lambda cache, st: st)
    monkeypatch.setattr(statefile, "save", lambda run_dir, st: None)
    cache = Cache(tmp_path / "cache")
    out = io.StringIO()
    result = control.up_result(cache, "t", control.UpOptions(services=False), out)
    assert boots == [0, 1] and stops == [101] and result.booted
    assert "booting once more" in out.getvalue()

    boots.clear()
    stops.clear()
    hangs["n"] = 2
    with pytest.raises(control.BootTimeout, match="guest 102"):
        control.up_result(cache, "t", control.UpOptions(services=False), io.StringIO())
    assert boots == [0, 1] and stops == [101, 102]
