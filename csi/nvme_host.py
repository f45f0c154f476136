"""Adapter for the NVMe host side: nvme-cli argv, /dev/nvme-fabrics and /sys/class/nvme* lookups.

The only module that runs nvme-cli, writes /dev/nvme-fabrics or reads NVMe sysfs. Devices are
always found by subsystem NQN through sysfs, never by guessing /dev/nvmeXnY.

A TLS connect (ConnectSpec.tls_psk) files the volume's retained PSK in the .nvme keyring and
writes its options to /dev/nvme-fabrics itself: Debian 12's nvme-cli (2.3) has no --tls. The key
leaves the keyring at NodeUnstageVolume (forget_psks).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from csi.runner import Runner, check, subprocess_runner
from zvolt import tlspsk
from zvolt.errors import invalid, unavailable
from zvolt.keyring import Keyring, KeyringError
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
    dhchap_secret: str = field(default="", repr=False)
    dhchap_ctrl_secret: str = field(default="", repr=False)
    tls_psk: str = field(default="", repr=False)  # NVMeTLSkey-1: connect with TLS 1.3 under this PSK

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
        if self.tls_psk:
            try:
                tlspsk.decode(self.tls_psk)
            except tlspsk.PskError as exc:
                raise invalid(f"TLS PSK is not a valid NVMeTLSkey-1 key: {exc}") from None
        return self


class NvmeHost(Protocol):
    def controllers(self, nqn: str) -> list[Controller]: ...
    def connect(self, spec: ConnectSpec) -> None: ...
    def disconnect(self, controller: str) -> None: ...
    def forget_psks(self, hostnqn: str, nqn: str) -> None: ...
    def namespace_device(self, nqn: str) -> str | None: ...
    def rescan(self, controller: str) -> None: ...
    def device_size(self, device: str) -> int: ...
    def multipath(self) -> bool: ...


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


def fabrics_options(spec: ConnectSpec) -> str:
    """The option string /dev/nvme-fabrics takes (what nvme-cli writes there): values were
    validated, and none may hold ',' (the kernel splits options on it)."""
    spec.validate()
    opts = [("transport", spec.transport), ("traddr", spec.address), ("trsvcid", spec.port), ("nqn", spec.nqn),
            ("hostnqn", spec.hostnqn), ("hostid", spec.hostid), ("ctrl_loss_tmo", str(int(spec.ctrl_loss_tmo))),
            ("reconnect_delay", str(int(spec.reconnect_delay)))]
    if spec.dhchap_secret:
        opts.append(("dhchap_secret", spec.dhchap_secret))
    if spec.dhchap_ctrl_secret:
        opts.append(("dhchap_ctrl_secret", spec.dhchap_ctrl_secret))
    for key, value in opts:
        if "," in value:
            raise invalid(f"NVMe connect option {key} holds ','")
    return ",".join(f"{k}={v}" for k, v in opts) + (",tls" if spec.tls_psk else "")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class SysfsNvmeHost:
    """The real host: nvme-cli for actions, sysfs (under a configurable root) for state."""

    def __init__(self, sysfs_root: str = "/sys", runner: Runner = subprocess_runner, timeout: float = 60.0,
                 keyring: Keyring | None = None, fabrics: str = "/dev/nvme-fabrics", dev_root: str = "/dev") -> None:
        self.sys = Path(sysfs_root)
        self.dev = Path(dev_root)
        self.run = runner
        self.timeout = timeout
        self.keyring = keyring  # TLS PSKs (zvolt/keyring.py); None: TLS connects are refused
        self.fabrics = fabrics

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
                    return self._node(heads[0])
        # Without multipath the namespace hangs directly under its controller.
        for ctl in self.controllers(nqn):
            names = sorted(n for n in os.listdir(self.sys / "class" / "nvme" / ctl.name) if _HEAD_NS.fullmatch(n))
            if names:
                return self._node(names[0])
        return None

    def _node(self, name: str) -> str | None:
        """The device node, once it exists: sysfs shows a new namespace a moment before devtmpfs
        has its node (seen under TCG: open() of the name just found failed with ENOENT)."""
        path = self.dev / name
        return str(path) if path.exists() else None

    def connect(self, spec: ConnectSpec) -> None:
        if spec.tls_psk:
            self._connect_tls(spec)
            return
        argv = connect_argv(spec)
        check(self.run(argv, self.timeout), argv, "nvme connect")

    def _connect_tls(self, spec: ConnectSpec) -> None:
        options = fabrics_options(spec)
        if self.keyring is None:
            raise unavailable("this node plugin keeps no TLS PSKs (no .nvme keyring adapter)")
        try:
            self.keyring.put(tlspsk.identity(spec.tls_psk, spec.hostnqn, spec.nqn),
                             tlspsk.retained(spec.tls_psk, spec.hostnqn))
        except KeyringError as exc:
            raise unavailable(f"cannot file the TLS PSK of {spec.nqn}: {exc}") from None
        try:
            fd = os.open(self.fabrics, os.O_RDWR)
            try:
                os.write(fd, options.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            # The kernel says only EIO or ENOKEY; tlshd's journal has the handshake's reason.
            raise unavailable(f"NVMe/TCP TLS connect to {spec.nqn} at {spec.address}:{spec.port} failed "
                              f"({exc.strerror}): is tlshd (ktls-utils) running on this node, and does the "
                              "storage node hold the volume's PSK?") from None

    def disconnect(self, controller: str) -> None:
        if not _CTRL.fullmatch(controller):
            raise invalid(f"{controller!r} is not an NVMe controller name")
        argv = ["nvme", "disconnect", "--device", controller]
        check(self.run(argv, self.timeout), argv, "nvme disconnect")

    def forget_psks(self, hostnqn: str, nqn: str) -> None:
        """Take this host's TLS PSKs for the subsystem out of the keyring: after its controllers
        are gone, also when the target ended them (a revocation deletes the controller)."""
        if self.keyring is None:
            return
        try:
            for identity in tlspsk.identities(hostnqn, nqn):
                self.keyring.remove(identity)
        except KeyringError:
            return  # no .nvme keyring on this kernel: no TLS, nothing was filed

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

    def multipath(self) -> bool:
        """Native NVMe multipath: a second controller of a subsystem is a second path of the same
        block device (otherwise a device of its own)."""
        return _read(self.sys / "module" / "nvme_core" / "parameters" / "multipath") == "Y"

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
