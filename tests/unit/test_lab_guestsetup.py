"""Guest-side setup decisions, with the guest's commands faked."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab import control, guestsetup
from lab.state import RunState


def cfg(reused: bool) -> dict[str, Any]:
    st = RunState(instance="t", pid=1, ssh_port=1, forwards={}, image="/i", run_dir="/r", pool_disk="/p",
                  pool_disk_reused=reused, memory_mb=1, started=0)
    crossed: dict[str, Any] = json.loads(json.dumps(control.setup_config(st)))  # what reaches the guest
    return crossed


def fake(monkeypatch: pytest.MonkeyPatch, answer: Callable[[list[str]], tuple[int, str]]) -> list[list[str]]:
    calls: list[list[str]] = []

    def sh(argv: list[str], *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        rc, out = answer(argv)
        if check and rc:
            raise guestsetup.SetupError(f"{argv} exited {rc}")
        return subprocess.CompletedProcess(argv, rc, out, "")

    monkeypatch.setattr(guestsetup, "sh", sh)
    return calls


def fake_params(monkeypatch: pytest.MonkeyPatch, calls: list[list[str]]) -> dict[str, str]:
    params: dict[str, str] = {}

    def zfs_param(path: str, value: str) -> None:
        calls.append(["param", path, value])
        params[path] = value

    monkeypatch.setattr(guestsetup, "zfs_param", zfs_param)
    return params


def test_existing_pool_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (0, "tank\n"))
    guestsetup.pool(cfg(reused=False))
    assert calls == [["zpool", "list", "-H", "-o", "name", "tank"]]


def test_fresh_disk_gets_a_forced_create(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (1, "") if argv[1] == "list" else (0, ""))
    guestsetup.pool(cfg(reused=False))
    assert calls[-1] == ["zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", "tank", "/dev/vdb"]


def test_kept_disk_with_a_pool_is_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(argv: list[str]) -> tuple[int, str]:
        if argv[1] == "list":
            return 1, ""
        return 0, "   pool: tank\n     id: 123\n  state: ONLINE\n"

    calls = fake(monkeypatch, answer)
    params = fake_params(monkeypatch, calls)
    guestsetup.pool(cfg(reused=True))
    imp = ["zpool", "import", "-N", "-f", "-d", "/dev", "tank"]  # -N: mounting would walk every zvol too
    assert calls[-2:] == [imp, ["param", guestsetup.ZVOL_INHIBIT_DEV, "0"]]
    assert calls[-3] == ["param", guestsetup.ZVOL_INHIBIT_DEV, "1"]  # no zvol device nodes during the import
    assert params == {guestsetup.ZVOL_INHIBIT_DEV: "0"}
    assert not any(c[1] == "create" for c in calls)


def test_a_failed_import_still_turns_zvol_device_nodes_back_on(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(argv: list[str]) -> tuple[int, str]:
        if argv[1] == "list":
            return 1, ""
        if argv[1] == "import" and "-f" in argv:
            return 1, ""
        return 0, "   pool: tank\n"

    calls = fake(monkeypatch, answer)
    params = fake_params(monkeypatch, calls)
    with pytest.raises(guestsetup.SetupError):
        guestsetup.pool(cfg(reused=True))
    assert params == {guestsetup.ZVOL_INHIBIT_DEV: "0"}


def test_blank_kept_disk_is_created_without_force(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (1, "") if argv[1] == "list" else (0, "no pools available to import\n"))
    guestsetup.pool(cfg(reused=True))
    assert calls[-1][:2] == ["zpool", "create"] and "-f" not in calls[-1]


def test_network_creates_only_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def answer(argv: list[str]) -> tuple[int, str]:
        if argv[:3] == ["ip", "netns", "list"]:
            return 0, "storage (id: 0)\nworker (id: 1)\n"
        return 0, ""

    calls = fake(monkeypatch, answer)
    guestsetup.network(cfg(reused=False))
    assert not any(c[:3] == ["ip", "netns", "add"] for c in calls)
    assert not any(c[:3] == ["ip", "link", "add"] for c in calls)
    assert ["ip", "-n", "storage", "addr", "replace", "10.42.0.1/24", "dev", "veth-s"] in calls
    assert ["ip", "-n", "worker", "addr", "replace", "10.42.0.2/24", "dev", "veth-w"] in calls


def test_missing_namespaces_and_veth_are_made(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (1, "") if argv[:2] == ["ip", "-n"] and "show" in argv else (0, ""))
    guestsetup.network(cfg(reused=False))
    assert ["ip", "netns", "add", "storage"] in calls and ["ip", "netns", "add", "worker"] in calls
    assert ["ip", "link", "add", "veth-s", "netns", "storage", "type", "veth",
            "peer", "name", "veth-w", "netns", "worker"] in calls


def test_forwarders_start_only_when_inactive(monkeypatch: pytest.MonkeyPatch) -> None:
    active = {"zvolt-fwd-agent.service"}
    calls = fake(monkeypatch, lambda argv: (0 if argv[-1] in active else 3, "") if "is-active" in argv else (0, ""))
    guestsetup.forwarders(cfg(reused=False))
    started = [c for c in calls if c[0] == "systemd-run"]
    assert [c[c.index("--unit") + 1] for c in started] == ["zvolt-fwd-controller.service", "zvolt-fwd-node.service"]
    assert started[0][-3:] == ["socat", "TCP-LISTEN:7002,fork,reuseaddr", "UNIX-CONNECT:/run/zvolt/controller.sock"]


def test_script_runs_on_a_bare_python() -> None:
    # The guest gets the source on stdin: it may use the standard library only.
    src = Path(guestsetup.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "json", "os", "subprocess", "sys", "typing"}


def test_a_guest_set_up_once_imports_its_pool_after_a_reboot(monkeypatch: pytest.MonkeyPatch) -> None:
    st = RunState(instance="t", pid=1, ssh_port=1, forwards={}, image="/i", run_dir="/r", pool_disk="/p",
                  pool_disk_reused=False, memory_mb=1, started=0, guest_ready=True)
    calls = fake(monkeypatch, lambda argv: (1, "") if argv[1] == "list" else (0, "   pool: tank\n"))
    fake_params(monkeypatch, calls)
    guestsetup.pool(json.loads(json.dumps(control.setup_config(st))))
    assert calls[-2] == ["zpool", "import", "-N", "-f", "-d", "/dev", "tank"]
    assert not any(c[1] == "create" for c in calls)


def peer_cfg(role: str) -> dict[str, Any]:
    st = RunState(instance="t", pid=1, ssh_port=1, forwards={}, image="/i", run_dir="/r", pool_disk="/p",
                  pool_disk_reused=False, memory_mb=1, started=0, peer_role=role, peer_port=40100)
    crossed: dict[str, Any] = json.loads(json.dumps(control.setup_config(st)))
    return crossed


def test_no_peer_link_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (0, ""))
    guestsetup.peer(cfg(reused=False))
    assert calls == []


def test_storage_peer_nic_is_found_by_mac_renamed_and_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestsetup, "_by_mac", lambda mac: "eth1" if mac == "52:54:00:7a:10:01" else "")
    calls = fake(monkeypatch, lambda argv: (1, "") if argv[-2:] == ["show", "zvpeer"] else (0, ""))
    guestsetup.peer(peer_cfg("storage"))
    assert ["ip", "link", "set", "eth1", "name", "zvpeer"] in calls
    assert ["ip", "link", "set", "zvpeer", "netns", "storage"] in calls
    assert ["ip", "-n", "storage", "addr", "replace", "10.44.0.1/24", "dev", "zvpeer"] in calls
    assert not any("route" in c for c in calls)


def test_worker_peer_nic_stays_in_the_root_netns_with_a_route(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake(monkeypatch, lambda argv: (0, ""))  # already named and placed: only address/up/route
    guestsetup.peer(peer_cfg("worker"))
    assert calls == [
        ["ip", "link", "show", "zvpeer"],
        ["ip", "addr", "replace", "10.44.0.2/24", "dev", "zvpeer"],
        ["ip", "link", "set", "zvpeer", "up"],
        ["ip", "route", "replace", "10.42.0.1/32", "via", "10.44.0.1"],
    ]


def test_missing_peer_nic_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guestsetup, "_by_mac", lambda mac: "")
    fake(monkeypatch, lambda argv: (1, "") if "show" in argv else (0, ""))
    with pytest.raises(guestsetup.SetupError, match="MAC 52:54:00:7a:10:02"):
        guestsetup.peer(peer_cfg("worker"))
