"""A small object layer over the nvmet configfs tree (the shape of nvmetcli's `nvmet` module).

The only code that writes under /sys/kernel/config/nvmet. The root path is a parameter so unit
tests run against a plain directory; `emulate=True` then stands in for what configfs does by
itself (auto-created child groups, rmdir of a group that still holds attribute files).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from zvolt import names

DEFAULT_ROOT = "/sys/kernel/config/nvmet"
# NVMET_NR_QUEUES: what attr_qid_max reads on a new subsystem (emulation only).
QID_MAX_DEFAULT = 128
# Enabling a namespace opens its block device. zvol_open gives up when it cannot take the
# pool's namespace lock in time (concurrent zvol opens, seen in the lab under parallel
# publishes) and configfs hands its ERESTARTSYS to user space as errno 512. It is transient.
ERESTARTSYS = 512
ENABLE_ATTEMPTS = 5
# ANA groups (NVMET_MAX_ANAGRPS): group 1 is every namespace's default; a volume being moved live
# gets one of 2..MAX_ANA_GROUP of its own, so that its path can be fenced without the others'.
MAX_ANA_GROUP = 128
ANA_OPTIMIZED, ANA_INACCESSIBLE = "optimized", "inaccessible"
# Controller ids: the kernel's range (NVME_CNTLID_MAX). A host refuses a second controller of a
# subsystem with an id it already has, so the two nodes of a live move use disjoint halves.
CNTLID_MIN, CNTLID_MAX = 1, 0xFFEF
CNTLID_HALF = 0x8000


class NvmetError(Exception):
    pass


@dataclass(frozen=True)
class Root:
    path: str = DEFAULT_ROOT
    emulate: bool = False

    def _p(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    def available(self) -> bool:
        return os.path.isdir(self._p("subsystems"))

    def init_tree(self) -> None:
        """Create the top-level groups (only meaningful in emulation; configfs has them)."""
        if self.emulate:
            for group in ("subsystems", "hosts", "ports"):
                os.makedirs(self._p(group), exist_ok=True)

    # -- low-level helpers -----------------------------------------------------------------

    def mkdir(self, path: str, children: tuple[str, ...] = ()) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        if self.emulate:
            for child in children:
                os.makedirs(os.path.join(path, child), exist_ok=True)

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            return
        if self.emulate:
            for entry in os.scandir(path):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                elif entry.is_dir(follow_symlinks=False) and not os.listdir(entry.path):
                    os.rmdir(entry.path)
        os.rmdir(path)

    def write(self, path: str, value: str) -> None:
        with open(path, "w") as f:
            f.write(value)

    def read(self, path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    # -- objects ----------------------------------------------------------------------------

    def subsystem(self, nqn: str) -> Subsystem:
        return Subsystem(self, names.check_nqn(nqn))

    def host(self, nqn: str) -> Host:
        return Host(self, names.check_nqn(nqn))

    def port(self, portid: int) -> Port:
        return Port(self, int(portid))

    def subsystems(self) -> Iterator[Subsystem]:
        for nqn in sorted(_listdir(self._p("subsystems"))):
            yield Subsystem(self, nqn)

    def hosts(self) -> Iterator[Host]:
        for nqn in sorted(_listdir(self._p("hosts"))):
            yield Host(self, nqn)

    def ports(self) -> Iterator[Port]:
        for pid in sorted(_listdir(self._p("ports")), key=lambda x: int(x) if x.isdigit() else 0):
            if pid.isdigit():
                yield Port(self, int(pid))

    def find_port(self, address: str, port: str) -> Port | None:
        for p in self.ports():
            if p.trtype == "tcp" and p.traddr == address and p.trsvcid == port:
                return p
        return None

    def find_or_create_port(self, address: str, port: str, tsas: str = "") -> Port:
        """The port listening on address:port (tcp), created with the next free id if missing.
        tsas "tls1.3": the port requires TLS, "" a clear-text one. A found port with the other
        setting is changed before use, which the kernel allows only while no subsystem is linked
        (a TLS port left behind must not take clear-text volumes, nor the reverse)."""
        found = self.find_port(address, port)
        if found is None:
            used = {p.portid for p in self.ports()}
            found = Port(self, next(i for i in range(1, 65536) if i not in used))
            found.create(address, port)
        if found.tsas != (tsas or "none"):
            found.set_tsas(tsas or "none")
        return found

    def dump(self) -> dict[str, Any]:
        """The whole tree as nvmetcli `saveconfig` JSON (hosts, ports, subsystems)."""
        return {
            "hosts": [{"nqn": h.nqn} for h in self.hosts()],
            "ports": [p.dump() for p in self.ports()],
            "subsystems": [s.dump() for s in self.subsystems()],
        }


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


@dataclass(frozen=True)
class Host:
    root: Root
    nqn: str

    @property
    def path(self) -> str:
        return self.root._p("hosts", self.nqn)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> None:
        self.root.mkdir(self.path)

    def attr(self, name: str) -> str:
        return self.root.read(os.path.join(self.path, _host_attr(name)))

    def set_attr(self, name: str, value: str) -> None:
        self.root.write(os.path.join(self.path, _host_attr(name)), value)

    def delete(self) -> None:
        self.root.rmdir(self.path)


_HOST_ATTRS = ("dhchap_key", "dhchap_ctrl_key", "dhchap_hash", "dhchap_dhgroup")


def _host_attr(name: str) -> str:
    if name not in _HOST_ATTRS:
        raise NvmetError(f"{name!r} is not an nvmet host attribute")
    return name


@dataclass(frozen=True)
class Namespace:
    subsystem: Subsystem
    nsid: int

    @property
    def path(self) -> str:
        return os.path.join(self.subsystem.path, "namespaces", str(self.nsid))

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> None:
        self.subsystem.root.mkdir(self.path)

    def attr(self, name: str) -> str:
        return self.subsystem.root.read(os.path.join(self.path, name))

    def set_attr(self, name: str, value: str) -> None:
        self.subsystem.root.write(os.path.join(self.path, name), value)

    @property
    def enabled(self) -> bool:
        return self.attr("enable") == "1"

    def enable(self, backoff: float = 0.05) -> None:
        for attempt in range(ENABLE_ATTEMPTS):
            try:
                self.set_attr("enable", "1")
                return
            except OSError as exc:
                if exc.errno != ERESTARTSYS or attempt == ENABLE_ATTEMPTS - 1:
                    raise
            time.sleep(backoff * 2**attempt)

    @property
    def ana_group(self) -> int:
        value = self.attr("ana_grpid")
        return int(value) if value.isdigit() else 1

    def set_ana_group(self, grpid: int) -> None:
        """Allowed while enabled: the kernel sends every controller an ANA change notice."""
        if not 1 <= grpid <= MAX_ANA_GROUP:
            raise NvmetError(f"ANA group {grpid} is outside 1..{MAX_ANA_GROUP}")
        self.set_attr("ana_grpid", str(grpid))

    def delete(self) -> None:
        if not self.exists():
            return
        if self.enabled:
            self.set_attr("enable", "0")
        self.subsystem.root.rmdir(self.path)

    def dump(self) -> dict[str, Any]:
        return {
            "nsid": self.nsid,
            "enable": 1 if self.enabled else 0,
            "device": {
                "path": self.attr("device_path"),
                "uuid": self.attr("device_uuid"),
                "nguid": self.attr("device_nguid"),
            },
        }


@dataclass(frozen=True)
class Subsystem:
    root: Root
    nqn: str

    @property
    def path(self) -> str:
        return self.root._p("subsystems", self.nqn)

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> None:
        self.root.mkdir(self.path, children=("namespaces", "allowed_hosts"))

    def attr(self, name: str) -> str:
        return self.root.read(os.path.join(self.path, "attr_" + name))

    def set_attr(self, name: str, value: str) -> None:
        self.root.write(os.path.join(self.path, "attr_" + name), value)

    def namespace(self, nsid: int) -> Namespace:
        return Namespace(self, nsid)

    def cntlid_range(self) -> tuple[int, int]:
        low, high = self.attr("cntlid_min"), self.attr("cntlid_max")
        return (int(low) if low.isdigit() else CNTLID_MIN, int(high) if high.isdigit() else CNTLID_MAX)

    def set_cntlid_range(self, low: int, high: int) -> None:
        """Before the first host connects. Max first when raising the range, min first when lowering
        it: the kernel refuses a min above the max at every step."""
        if not CNTLID_MIN <= low <= high <= CNTLID_MAX:
            raise NvmetError(f"controller id range {low}..{high} is outside {CNTLID_MIN}..{CNTLID_MAX}")
        if low > self.cntlid_range()[1]:
            self.set_attr("cntlid_max", str(high))
            self.set_attr("cntlid_min", str(low))
        else:
            self.set_attr("cntlid_min", str(low))
            self.set_attr("cntlid_max", str(high))

    def namespaces(self) -> list[Namespace]:
        ids = [n for n in _listdir(os.path.join(self.path, "namespaces")) if n.isdigit()]
        return [Namespace(self, int(n)) for n in sorted(ids, key=int)]

    def allowed_hosts(self) -> list[str]:
        return sorted(_listdir(os.path.join(self.path, "allowed_hosts")))

    def allow_host(self, host: Host) -> None:
        host.create()
        link = os.path.join(self.path, "allowed_hosts", host.nqn)
        if not os.path.islink(link):
            os.symlink(host.path, link)

    def disallow_host(self, nqn: str) -> None:
        """Refuse the host's *next* connect. Its controllers already connected keep working (the
        kernel only drops the link: nvmet_allowed_hosts_drop_link): see `reset_controllers`."""
        link = os.path.join(self.path, "allowed_hosts", names.check_nqn(nqn))
        if os.path.islink(link):
            os.unlink(link)

    def reset_controllers(self) -> None:
        """End every controller of this subsystem now; each host reconnects after its
        reconnect_delay and passes the allowed_hosts check again.

        configfs has no way to end one host's controllers, and the per-controller debugfs `state`
        file needs CONFIG_NVME_TARGET_DEBUGFS, which Debian's kernels lack. Writing attr_qid_max
        (in the lab's 6.12; older kernels may lack it) makes nvmet delete every controller of the
        subsystem ("Force reconnect" in drivers/nvme/target/configfs.c); over TCP the queues'
        sockets are shut down before the write returns, so no further command is received
        (commands already received still complete). The value written back is the one read: the
        configuration does not change. Lab (6.12, nvme-tcp): a host no longer allowed is refused
        with DNR at its reconnect and deletes its controller, its queued I/O fails; an allowed
        host reconnects after its reconnect_delay, its I/O waits meanwhile, no error, same device.
        """
        path = os.path.join(self.path, "attr_qid_max")
        value = self.root.read(path)
        if not value:
            if not self.root.emulate:
                raise NvmetError(f"{path} is missing (kernel too old): the target cannot end the "
                                 "controllers of a host that is no longer allowed")
            value = str(QID_MAX_DEFAULT)
        self.root.write(path, value)

    def delete(self) -> None:
        """Tear down in the safe order: ports, namespaces (disable first), hosts, the group."""
        if not self.exists():
            return
        for port in self.root.ports():
            port.remove_subsystem(self.nqn)
        for ns in self.namespaces():
            ns.delete()
        for nqn in self.allowed_hosts():
            self.disallow_host(nqn)
        self.root.rmdir(self.path)

    def dump(self) -> dict[str, Any]:
        attrs: dict[str, str] = {}
        for entry in _listdir(self.path):
            if entry.startswith("attr_") and os.path.isfile(os.path.join(self.path, entry)):
                attrs[entry.removeprefix("attr_")] = self.root.read(os.path.join(self.path, entry))
        return {
            "nqn": self.nqn,
            "attr": dict(sorted(attrs.items())),
            "allowed_hosts": self.allowed_hosts(),
            "namespaces": [ns.dump() for ns in self.namespaces()],
        }


@dataclass(frozen=True)
class Port:
    root: Root
    portid: int

    @property
    def path(self) -> str:
        return self.root._p("ports", str(self.portid))

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def _addr(self, name: str) -> str:
        return self.root.read(os.path.join(self.path, "addr_" + name))

    @property
    def trtype(self) -> str:
        return self._addr("trtype")

    @property
    def traddr(self) -> str:
        return self._addr("traddr")

    @property
    def trsvcid(self) -> str:
        return self._addr("trsvcid")

    @property
    def tsas(self) -> str:
        """Transport security: "tls1.3" (addr_treq then says TLS is required) or "none"."""
        return self._addr("tsas") or "none"  # no file: a kernel without CONFIG_NVME_TARGET_TCP_TLS

    def set_tsas(self, value: str) -> None:
        # Before the first subsystem link enables the port; the kernel then sets addr_treq to required.
        self.root.write(os.path.join(self.path, "addr_tsas"), value)

    def create(self, address: str, port: str) -> None:
        self.root.mkdir(self.path, children=("subsystems", "referrals", "ana_groups"))
        # Address attributes must be written before the first subsystem link enables the port.
        self.root.write(os.path.join(self.path, "addr_trtype"), "tcp")
        self.root.write(os.path.join(self.path, "addr_adrfam"), "ipv6" if ":" in address else "ipv4")
        self.root.write(os.path.join(self.path, "addr_traddr"), address)
        self.root.write(os.path.join(self.path, "addr_trsvcid"), port)

    def subsystems(self) -> list[str]:
        return sorted(_listdir(os.path.join(self.path, "subsystems")))

    def _ana(self, grpid: int) -> str:
        return os.path.join(self.path, "ana_groups", str(int(grpid)))

    def ana_groups(self) -> list[int]:
        return sorted(int(g) for g in _listdir(os.path.join(self.path, "ana_groups")) if g.isdigit())

    def add_ana_group(self, grpid: int, state: str = ANA_OPTIMIZED) -> None:
        """Create the group in `state`. The kernel starts a new group inaccessible (every port's
        groups but 1 are, until set; emulated the same): a namespace moved into it before the
        state is written has its hosts hold their I/O (lab: a live move's first 32 s)."""
        if not 2 <= grpid <= MAX_ANA_GROUP:
            raise NvmetError(f"ANA group {grpid} is outside 2..{MAX_ANA_GROUP} (1 is the default group)")
        path = self._ana(grpid)
        self.root.mkdir(path)
        if self.root.emulate and not os.path.exists(os.path.join(path, "ana_state")):
            self.root.write(os.path.join(path, "ana_state"), ANA_INACCESSIBLE)
        self.set_ana_state(grpid, state)

    def ana_state(self, grpid: int) -> str:
        return self.root.read(os.path.join(self._ana(grpid), "ana_state"))

    def set_ana_state(self, grpid: int, state: str) -> None:
        if state not in (ANA_OPTIMIZED, ANA_INACCESSIBLE):
            raise NvmetError(f"ANA state {state!r} is not one zvolt sets")
        self.root.write(os.path.join(self._ana(grpid), "ana_state"), state)

    def remove_ana_group(self, grpid: int) -> None:
        if grpid != 1:
            self.root.rmdir(self._ana(grpid))

    def links(self, nqn: str) -> bool:
        """Whether this one subsystem is linked here: one lookup, where subsystems() lists them all."""
        return os.path.islink(os.path.join(self.path, "subsystems", nqn))

    def add_subsystem(self, sub: Subsystem) -> None:
        link = os.path.join(self.path, "subsystems", sub.nqn)
        if not os.path.islink(link):
            os.symlink(sub.path, link)

    def remove_subsystem(self, nqn: str) -> None:
        link = os.path.join(self.path, "subsystems", nqn)
        if os.path.islink(link):
            os.unlink(link)

    def delete(self) -> None:
        for nqn in self.subsystems():
            self.remove_subsystem(nqn)
        if self.root.emulate:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.root.rmdir(self.path)

    def dump(self) -> dict[str, Any]:
        addr = {k: self._addr(k) for k in ("adrfam", "traddr", "treq", "trsvcid", "trtype")}
        return {"portid": self.portid, "addr": addr, "referrals": [], "subsystems": self.subsystems()}


def main(argv: list[str] | None = None) -> int:
    """`python -m agent.nvmet [ROOT]`: print the target configuration as nvmetcli JSON (read-only)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    root = Root(args[0] if args else DEFAULT_ROOT)
    print(json.dumps(root.dump(), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
