"""qemu argv and process handling for the lab (no qemu needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from lab import qemu


def config(tmp_path: Path) -> qemu.QemuConfig:
    return qemu.QemuConfig(
        name="t", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", overlay=tmp_path / "o.qcow2",
        pool_disk=tmp_path / "pool.img", src=tmp_path / "src", console_log=tmp_path / "console.log",
        pid_file=tmp_path / "qemu.pid", ssh_port=40022, forwards={40001: 7001, 40002: 7002}, memory_mb=2048,
    )


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_uses_tcg_and_requested_resources(tmp_path: Path) -> None:
    argv = qemu.argv(config(tmp_path))
    assert opt(argv, "-accel") == ["tcg,thread=multi"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-smp") == ["2"]
    assert opt(argv, "-m") == ["2048"]
    assert "-daemonize" in argv and opt(argv, "-pidfile") == [str(tmp_path / "qemu.pid")]
    assert opt(argv, "-kernel") == [str(tmp_path / "vmlinuz")]
    assert "root=/dev/vda" in opt(argv, "-append")[0]


def test_network_is_restricted_and_forwards_only_loopback(tmp_path: Path) -> None:
    nic = opt(qemu.argv(config(tmp_path)), "-nic")
    assert len(nic) == 1
    parts = nic[0].split(",")
    assert parts[0] == "user" and "restrict=on" in parts
    fwds = [p for p in parts if p.startswith("hostfwd=")]
    assert sorted(fwds) == sorted([
        "hostfwd=tcp:127.0.0.1:40022-:22", "hostfwd=tcp:127.0.0.1:40001-:7001", "hostfwd=tcp:127.0.0.1:40002-:7002",
    ])


def test_source_share_is_read_only_and_disks_in_order(tmp_path: Path) -> None:
    argv = qemu.argv(config(tmp_path))
    (virtfs,) = opt(argv, "-virtfs")
    assert "readonly=on" in virtfs.split(",") and f"path={tmp_path / 'src'}" in virtfs and "mount_tag=src" in virtfs
    drives = opt(argv, "-drive")
    assert drives[0].startswith(f"file={tmp_path / 'o.qcow2'},") and "format=qcow2" in drives[0]  # /dev/vda
    assert drives[1].startswith(f"file={tmp_path / 'pool.img'},") and "format=raw" in drives[1]  # /dev/vdb


def test_overlay_is_backed_by_the_raw_image(tmp_path: Path) -> None:
    argv = qemu.overlay_argv(tmp_path / "rootfs.img", tmp_path / "o.qcow2")
    assert argv[:2] == ["qemu-img", "create"]
    assert opt(argv, "-b") == [str(tmp_path / "rootfs.img")] and opt(argv, "-F") == ["raw"]


def test_free_port_is_bindable_on_loopback() -> None:
    port = qemu.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_make_sparse_allocates_nothing(tmp_path: Path) -> None:
    disk = tmp_path / "pool.img"
    qemu.make_sparse(disk, 16 * 1024**3)
    assert disk.stat().st_size == 16 * 1024**3
    assert disk.stat().st_blocks * 512 < 1024**2


def test_alive_rejects_processes_that_are_not_our_qemu(tmp_path: Path) -> None:
    assert not qemu.alive(os.getpid(), "anything")
    assert not qemu.alive(2**22 + 12345, "x")


def test_kill_stops_a_matching_process(tmp_path: Path) -> None:
    # A stand-in whose cmdline carries the markers alive() looks for.
    marker = str(tmp_path / "overlay.qcow2")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "qemu-system-x86_64", marker])
    try:
        # Right after fork the child still shows our cmdline: wait for its exec.
        assert _exec_seen(proc.pid, marker)
        qemu.kill(proc.pid, marker, grace=2)
        proc.wait(timeout=5)
        assert not qemu.alive(proc.pid, marker)
    finally:
        proc.kill()
        proc.wait()


def _exec_seen(pid: int, marker: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if qemu.alive(pid, marker):
            return True
        time.sleep(0.05)
    return False


def test_peer_link_is_a_loopback_socket_nic(tmp_path: Path) -> None:
    import dataclasses

    import pytest

    base = config(tmp_path)
    assert "-netdev" not in qemu.argv(base)
    storage = qemu.argv(dataclasses.replace(base, peer=qemu.PeerLink("storage", 40100)))
    worker = qemu.argv(dataclasses.replace(base, peer=qemu.PeerLink("worker", 40100)))
    assert opt(storage, "-netdev") == ["socket,id=peer,listen=127.0.0.1:40100"]
    assert opt(worker, "-netdev") == ["socket,id=peer,connect=127.0.0.1:40100"]
    assert opt(storage, "-device")[0] == f"virtio-net-pci,netdev=peer,mac={qemu.PEER_MAC['storage']}"
    assert len(opt(storage, "-nic")) == 1  # the user-mode NIC stays the only way out, restricted
    with pytest.raises(ValueError):
        qemu.PeerLink("router", 40100)
    with pytest.raises(ValueError):
        qemu.PeerLink("worker", 80)
