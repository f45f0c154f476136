"""The test control plane's egress proxy (kube-apiserver -> a lab kubelet) run for real on a
unix socket, and the lab node's network pieces it relies on: the ssh forward's argv and the
nft script that takes pods to the API server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import kubenode, ssh
from tests.k8s.controlplane import EGRESS_PROXY, KUBERNETES_SERVICE_IP


@pytest.fixture
def echo() -> Iterator[int]:
    """A server on 127.0.0.1 answering each chunk upper-cased."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


@pytest.fixture
def proxy() -> Iterator[tuple[str, Path]]:
    root = Path(tempfile.mkdtemp(prefix="zvegress", dir="/tmp"))  # short: a unix socket path
    sock, routes = root / "e.sock", root / "routes.json"
    routes.write_text("{}")
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(EGRESS_PROXY), str(sock), str(routes)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield str(sock), routes
    proc.terminate()
    proc.wait(timeout=10)
    for p in root.iterdir():
        p.unlink()
    root.rmdir()


def connect(sock: str, target: str) -> tuple[socket.socket, bytes]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(sock)
    conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(1)
        if not data:
            break
        head += data
    return conn, head


def test_connect_to_a_routed_node_reaches_its_local_address(proxy: tuple[str, Path], echo: int) -> None:
    sock, routes = proxy
    routes.write_text(json.dumps({"10.0.2.15:10250": f"127.0.0.1:{echo}"}))  # read at each connect
    conn, head = connect(sock, "10.0.2.15:10250")
    with conn:
        assert head.startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"exec please")
        assert conn.recv(100) == b"EXEC PLEASE"


@pytest.mark.parametrize("target", ["10.0.2.15:10255", "10.0.2.16:10250", "127.0.0.1:1"])
def test_a_target_without_a_route_is_refused(proxy: tuple[str, Path], echo: int, target: str) -> None:
    sock, routes = proxy
    routes.write_text(json.dumps({"10.0.2.15:10250": f"127.0.0.1:{echo}"}))
    conn, head = connect(sock, target)
    with conn:
        assert head.startswith(b"HTTP/1.1 502 "), head


def test_kubelet_forward_is_a_dedicated_ssh_to_the_kubelet_port() -> None:
    target = ssh.SshTarget(port=40022, key=Path("/k"), control_path=Path("/tmp/c.ctl"))
    argv = ssh.forward_argv(target, 41000, kubenode.KUBELET_PORT)
    # ssh keeps the first value of an option: the forward never rides (and dies with) the master.
    assert argv.index("ControlPath=none") < argv.index(f"ControlPath={target.control_path}")
    assert argv[argv.index("-L") + 1] == f"127.0.0.1:41000:127.0.0.1:{kubenode.KUBELET_PORT}"
    assert "ExitOnForwardFailure=yes" in argv and "-N" in argv
    with pytest.raises(ValueError):
        ssh.forward_argv(target, 0, kubenode.KUBELET_PORT)


def test_service_nat_takes_pods_to_the_api_server_guestfwd() -> None:
    rules = kubenode.service_nat_rules(KUBERNETES_SERVICE_IP)
    dnat = (f"ip daddr {KUBERNETES_SERVICE_IP} tcp dport 443 "
            f"dnat to {kubenode.APISERVER_IP}:{kubenode.APISERVER_PORT}")
    assert rules.count(dnat) == 2  # pods (prerouting) and the node itself (output)
    assert f"ip saddr {kubenode.POD_SUBNET} ip daddr {kubenode.APISERVER_IP}" in rules
    assert rules.splitlines()[1] == f"delete table ip {kubenode.NAT_TABLE}"  # replaced, never stacked
    with pytest.raises(ValueError):
        kubenode.service_nat_rules("10.96.0.1; flush ruleset")
