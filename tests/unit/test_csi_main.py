"""zvolt-csi as a process: socket 0600, Identity answers per mode, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from zvolt.pb import csi_pb2, csi_pb2_grpc


def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "socket never appeared"
        time.sleep(0.05)


def test_node_mode_process_lifecycle(sockdir: str) -> None:
    tmp = sockdir
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = f"{tmp}/csi/node.sock"
    argv = [sys.executable, "-m", "csi.main", "--mode", "node", "--endpoint", f"unix://{sock}",
            "--node-id", "worker-0", "--state-dir", f"{tmp}/state",
            # --no-guard: never touch this machine's firewall (the guard: tests/unit/test_nftguard.py)
            "--metrics-listen", f"127.0.0.1:{port}", "--no-guard"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    try:
        _wait_socket(sock, proc)
        time.sleep(0.2)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            ident = csi_pb2_grpc.IdentityStub(channel)
            assert ident.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10).name == "csi.zvolt.io"
            info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
            assert info.node_id.startswith("nqn.2026-11.io.zvolt:host:worker-0:")
            try:
                csi_pb2_grpc.ControllerStub(channel).ControllerGetCapabilities(
                    csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
                )
                raise AssertionError("node mode must not serve the Controller service")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNIMPLEMENTED
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert 'zvolt_csi_operations_total{method="NodeGetInfo",mode="node",status="OK"} 1.0' in scraped
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not os.path.exists(sock)
        assert b'"method": "NodeGetInfo"' in (proc.stderr.read() if proc.stderr else b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_controller_mode_refuses_to_start_without_agents_or_tls() -> None:
    base = [sys.executable, "-m", "csi.main", "--mode", "controller", "--endpoint", "unix:///tmp/zv-never.sock"]
    cwd = Path(__file__).resolve().parents[2]
    no_agents = subprocess.run([*base, "--insecure"], capture_output=True, timeout=60, cwd=cwd, check=False)
    assert no_agents.returncode != 0 and b"--agents" in no_agents.stderr
    no_tls = subprocess.run(
        [*base, "--agents", "s=unix:///x.sock"], capture_output=True, timeout=60, cwd=cwd, check=False
    )
    assert no_tls.returncode != 0 and b"--tls-cert" in no_tls.stderr


def test_node_mode_refuses_to_start_without_a_guard_or_no_guard(sockdir: str) -> None:
    """No storage network and no explicit --no-guard: refuse before touching anything."""
    argv = [sys.executable, "-m", "csi.main", "--mode", "node", "--endpoint", f"unix://{sockdir}/n.sock",
            "--node-id", "worker-0", "--state-dir", f"{sockdir}/state"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZVOLT_")}
    proc = subprocess.run(argv, capture_output=True, timeout=60, cwd=Path(__file__).resolve().parents[2],
                          env=env, check=False)
    assert proc.returncode != 0 and b"--storage-network CIDR" in proc.stderr and b"--no-guard" in proc.stderr
    assert not os.path.exists(f"{sockdir}/n.sock")
