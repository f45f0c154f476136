"""The lab cluster's pieces without qemu: the storage network NIC, how guest setup places it, the
instance and node names, and that a single guest is booted and set up exactly as before."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from lab import cluster, control, guest, guestsetup, qemu
from lab.paths import Cache
from lab.state import RunState


def config(tmp_path: Path, net: qemu.StorageNet | None = None) -> qemu.QemuConfig:
    return qemu.QemuConfig(
        name="t", kernel=tmp_path / "k", initrd=tmp_path / "i", overlay=tmp_path / "o.qcow2",
        pool_disk=tmp_path / "p.img", src=tmp_path, console_log=tmp_path / "c.log", pid_file=tmp_path / "q.pid",
        ssh_port=40022, forwards={}, storage_net=net,
    )


def state(extra: dict[str, str] | None = None) -> RunState:
    return RunState(instance="t", pid=1, ssh_port=1, forwards={}, image="/i", run_dir="/r", pool_disk="/p",
                    pool_disk_reused=False, memory_mb=1, started=0, extra=extra or {})


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_storage_net_is_one_multicast_segment_on_loopback(tmp_path: Path) -> None:
    a = qemu.argv(config(tmp_path, qemu.StorageNet(port=40200, index=0)))
    b = qemu.argv(config(tmp_path, qemu.StorageNet(port=40200, index=1)))
    assert opt(a, "-netdev") == opt(b, "-netdev") == [
        f"socket,id=storagenet,mcast={qemu.STORAGE_NET_GROUP}:40200,localaddr=127.0.0.1"]
    macs = {opt(x, "-device")[0].rsplit("mac=", 1)[1] for x in (a, b)}
    assert macs == {"52:54:00:7a:20:01", "52:54:00:7a:20:02"}
    assert len(opt(a, "-nic")) == 1  # the restricted user NIC stays the only way out
    with pytest.raises(ValueError):
        qemu.StorageNet(port=80, index=0)


def test_a_single_guest_is_booted_and_set_up_as_before(tmp_path: Path) -> None:
    argv = qemu.argv(config(tmp_path))
    assert "-netdev" not in argv
    cfg = control.setup_config(state())
    assert cfg["storage_net"] is None
    assert control.lab_for(Cache(tmp_path), state()).node_name == "storage-0"
    assert guest.agent_argv()[guest.agent_argv().index("--node-name") + 1] == "storage-0"


def test_guest_setup_moves_the_storage_nic_into_the_storage_netns(monkeypatch: pytest.MonkeyPatch) -> None:
    st = state({"storage_net_port": "40200", "storage_net_index": "1", "node_name": "storage-1"})
    cfg: dict[str, Any] = json.loads(json.dumps(control.setup_config(st)))
    monkeypatch.setattr(guestsetup, "_by_mac", lambda mac: "eth2" if mac == "52:54:00:7a:20:02" else "")
    calls: list[list[str]] = []

    def sh(argv: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        rc = 1 if argv[-2:] == ["show", guest.STORAGE_NET_DEV] else 0
        return subprocess.CompletedProcess(argv, rc, "", "")

    monkeypatch.setattr(guestsetup, "sh", sh)
    guestsetup.storage_net(cfg)
    assert ["ip", "link", "set", "eth2", "name", "zvstore"] in calls
    assert ["ip", "link", "set", "zvstore", "netns", "storage"] in calls
    assert ["ip", "-n", "storage", "addr", "replace", "10.45.0.2/24", "dev", "zvstore"] in calls
    assert control.lab_for(Cache(Path("/nonexistent")), st).node_name == "storage-1"


def test_cluster_names() -> None:
    assert cluster.instances("multi", 3) == ["multi", "multi2", "multi3"]
    assert [cluster.node_name(i) for i in range(2)] == ["storage-0", "storage-1"]
    with pytest.raises(ValueError):
        cluster.instances("multi", 4)


def test_boot_logs_of_parallel_guests_stay_whole_lines() -> None:
    out = io.StringIO()
    w = cluster._Prefixed(out, "multi2", threading.Lock())  # type: ignore[abstract]
    w.write("[lab 1.0s] booting")
    assert out.getvalue() == ""
    w.write(" still\nnext\n")
    assert out.getvalue() == "[multi2] [lab 1.0s] booting still\n[multi2] next\n"


def test_storage_ips_follow_the_cluster_order() -> None:
    labs = [dataclasses.replace(guest.Lab(target=None, forwards={}), node_name=cluster.node_name(i))  # type: ignore[arg-type]
            for i in range(3)]
    members = [cluster.Member(instance=f"m{i}", lab=lab, booted=True) for i, lab in enumerate(labs)]
    assert cluster.storage_ips(members) == {"storage-0": "10.45.0.1", "storage-1": "10.45.0.2",
                                            "storage-2": "10.45.0.3"}
