"""Adapter for the NVMe host side: nvme-cli argv and /sys/class/nvme* lookups.

The only module that runs nvme-cli or reads NVMe sysfs. Devices are always found by
subsystem NQN through sysfs, never by guessing /dev/nvmeXnY.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from csi.runner import Runner, check, subprocess_runner
from zvolt.errors import invalid
from zvolt.names import check_nqn, opened_by

_CTRL = re.compile(r"^nvme[0-9]+$")
_NS = re.compile(r"^nvme[0-9]+(c[0-9]+)?n[0-9]+$")
_HEAD_NS = re.compile(r"^nvme[0-9]+n[0-9]+$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")
_SECRET = re.compile(r"^DHHC-1:[0-9]{2}:[A-Za-z0-9+/=]+:$")


@dataclass(frozen=True)
class Controller:
    name: str  # nvmeX
    subsysnqn: str
    hostnqn: str
    state: str  # live | connecting | resetting | deleting | dead | new ...
    transport: str
    address: str


@dataclass(frozen=True)
class ConnectSpec:
    nqn: str
    transport: str
    address: str
    port: str
    hostnqn: str
    hostid: str
    ctrl_loss_tmo: int
    reconnect_delay: int
    dhchap_secret: str = ""
    dhchap_ctrl_secret: str = ""

    def validate(self) -> ConnectSpec:
        check_nqn(self.nqn)
        check_nqn(self.hostnqn)
        if self.transport != "tcp":
            raise invalid(f"transport {self.transport!r} is not supported (only tcp)")
        if not _ADDRESS.fullmatch(self.address) or self.address.startswith("-"):
            raise invalid(f"target address {self.address!r} is not a valid IP address or host name")
        if not self.port.isdigit() or not 0 < int(self.port) < 65536:
            raise invalid(f"target port {self.port!r} is not a valid TCP port")
        for secret in (self.dhchap_secret, self.dhchap_ctrl_secret):
            if secret and not _SECRET.fullmatch(secret):
                raise invalid("DH-HMAC-CHAP secret is not in DHHC-1 format")
        return self


class NvmeHost(Protocol):
    def controllers(self, nqn: str) -> list[Controller]: ...
    def connect(self, spec: ConnectSpec) -> None: ...
    def disconnect(self, controller: str) -> None: ...
    def namespace_device(self, nqn: str) -> str | None: ...
    def rescan(self, controller: str) -> None: ...
    def device_size(self, device: str) -> int: ...


def connect_argv(spec: ConnectSpec) -> list[str]:
    spec.validate()
    argv = [
        "nvme", "connect",
        "--transport", spec.transport,
        "--traddr", spec.address,
        "--trsvcid", spec.port,
        "--nqn", spec.nqn,
        "--hostnqn", spec.hostnqn,
        "--hostid", spec.hostid,
        "--ctrl-loss-tmo", str(int(spec.ctrl_loss_tmo)),
        "--reconnect-delay", str(int(spec.reconnect_delay)),
    ]  # fmt: skip
    if spec.dhchap_secret:
        argv += ["--dhchap-secret", spec.dhchap_secret]
    if spec.dhchap_ctrl_secret:
        argv += ["--dhchap-ctrl-secret", spec.dhchap_ctrl_secret]
    return argv


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class SysfsNvmeHost:
    """The real host: nvme-cli for actions, sysfs (under a configurable root) for state."""

    def __init__(self, sysfs_root: str = "/sys", runner: Runner = subprocess_runner, timeout: float = 60.0) -> None:
        self.sys = Path(sysfs_root)
        self.run = runner
        self.timeout = timeout

    def controllers(self, nqn: str) -> list[Controller]:
        check_nqn(nqn)
        found: list[Controller] = []
        base = self.sys / "class" / "nvme"
        if not base.is_dir():
            return found
        for entry in sorted(os.listdir(base)):
            if not _CTRL.fullmatch(entry):
                continue
            ctl = base / entry
            if _read(ctl / "subsysnqn") != nqn:
                continue
            found.append(
                Controller(
                    name=entry,
                    subsysnqn=nqn,
                    hostnqn=_read(ctl / "hostnqn"),
                    state=_read(ctl / "state") or "unknown",
                    transport=_read(ctl / "transport"),
                    address=_read(ctl / "address"),
                )
            )
        return found

    def namespace_device(self, nqn: str) -> str | None:
        check_nqn(nqn)
        # Native multipath: the block device is the subsystem's head node nvmeSnN.
        subsys = self.sys / "class" / "nvme-subsystem"
        if subsys.is_dir():
            for entry in sorted(os.listdir(subsys)):
                if _read(subsys / entry / "subsysnqn") != nqn:
                    continue
                heads = sorted(n for n in os.listdir(subsys / entry) if _HEAD_NS.fullmatch(n))
                if heads:
                    return f"/dev/{heads[0]}"
        # Without multipath the namespace hangs directly under its controller.
        for ctl in self.controllers(nqn):
            names = sorted(n for n in os.listdir(self.sys / "class" / "nvme" / ctl.name) if _HEAD_NS.fullmatch(n))
            if names:
                return f"/dev/{names[0]}"
        return None

    def connect(self, spec: ConnectSpec) -> None:
        argv = connect_argv(spec)
        check(self.run(argv, self.timeout), argv, "nvme connect")

    def disconnect(self, controller: str) -> None:
        if not _CTRL.fullmatch(controller):
            raise invalid(f"{controller!r} is not an NVMe controller name")
        argv = ["nvme", "disconnect", "--device", controller]
        check(self.run(argv, self.timeout), argv, "nvme disconnect")

    def rescan(self, controller: str) -> None:
        if not _CTRL.fullmatch(controller):
            raise invalid(f"{controller!r} is not an NVMe controller name")
        argv = ["nvme", "ns-rescan", f"/dev/{controller}"]
        check(self.run(argv, self.timeout), argv, "nvme ns-rescan")

    def subsystem_of(self, device: str) -> str | None:
        """Subsystem NQN of a namespace block device (its parent is the controller or, with
        native multipath, the subsystem: both carry subsysnqn); None when it is not NVMe."""
        name = os.path.basename(device)
        if not _NS.fullmatch(name):
            return None
        return _read(self.sys / "class" / "block" / name / "device" / "subsysnqn") or None

    def device_size(self, device: str) -> int:
        name = os.path.basename(device)
        if not _NS.fullmatch(name):
            raise invalid(f"{device!r} is not an NVMe namespace device")
        sectors = _read(self.sys / "class" / "block" / name / "size")
        return int(sectors) * 512 if sectors.isdigit() else 0


def wait_for_device(host: NvmeHost, nqn: str, timeout: float, interval: float = 0.05) -> str | None:
    """The block device shows up asynchronously after connect: poll sysfs for it."""
    deadline = time.monotonic() + timeout
    while True:
        device = host.namespace_device(nqn)
        if device is not None or time.monotonic() >= deadline:
            return device
        time.sleep(interval)


def ours(controllers: Sequence[Controller], hostnqn: str) -> list[Controller]:
    """Controllers for the subsystem that this node's identity opened (never someone else's),
    under its own host NQN or its per-volume one (an authenticated volume)."""
    return [c for c in controllers if opened_by(c.hostnqn, hostnqn)]
