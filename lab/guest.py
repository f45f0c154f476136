"""The Lab handle tests use: run commands in the guest, manage services, reach gRPC ports."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab import ssh
from lab.ssh import SshTarget

POOL = "tank"
STORAGE_NS = "storage"
WORKER_NS = "worker"
STORAGE_IP = "10.42.0.1"
WORKER_IP = "10.42.0.2"
PREFIX_LEN = 24
# The lab's storage network (the veth pair between the storage and worker netns): the node
# plugin's NVMe/TCP guard drops pod traffic forwarded to it (zvolt/nftguard.py).
STORAGE_NETWORK = f"10.42.0.0/{PREFIX_LEN}"
NVME_PORT = "4420"
NVME_TLS_PORT = "4421"  # the agent's default TLS port (--nvme-tls-port: its NVMe/TCP port + 1)
VETH_STORAGE = "veth-s"
VETH_WORKER = "veth-w"
# The optional peer link to a second guest (lab.qemu.PeerLink): its NIC is renamed PEER_DEV; on
# the storage guest it sits in the storage netns, on the worker guest in the root netns (where
# nvme-tcp reconnects from), with a route to STORAGE_IP across it.
PEER_DEV = "zvpeer"
PEER_IP = {"storage": "10.44.0.1", "worker": "10.44.0.2"}
# A lab cluster's storage network (lab/cluster.py): guest i has STORAGE_NET_IP.format(i + 1) on
# STORAGE_NET_DEV, in the storage netns where its agent runs (agents stream to each other on it).
STORAGE_NET_DEV = "zvstore"
STORAGE_NET_IP = "10.45.0.{host}"
STORAGE_NET = f"10.45.0.0/{PREFIX_LEN}"
NODE_NAME = "storage-0"
PYTHON = "/opt/zvolt/venv/bin/python"
RUN_DIR = "/run/zvolt"
# Guest root-namespace TCP ports of the socat forwarders (qemu forwards host ports to these).
GUEST_PORTS = {"agent": 7001, "controller": 7002, "node": 7003}
SOCKETS = {name: f"{RUN_DIR}/{name}.sock" for name in GUEST_PORTS}

_SERVICE = re.compile(r"^[a-z][a-z0-9-]{0,40}$")


def check_service(name: str) -> str:
    if not _SERVICE.fullmatch(name):
        raise ValueError(f"service name {name!r} is not valid: 1-41 of [a-z0-9-], starting with a letter")
    return name


def unit_name(name: str) -> str:
    return f"zvolt-{check_service(name)}.service"


def storage_net_ip(index: int) -> str:
    return STORAGE_NET_IP.format(host=index + 1)


def agent_argv(node_name: str = NODE_NAME) -> list[str]:
    return [
        PYTHON, "-m", "agent.main", "--node-name", node_name, "--pool", POOL, "--parent", f"{POOL}/zvolt",
        "--listen", f"unix://{SOCKETS['agent']}", "--nvme-listen", f"{STORAGE_IP}:4420",
        "--metrics-listen", "127.0.0.1:9101", "--state-dir", "/var/lib/zvolt", "--insecure",
    ]


def controller_argv() -> list[str]:
    return [
        PYTHON, "-m", "csi.main", "--mode", "controller", "--endpoint", f"unix://{SOCKETS['controller']}",
        "--agents", f"{NODE_NAME}=unix://{SOCKETS['agent']}", "--insecure",
    ]


def node_argv() -> list[str]:
    return [
        PYTHON, "-m", "csi.main", "--mode", "node", "--endpoint", f"unix://{SOCKETS['node']}",
        "--node-id", "worker-0", "--state-dir", "/var/lib/zvolt-node",
        "--storage-network", STORAGE_NETWORK, "--nvme-port", f"{NVME_PORT},{NVME_TLS_PORT}",
    ]


def systemd_run_argv(name: str, argv: Sequence[str], *, netns: str | None = None) -> list[str]:
    """A transient unit (NetworkNamespacePath keeps /sys as it is, unlike `ip netns exec`)."""
    cmd = ["systemd-run", "--unit", unit_name(name), "--collect", "--quiet",
           "-p", "KillMode=mixed", "-p", "TimeoutStopSec=10",
           "--setenv=PYTHONUNBUFFERED=1", "--setenv=PYTHONDONTWRITEBYTECODE=1"]
    if netns is not None:
        cmd += ["-p", f"NetworkNamespacePath=/run/netns/{ssh.check_netns(netns)}"]
    return [*cmd, "--", *argv]


class GuestCommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str] | None, why: str) -> None:
        self.argv = list(argv)
        self.result = result
        super().__init__(why)


@dataclass
class Lab:
    target: SshTarget
    forwards: dict[str, int]
    instance: str = "default"
    pool: str = POOL
    storage_ip: str = STORAGE_IP
    worker_ip: str = WORKER_IP
    python: str = PYTHON
    node_name: str = NODE_NAME  # the agent's storage node name (storage-<i> in a lab cluster)

    # -- commands -------------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        netns: str | None = None,
        timeout: float = 120,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv in the guest. Raises GuestCommandError on timeout, and on non-zero exit if check."""
        ssh.ensure_master(self.target)
        cmd = ssh.command_argv(self.target, argv, netns=netns, timeout=timeout)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, input=input, capture_output=True, text=True, timeout=timeout + ssh.HOST_GRACE,
                stdin=None if input is not None else subprocess.DEVNULL, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise GuestCommandError(argv, None, f"guest command timed out after {timeout:.0f}s: {list(argv)}") from exc
        result = subprocess.CompletedProcess(list(argv), proc.returncode, proc.stdout, proc.stderr)
        if proc.returncode in (124, 137) and time.monotonic() - start >= timeout - 1:
            raise GuestCommandError(argv, result, f"guest command timed out after {timeout:.0f}s: {list(argv)}")
        if proc.returncode == 255 and ssh.is_transport_error(proc.stderr):
            # ssh itself failed: never pass that off as the command's own exit status.
            raise GuestCommandError(argv, result, f"ssh to the guest failed: {proc.stderr.strip()}")
        if check and proc.returncode != 0:
            raise GuestCommandError(
                argv, result, f"guest command {list(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
            )
        return result

    def py(
        self, code: str, *, netns: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Python source run by the guest venv interpreter (stdin, so no quoting games)."""
        return self.run([self.python, "-"], netns=netns, timeout=timeout, check=check, input=code)

    def put(self, local: Path, dest: str, *, mode: int = 0o644, timeout: float = 300) -> None:
        """Copy a host file into the guest (ssh stdin into dd), set its mode, check its sha256 there."""
        ssh.ensure_master(self.target)
        cmd = ssh.copy_in_argv(self.target, dest, timeout=timeout)
        what = ["put", str(local), dest]
        try:
            with local.open("rb") as src:
                proc = subprocess.run(
                    cmd, stdin=src, capture_output=True, timeout=timeout + ssh.HOST_GRACE, check=False
                )
        except subprocess.TimeoutExpired as exc:
            raise GuestCommandError(what, None, f"copying {local} to the guest timed out after {timeout:.0f}s") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()[-2000:]
            raise GuestCommandError(what, None, f"copying {local} to guest {dest} failed ({proc.returncode}): {err}")
        self.run(["chmod", format(mode, "o"), "--", dest], timeout=30)
        want = hashlib.sha256(local.read_bytes()).hexdigest()
        got = self.run(["sha256sum", "--", dest], timeout=120).stdout.split()
        if not got or got[0] != want:
            raise GuestCommandError(what, None, f"guest {dest} differs from {local} after the copy")

    # -- services -------------------------------------------------------------------------
    def start_service(self, name: str, argv: Sequence[str], *, netns: str | None = None) -> None:
        self.stop_service(name)
        self.run(["mkdir", "-p", RUN_DIR])
        self.run(systemd_run_argv(name, argv, netns=netns), timeout=60)

    def stop_service(self, name: str, *, kill: bool = False) -> None:
        unit = unit_name(name)
        if kill:
            self.run(["systemctl", "kill", "--signal=SIGKILL", unit], check=False, timeout=30)
        else:
            self.run(["systemctl", "stop", unit], check=False, timeout=60)
        deadline = time.monotonic() + 30
        while self.service_running(name) and time.monotonic() < deadline:
            time.sleep(0.3)
        self.run(["systemctl", "reset-failed", unit], check=False, timeout=30)

    def service_running(self, name: str) -> bool:
        out = self.run(["systemctl", "is-active", unit_name(name)], check=False, timeout=30)
        return out.stdout.strip() in ("active", "activating", "deactivating", "reloading")

    def service_log(self, name: str, lines: int = 200) -> str:
        out = self.run(
            ["journalctl", "--no-pager", "-o", "cat", "-n", str(int(lines)), "-u", unit_name(name)],
            check=False, timeout=60,
        )
        return out.stdout

    def wait_socket(self, name: str, path: str, timeout: float = 90) -> None:
        """Until the unix socket accepts a connection; fails early if the service died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = self.run(["socat", "-u", "OPEN:/dev/null", f"UNIX-CONNECT:{path}"], check=False, timeout=20)
            if probe.returncode == 0:
                return
            if not self.service_running(name):
                raise GuestCommandError(
                    [name], None, f"service {name} exited before {path} answered:\n{self.service_log(name, 60)}"
                )
            time.sleep(0.5)
        raise GuestCommandError([name], None, f"{path} did not answer in {timeout:.0f}s:\n{self.service_log(name, 60)}")

    def start_agent(self, *extra: str) -> None:
        self.start_service("agent", [*agent_argv(self.node_name), *extra], netns=STORAGE_NS)
        self.wait_socket("agent", SOCKETS["agent"])

    def start_controller(self, *extra: str) -> None:
        self.start_service("controller", [*controller_argv(), *extra])
        self.wait_socket("controller", SOCKETS["controller"])

    def start_node(self, *extra: str) -> None:
        self.start_service("node", [*node_argv(), *extra], netns=WORKER_NS)
        self.wait_socket("node", SOCKETS["node"])

    def grpc_target(self, name: str) -> str:
        if name not in self.forwards:
            raise KeyError(f"no forwarded port for {name!r} (known: {sorted(self.forwards)})")
        return f"127.0.0.1:{self.forwards[name]}"

    def link(self, up: bool) -> None:
        state = "up" if up else "down"
        self.run(["ip", "-n", STORAGE_NS, "link", "set", VETH_STORAGE, state], timeout=30)
        self.run(["ip", "-n", WORKER_NS, "link", "set", VETH_WORKER, state], timeout=30)
