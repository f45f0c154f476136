"""The qemu process: argv, start (daemonized, pid file), liveness by pid, hard kill."""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lab import qmp

GUEST_SSH_PORT = 22
KERNEL_CMDLINE = (
    "root=/dev/vda rw console=ttyS0 quiet loglevel=4 systemd.show_status=false "
    "net.ifnames=0 nvme_core.multipath=N"
)


def kernel_cmdline(multipath: bool) -> str:
    """Native NVMe multipath off by default (one path per volume, the device under its controller);
    on for what needs two paths to one subsystem: a live move (Debian's own default is on)."""
    return KERNEL_CMDLINE.replace("nvme_core.multipath=N", "nvme_core.multipath=Y") if multipath else KERNEL_CMDLINE


# MACs of the peer link's NIC: guest setup finds the interface by them.
PEER_MAC = {"storage": "52:54:00:7a:10:01", "worker": "52:54:00:7a:10:02"}


@dataclass(frozen=True)
class PeerLink:
    """A second NIC joining two lab guests: an Ethernet link carried over a TCP socket on
    127.0.0.1 (qemu's socket netdev). The storage side listens, the worker side connects, so a
    storage guest can be rebooted under an initiator that lives in another guest."""

    role: str  # "storage" (listens) or "worker" (connects)
    port: int

    def __post_init__(self) -> None:
        if self.role not in PEER_MAC:
            raise ValueError(f"peer role {self.role!r} is not one of {sorted(PEER_MAC)}")
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"peer port {self.port} is out of range")

    def argv(self) -> list[str]:
        side = "listen" if self.role == "storage" else "connect"
        return ["-netdev", f"socket,id=peer,{side}=127.0.0.1:{self.port}",
                "-device", f"virtio-net-pci,netdev=peer,mac={PEER_MAC[self.role]}"]


# The storage network: one L2 segment shared by every storage guest of a lab cluster
# (lab/cluster.py), carried by UDP multicast on 127.0.0.1 (qemu's socket netdev, mcast=): any
# number of guests join it and none of them has to boot first. Multicast on the host's loopback
# works here (shown 2026-12-06); the port, chosen per cluster, keeps clusters apart.
STORAGE_NET_GROUP = "239.255.42.1"
STORAGE_NET_MAC = "52:54:00:7a:20:{index:02x}"


@dataclass(frozen=True)
class StorageNet:
    """This guest's NIC on the cluster's storage network (index = its place in the cluster)."""

    port: int
    index: int

    def __post_init__(self) -> None:
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"storage network port {self.port} is out of range")
        if not 0 <= self.index < 200:
            raise ValueError(f"storage network index {self.index} is out of range")

    @property
    def mac(self) -> str:
        return STORAGE_NET_MAC.format(index=self.index + 1)

    def argv(self) -> list[str]:
        return ["-netdev", f"socket,id=storagenet,mcast={STORAGE_NET_GROUP}:{self.port},localaddr=127.0.0.1",
                "-device", f"virtio-net-pci,netdev=storagenet,mac={self.mac}"]


@dataclass(frozen=True)
class GuestFwd:
    """A guest-to-host path through the restricted user network: a TCP connection the guest
    opens to ip:port starts `command` on the host with the connection as its stdin and stdout
    (qemu's `guestfwd=...-cmd:`, one process per connection; the `tcp:` form would hold a
    single connection for the guest's whole life)."""

    ip: str
    port: int
    command: tuple[str, ...]

    def __post_init__(self) -> None:
        ipaddress.IPv4Address(self.ip)
        if not 1 <= self.port <= 65535:
            raise ValueError(f"guestfwd port {self.port} is out of range")
        # qemu splits -nic options at commas; the command must not contain any.
        if not self.command or any("," in part or "\n" in part for part in self.command):
            raise ValueError(f"guestfwd command {self.command!r} is empty or holds a comma or newline")

    def option(self) -> str:
        return f"guestfwd=tcp:{self.ip}:{self.port}-cmd:{shlex.join(self.command)}"


@dataclass(frozen=True)
class QemuConfig:
    name: str
    kernel: Path
    initrd: Path
    overlay: Path
    pool_disk: Path
    src: Path
    console_log: Path
    pid_file: Path
    ssh_port: int
    forwards: Mapping[int, int]  # host port on 127.0.0.1 -> guest port
    memory_mb: int = 4096
    smp: int = 2
    peer: PeerLink | None = None
    storage_net: StorageNet | None = None
    guestfwds: tuple[GuestFwd, ...] = ()
    multipath: bool = False
    qmp_socket: Path | None = None  # qemu's own view of the guest (lab/qmp.py)


def hostfwd(host_port: int, guest_port: int) -> str:
    return f"hostfwd=tcp:127.0.0.1:{host_port}-:{guest_port}"


def argv(cfg: QemuConfig, binary: str = "qemu-system-x86_64") -> list[str]:
    nic = ",".join(
        [
            "user",
            "model=virtio-net-pci",
            "restrict=on",
            hostfwd(cfg.ssh_port, GUEST_SSH_PORT),
            *(hostfwd(h, g) for h, g in sorted(cfg.forwards.items())),
            *(fwd.option() for fwd in cfg.guestfwds),
        ]
    )
    return [
        binary,
        "-name", f"zvolt-lab-{cfg.name}",
        "-nodefaults", "-no-user-config",
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-smp", str(cfg.smp),
        "-m", str(cfg.memory_mb),
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{cfg.console_log}",
        "-kernel", str(cfg.kernel),
        "-initrd", str(cfg.initrd),
        "-append", kernel_cmdline(cfg.multipath),
        "-drive", f"file={cfg.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-drive", f"file={cfg.pool_disk},if=virtio,format=raw,cache=writeback,discard=unmap",
        "-nic", nic,
        *(cfg.peer.argv() if cfg.peer is not None else []),
        *(cfg.storage_net.argv() if cfg.storage_net is not None else []),
        "-virtfs", f"local,path={cfg.src},mount_tag=src,security_model=none,readonly=on",
        "-device", "virtio-rng-pci",
        *(qmp.socket_argv(cfg.qmp_socket) if cfg.qmp_socket is not None else []),
        "-daemonize",
        "-pidfile", str(cfg.pid_file),
    ]


def overlay_argv(base: Path, overlay: Path) -> list[str]:
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (qemu binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now (for a cluster's storage network)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_sparse(path: Path, size_bytes: int) -> None:
    with path.open("wb") as f:
        f.truncate(size_bytes)


def start(cfg: QemuConfig) -> int:
    cfg.pid_file.unlink(missing_ok=True)
    proc = subprocess.run(argv(cfg), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu failed to start (exit {proc.returncode}): {proc.stderr.strip()}")
    return int(cfg.pid_file.read_text().strip())


def alive(pid: int, marker: str) -> bool:
    """pid is a live qemu of ours (the marker, e.g. our overlay path, guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return marker.encode() in cmdline and b"qemu-system" in cmdline


def wait_exit(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, marker):
            return True
        time.sleep(0.2)
    return not alive(pid, marker)


def kill(pid: int, marker: str, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL; returns once the process is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not alive(pid, marker):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_exit(pid, marker, wait):
            return
    if alive(pid, marker):
        raise RuntimeError(f"qemu pid {pid} survived SIGKILL")
