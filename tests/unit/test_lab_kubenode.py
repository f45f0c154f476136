"""The lab kubelet's host side: the guestfwd option in qemu's argv and the relay it runs (the
relay runs for real here: a socket pair stands in for the connection qemu hands it)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab import kubenode, qemu


def config(tmp_path: Path, fwd: qemu.GuestFwd) -> qemu.QemuConfig:
    return qemu.QemuConfig(
        name="t", kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img", overlay=tmp_path / "o.qcow2",
        pool_disk=tmp_path / "pool.img", src=tmp_path / "src", console_log=tmp_path / "console.log",
        pid_file=tmp_path / "qemu.pid", ssh_port=40022, forwards={}, guestfwds=(fwd,),
    )


def test_guestfwd_is_one_nic_option_running_the_relay_per_connection(tmp_path: Path) -> None:
    fwd = kubenode.apiserver_guestfwd(tmp_path)
    argv = qemu.argv(config(tmp_path, fwd))
    nic = argv[argv.index("-nic") + 1]
    parts = nic.split(",")
    assert "restrict=on" in parts
    [opt] = [p for p in parts if p.startswith("guestfwd=")]
    assert opt.startswith(f"guestfwd=tcp:{kubenode.APISERVER_IP}:{kubenode.APISERVER_PORT}-cmd:")
    assert opt.endswith(f"guestfwd_relay.py {tmp_path / kubenode.PORT_FILE} {tmp_path / kubenode.RELAY_LOG}")


@pytest.mark.parametrize("command", [(), ("python3", "a,b"), ("x\ny",)])
def test_guestfwd_refuses_commands_that_would_break_the_option(command: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        qemu.GuestFwd("10.0.2.100", 6443, command)


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[bytes]]]:
    """A one-connection server on 127.0.0.1 that answers each chunk upper-cased."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                seen.append(data)
                conn.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1], seen
    srv.close()
    thread.join(timeout=5)


def relay(tmp_path: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    guest, theirs = socket.socketpair()
    fd = theirs.fileno()  # as qemu does: the connection is the relay's stdin, stdout and stderr
    proc = subprocess.Popen(kubenode.apiserver_guestfwd(tmp_path).command, stdin=fd, stdout=fd, stderr=fd)
    theirs.close()
    guest.settimeout(10)
    return guest, proc


def test_relay_carries_both_directions_to_the_port_published_at_connect_time(
    tmp_path: Path, upstream: tuple[int, list[bytes]]
) -> None:
    port, seen = upstream
    kubenode.publish_apiserver(tmp_path, port)
    guest, proc = relay(tmp_path)
    with guest:
        guest.sendall(b"hello kubelet")
        assert guest.recv(100) == b"HELLO KUBELET"
        guest.shutdown(socket.SHUT_WR)
        assert guest.recv(100) == b""  # the server's EOF comes back after ours
    assert proc.wait(timeout=10) == 0
    assert b"".join(seen) == b"hello kubelet"


def test_relay_without_a_published_port_closes_and_logs_without_writing_to_the_guest(tmp_path: Path) -> None:
    guest, proc = relay(tmp_path)
    with guest:
        assert guest.recv(100) == b""  # nothing (no traceback) reaches the guest's connection
    assert proc.wait(timeout=10) == 1
    assert kubenode.PORT_FILE in (tmp_path / kubenode.RELAY_LOG).read_text()


def test_node_configs_agree_on_the_runtime_and_name_the_guestfwd_address() -> None:
    kubelet = yaml.safe_load(kubenode.kubelet_config())
    assert kubelet["cgroupDriver"] == "systemd" and "SystemdCgroup = true" in kubenode.containerd_config()
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{kubenode.CONTAINERD_SOCKET}"
    kubeconfig = yaml.safe_load(kubenode.kubeconfig())
    assert kubeconfig["clusters"][0]["cluster"]["server"] == f"https://{kubenode.APISERVER_IP}:6443"
    [bridge] = json.loads(kubenode.cni_conflist())["plugins"]
    assert bridge["ipam"]["ranges"] == [[{"subnet": kubenode.POD_SUBNET}]]
    assert kubenode.node_subject() == f"/O=system:nodes/CN=system:node:{kubenode.NODE_NAME}"
