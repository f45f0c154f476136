"""The Lab handle: service argv per the contract, and how guest command results are judged."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from lab import guest, ssh
from lab.guest import GuestCommandError, Lab


def make_lab() -> Lab:
    return Lab(target=ssh.SshTarget(port=1, key=Path("/k"), control_path=Path("/tmp/x.ctl")), forwards={"agent": 5})


def test_standard_service_command_lines() -> None:
    assert guest.agent_argv() == [
        "/opt/zvolt/venv/bin/python", "-m", "agent.main", "--node-name", "storage-0", "--pool", "tank",
        "--parent", "tank/zvolt", "--listen", "unix:///run/zvolt/agent.sock", "--nvme-listen", "10.42.0.1:4420",
        "--metrics-listen", "127.0.0.1:9101", "--state-dir", "/var/lib/zvolt", "--insecure",
    ]
    assert guest.controller_argv() == [
        "/opt/zvolt/venv/bin/python", "-m", "csi.main", "--mode", "controller",
        "--endpoint", "unix:///run/zvolt/controller.sock", "--agents", "storage-0=unix:///run/zvolt/agent.sock",
        "--insecure",
    ]
    assert guest.node_argv() == [
        "/opt/zvolt/venv/bin/python", "-m", "csi.main", "--mode", "node", "--endpoint", "unix:///run/zvolt/node.sock",
        "--node-id", "worker-0", "--state-dir", "/var/lib/zvolt-node",
        "--storage-network", "10.42.0.0/24", "--nvme-port", "4420,4421",
    ]


def test_services_are_transient_units_in_their_netns() -> None:
    argv = guest.systemd_run_argv("agent", ["/bin/x", "--y"], netns="storage")
    assert argv[0] == "systemd-run" and argv[argv.index("--unit") + 1] == "zvolt-agent.service"
    assert "NetworkNamespacePath=/run/netns/storage" in argv
    assert argv[-3:] == ["--", "/bin/x", "--y"]
    assert not any("NetworkNamespacePath" in a for a in guest.systemd_run_argv("controller", ["/bin/x"]))


@pytest.mark.parametrize("bad", ["Agent", "a b", "../x", "", "x;y"])
def test_bad_service_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        guest.unit_name(bad)


def fake_ssh(monkeypatch: pytest.MonkeyPatch, rc: int, out: str = "", err: str = "") -> list[list[str]]:
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, rc, out, err)

    monkeypatch.setattr(ssh, "ensure_master", lambda target: None)
    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_run_returns_output_and_raises_with_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_ssh(monkeypatch, 0, out="tank\n")
    assert make_lab().run(["zpool", "list"]).stdout == "tank\n"
    assert calls[0][0] == "ssh"
    fake_ssh(monkeypatch, 1, err="cannot open 'x': no such pool")
    with pytest.raises(GuestCommandError, match="no such pool"):
        make_lab().run(["zpool", "list", "x"])
    assert make_lab().run(["zpool", "list", "x"], check=False).returncode == 1


def test_ssh_failure_is_never_a_command_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ssh(monkeypatch, 255, err="ssh: connect to host 127.0.0.1 port 1: Connection refused")
    with pytest.raises(GuestCommandError, match="ssh to the guest failed"):
        make_lab().run(["true"], check=False)
    fake_ssh(monkeypatch, 255, err="nvme: some failure")
    assert make_lab().run(["nvme", "connect"], check=False).returncode == 255


def test_host_side_timeout_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(ssh, "ensure_master", lambda target: None)
    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(GuestCommandError, match="timed out"):
        make_lab().run(["sleep", "1000"], timeout=1)


def test_grpc_target_is_loopback() -> None:
    assert make_lab().grpc_target("agent") == "127.0.0.1:5"
    with pytest.raises(KeyError):
        make_lab().grpc_target("nope")


def test_put_streams_the_file_then_sets_mode_and_checks_the_digest(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import hashlib

    src = tmp_path / "bin"
    src.write_bytes(b"\x7fELF static")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    calls: list[tuple[list[str], Any]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        stdin: Any = kw.get("stdin")
        calls.append((argv, stdin.read() if hasattr(stdin, "read") else None))
        out = f"{digest}  /g/bin\n" if "sha256sum" in argv[-1] else ""
        return subprocess.CompletedProcess(argv, 0, out if kw.get("text") else b"", "" if kw.get("text") else b"")

    monkeypatch.setattr(ssh, "ensure_master", lambda target: None)
    monkeypatch.setattr(subprocess, "run", run)
    make_lab().put(src, "/g/bin", mode=0o755)
    (copy, data), (chmod, _), (check, _) = calls
    assert data == b"\x7fELF static" and "dd of=/g/bin" in copy[-1]
    assert chmod[-1].endswith("chmod 755 -- /g/bin") and check[-1].endswith("sha256sum -- /g/bin")
    digest = "0" * 64
    calls.clear()
    with pytest.raises(GuestCommandError, match="differs"):
        make_lab().put(src, "/g/bin")
