"""Activate and deactivate a volume's NVMe/TCP export, in the order lab.md found safe.

Export: device node present (volmode=dev set by the caller, waited for here) -> subsystem with
allow_any_host=0 -> namespace 1 (device, stable uuid/nguid) enabled -> allowed hosts -> port
link. Teardown is the reverse, and the caller sets volmode=none only after it: changing volmode
or destroying a zvol that is still an enabled namespace can hang in D state.

Revocation: removing a host from allowed_hosts only refuses its next connect; the controllers it
already has keep doing I/O (lab, kernel 6.12: reads and writes for minutes after). So every
removal from a subsystem that stays (and closing one found open to any host) is followed by
`reset_controllers`: all its controllers end, the removed host's reconnect is refused (with DNR:
the host deletes its controller and fails its I/O), the hosts still allowed reconnect after
their reconnect_delay with their I/O held, not failed. Removing the last host deletes the
subsystem, and unlinking it from the port ends its controllers the same way.

A live move (agent/moves.py) moves a published volume's path between nodes with native NVMe
multipath on the host: the target builds the same subsystem NQN with the same namespace ids, on
controller ids from the other half of the range (`prepare_incoming`), and each host connects to
it while the source still serves. At the cutover the source `fence`s: the volume's own ANA group
(`isolate` gave it one) turns inaccessible, so the hosts hold their I/O instead of failing it,
and its controllers are reset, so that no completion can reach a host after that point (every
write a host saw complete is in the zvol before the final snapshot). The target then enables its
namespace; the hosts see it appear on their second path and resume there.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent import nvmet
from agent.dhchap import HostKeys
from agent.zfs import Zfs
from zvolt import names, tlspsk
from zvolt.errors import internal
from zvolt.keyring import Keyring

_UUID_NS = uuid.UUID("6f1b7a52-3c0e-5d52-9a43-7a766f6c7431")


@dataclass(frozen=True)
class ExportConfig:
    node: str
    address: str
    port: str
    device_timeout: float = 60.0
    # NVMe/TCP TLS (zvolt/tlspsk.py): the port, on the same address, of the volumes published with a
    # TLS PSK. It requires TLS 1.3 (addr_tsas); their subsystems are linked there and nowhere else.
    tls_port: str = "4421"


def _serial(volume_id: str) -> str:
    return hashlib.sha256(volume_id.encode()).hexdigest()[:16]


def device_uuid(volume_id: str) -> str:
    return str(uuid.uuid5(_UUID_NS, "uuid:" + volume_id))


def device_nguid(volume_id: str) -> str:
    return str(uuid.uuid5(_UUID_NS, "nguid:" + volume_id))


class Homes(Protocol):
    """Which node a volume's CSI id names (agent/index.py): moved volumes keep their first node's."""

    def homes(self) -> dict[str, str]: ...
    def moved_away(self) -> set[str]: ...


class _OwnHomes:
    def homes(self) -> dict[str, str]:
        return {}

    def moved_away(self) -> set[str]:
        return set()


class Exports:
    def __init__(self, zfs: Zfs, root: nvmet.Root, cfg: ExportConfig,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 auth: HostKeys | None = None, require_auth: bool = False, keyring: Keyring | None = None) -> None:
        self.zfs = zfs
        self.keyring = keyring  # where the retained TLS PSKs of TLS hosts go (tlshd looks them up)
        self.auth = auth  # the keys of authenticated hosts: each is applied before its host is linked
        self.require_auth = require_auth  # --dhchap: no host without a key
        self.root = root
        self.cfg = cfg
        self._clock = clock
        self._sleep = sleep
        # Host groups are shared between subsystems: creating and pruning them must not interleave.
        self._mu = threading.Lock()
        # host NQN -> subsystems allowing it, so that dropping a host from one subsystem costs O(1)
        # in the number of exports (a scan of every subsystem per call made restore quadratic).
        # Loaded from configfs once; other writers' later links are not tracked, which is safe:
        # configfs refuses to remove a host group that a subsystem still links to.
        self._refs: dict[str, set[str]] | None = None
        self._index: Homes = _OwnHomes()
        # Volume id -> the node its id names, for the few volumes that moved here: nqn() is on
        # every request path and stays a dict lookup.
        self._homes: dict[str, str] = {}

    def attach(self, index: Homes) -> None:
        self._index = index
        self._homes = index.homes()

    def set_home(self, volume_id: str, home: str) -> None:
        """A volume moved here (home: the node its id names) or is gone ("")."""
        if home and home != self.cfg.node:
            self._homes[volume_id] = home
        else:
            self._homes.pop(volume_id, None)

    def nqn(self, volume_id: str) -> str:
        """A moved volume keeps the NQN its first node gave it (hosts find it by that name)."""
        return names.subsystem_nqn(self._homes.get(volume_id) or self.cfg.node, volume_id)

    def wait_device(self, dataset: str) -> None:
        """Poll for the zvol's device node with a deadline (udev adds /dev/zvol/... asynchronously)."""
        deadline = self._clock() + self.cfg.device_timeout
        delay = 0.005
        while not self.zfs.device_ready(dataset):
            if self._clock() > deadline:
                raise internal(f"device {self.zfs.device_path(dataset)} did not appear within "
                               f"{self.cfg.device_timeout:.0f}s after volmode=dev")
            self._sleep(delay)
            delay = min(delay * 2, 0.1)

    def export(self, volume_id: str, dataset: str, hosts: list[str], link: bool = True) -> bool:
        """Make the subsystem match `hosts` exactly (idempotent; repairs a half-built export).
        Returns whether it is a TLS export (its hosts have TLS PSKs).

        link=False leaves the port link to a later `link_all` (start-up restores every
        subsystem first: see there)."""
        self.wait_device(dataset)
        nqn = self.nqn(volume_id)
        device = self.zfs.device_path(dataset)
        with self._mu:
            sub = self.root.subsystem(nqn)
            sub.create()
            # Found open to any host (tampering): whoever connected meanwhile loses it below.
            was_open = sub.attr("allow_any_host") == "1"
            if sub.attr("allow_any_host") != "0":
                sub.set_attr("allow_any_host", "0")
            serial = _serial(volume_id)
            if sub.attr("serial") != serial and not sub.namespaces():
                # Cosmetic (stable serial per volume); some kernels refuse late changes.
                with contextlib.suppress(OSError):
                    sub.set_attr("serial", serial)
            ns = sub.namespace(1)
            ns.create()
            want = {"device_path": device, "device_uuid": device_uuid(volume_id),
                    "device_nguid": device_nguid(volume_id)}
            if not ns.enabled or any(ns.attr(k) != v for k, v in want.items()):
                if ns.enabled:
                    ns.set_attr("enable", "0")
                for k, v in want.items():
                    if ns.attr(k) != v:
                        ns.set_attr(k, v)
                ns.enable()
            tls = self._sync_hosts(sub, hosts, reset=was_open)
            if link:
                self._link(sub, tls)
            return tls

    def prepare_incoming(self, volume_id: str, hosts: list[str], source_cntlid_min: int) -> bool:
        """A live move's target: the volume's subsystem with its hosts and port link, but no
        namespace (its zvol is still being received); controller ids from the half of the range
        the source's subsystem does not use. Idempotent. Returns whether it is a TLS export."""
        low = nvmet.CNTLID_MIN if source_cntlid_min >= nvmet.CNTLID_HALF else nvmet.CNTLID_HALF
        high = nvmet.CNTLID_HALF - 1 if low == nvmet.CNTLID_MIN else nvmet.CNTLID_MAX
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            fresh = not sub.exists()
            sub.create()
            if sub.attr("allow_any_host") != "0":
                sub.set_attr("allow_any_host", "0")
            if fresh or sub.cntlid_range() != (low, high):
                sub.set_cntlid_range(low, high)
            if fresh:
                with contextlib.suppress(OSError):
                    sub.set_attr("serial", _serial(volume_id))
            tls = self._sync_hosts(sub, hosts)
            self._link(sub, tls)
            return tls

    def cntlid_range(self, volume_id: str) -> tuple[int, int]:
        return self.root.subsystem(self.nqn(volume_id)).cntlid_range()

    def _linked_ports(self, nqn: str) -> list[nvmet.Port]:
        return [p for p in (self.root.find_port(self.cfg.address, self.cfg.port),
                            self.root.find_port(self.cfg.address, self.cfg.tls_port)) if p is not None and p.links(nqn)]

    def isolate(self, volume_id: str) -> int:
        """Give the volume's namespace an ANA group of its own, optimized, on the ports it is
        linked to (a live move's start, while it serves as before). Idempotent. Returns the group."""
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            ns = sub.namespace(1)
            if not ns.exists():
                raise internal(f"volume {volume_id} has no NVMe namespace to move live")
            ports = self._linked_ports(sub.nqn)
            group = ns.ana_group if ns.ana_group != 1 else self._free_ana_group()
            for port in ports:
                if group not in port.ana_groups():
                    port.add_ana_group(group)
            if ns.ana_group != group:
                ns.set_ana_group(group)
            return group

    def fence(self, volume_id: str) -> None:
        """The cutover's first step on the source: the volume's hosts stop using this path and
        hold their I/O; its controllers end, so no completion of this path reaches a host after
        this returns. Needs `isolate` first (refused otherwise: fencing group 1 would fence every
        volume of the port). Idempotent."""
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            group = sub.namespace(1).ana_group if sub.exists() else 1
            if group == 1:
                raise internal(f"volume {volume_id} has no ANA group of its own: it cannot be fenced alone")
            for port in self._linked_ports(sub.nqn):
                if group not in port.ana_groups():
                    port.add_ana_group(group, nvmet.ANA_INACCESSIBLE)
                if port.ana_state(group) != nvmet.ANA_INACCESSIBLE:
                    port.set_ana_state(group, nvmet.ANA_INACCESSIBLE)
            sub.reset_controllers()

    def fence_unlinked(self, volume_id: str, tls: bool) -> int:
        """Start-up on the source of a live move that was fenced and frozen when the node went
        down (the ANA group lived in configfs): the export comes back fenced before it is linked,
        so a host that reconnects holds its I/O instead of failing it on the read-only zvol.
        Returns the group; the retried move or its abort goes on from here."""
        with self._mu:
            ns = self.root.subsystem(self.nqn(volume_id)).namespace(1)
            if not ns.exists():
                raise internal(f"volume {volume_id} has no NVMe namespace to fence")
            group = ns.ana_group if ns.ana_group != 1 else self._free_ana_group()
            port = self._port(tls)
            if group not in port.ana_groups():
                port.add_ana_group(group, nvmet.ANA_INACCESSIBLE)
            elif port.ana_state(group) != nvmet.ANA_INACCESSIBLE:
                port.set_ana_state(group, nvmet.ANA_INACCESSIBLE)
            if ns.ana_group != group:
                ns.set_ana_group(group)
            return group

    def _free_ana_group(self) -> int:
        used = {g for p in self.root.ports() for g in p.ana_groups()}
        free = [g for g in range(2, nvmet.MAX_ANA_GROUP + 1) if g not in used]
        if not free:
            raise internal(f"all {nvmet.MAX_ANA_GROUP - 1} ANA groups are taken by live moves under way: "
                           "let some finish first")
        return free[0]

    def unfence(self, volume_id: str) -> None:
        """Undo `isolate` and `fence` (a live move aborted): the volume serves on group 1 again."""
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            ns = sub.namespace(1)
            group = ns.ana_group if ns.exists() else 1
            if group == 1:
                return
            ns.set_ana_group(1)
            self._drop_ana_group(group)

    def _drop_ana_group(self, group: int) -> None:
        if group != 1:
            for port in self.root.ports():
                if group in port.ana_groups():
                    port.remove_ana_group(group)

    def _port(self, tls: bool) -> nvmet.Port:
        if tls:
            return self.root.find_or_create_port(self.cfg.address, self.cfg.tls_port, tsas="tls1.3")
        return self.root.find_or_create_port(self.cfg.address, self.cfg.port)

    def _link(self, sub: nvmet.Subsystem, tls: bool) -> None:
        """Link to the port of the volume's kind, then off the other one (a class switched since):
        a TLS volume is never reachable in the clear."""
        self._port(tls).add_subsystem(sub)
        other = self.root.find_port(self.cfg.address, self.cfg.port if tls else self.cfg.tls_port)
        if other is not None and other.links(sub.nqn):
            other.remove_subsystem(sub.nqn)

    def link_all(self, exported: dict[str, bool]) -> None:
        """Link already built subsystems to the port in one tight loop.

        The first link enables a (re)created port. A host that reconnects to a port whose
        subsystem is not linked yet gets "invalid subsystem" with DNR set, and the Linux host
        then deletes its controller instead of retrying (nvmf_should_reconnect). So after a
        reboot nothing is linked until every subsystem is complete. `exported`: volume id ->
        whether it is a TLS export, as `export` said.
        """
        with self._mu:
            for vid, tls in exported.items():
                sub = self.root.subsystem(self.nqn(vid))
                if sub.exists():
                    self._link(sub, tls)

    def _host_refs(self) -> dict[str, set[str]]:
        if self._refs is None:
            refs: dict[str, set[str]] = {}
            for sub in self.root.subsystems():
                for h in sub.allowed_hosts():
                    refs.setdefault(h, set()).add(sub.nqn)
            self._refs = refs
        return self._refs

    def _release_host(self, host: str, nqn: str) -> None:
        self._drop_psk(host, nqn)
        refs = self._host_refs()
        users = refs.get(host, set())
        users.discard(nqn)
        if not users:
            refs.pop(host, None)
            # Still linked by another writer's subsystem: configfs refuses, and it is not ours.
            with contextlib.suppress(OSError):
                self.root.host(host).delete()

    def _drop_psk(self, host: str, nqn: str) -> None:
        """The released host's TLS PSK for this subsystem leaves the keyring: no new handshake."""
        found = self.auth.load(host) if self.auth is not None else None
        if found is not None and found.tls_psk and self.keyring is not None:
            self.keyring.remove(tlspsk.identity(found.tls_psk, host, nqn))

    def _sync_hosts(self, sub: nvmet.Subsystem, hosts: list[str], reset: bool = False) -> bool:
        """Make allowed_hosts exactly `hosts`; end the controllers of any host removed (see the
        module docstring). reset=True ends them even when nothing is removed now: an unpublish
        retried after a failed reset finds the host already unlinked. Returns whether the hosts
        use TLS."""
        have = set(sub.allowed_hosts())
        tls = False
        if self.auth is not None:
            # Key before link: an allowed host must never be able to connect unauthenticated.
            for h in sorted(set(hosts)):
                found = self.auth.load(h)
                if found is None:
                    continue
                if found.secret:
                    host = self.root.host(h)
                    host.create()
                    self.auth.apply(host, found)
                if found.tls_psk:
                    if self.keyring is None:
                        raise internal("this storage node keeps no TLS PSKs (no .nvme keyring adapter)")
                    self.keyring.put(tlspsk.identity(found.tls_psk, h, sub.nqn), tlspsk.retained(found.tls_psk, h))
                    tls = True
        refs = self._host_refs()
        for h in sorted(set(hosts) - have):
            sub.allow_host(self.root.host(h))
            refs.setdefault(h, set()).add(sub.nqn)
        gone = sorted(have - set(hosts))
        for h in gone:
            sub.disallow_host(h)
        if gone or reset:
            # After the unlink, so that no removed host can come back in the reconnect.
            sub.reset_controllers()
        for h in gone:
            self._release_host(h, sub.nqn)
        return tls

    def set_hosts(self, volume_id: str, hosts: list[str], revoke: bool = False) -> None:
        """Allow exactly `hosts`. A host removed loses the controllers it has; revoke=True (an
        unpublish) ends the subsystem's controllers even if the removal happened before."""
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            if sub.exists():
                self._sync_hosts(sub, hosts, reset=revoke)

    def unexport(self, volume_id: str) -> None:
        with self._mu:
            sub = self.root.subsystem(self.nqn(volume_id))
            hosts = sub.allowed_hosts() if sub.exists() else []
            ns = sub.namespace(1)
            group = ns.ana_group if ns.exists() else 1
            sub.delete()
            self._drop_ana_group(group)  # a live move's, once its source lets go
            for h in hosts:
                self._release_host(h, sub.nqn)

    def prune_hosts(self) -> int:
        """Remove host groups no subsystem links to (left by a crash): one scan, at start-up."""
        with self._mu:
            self._refs = None
            refs = self._host_refs()
            removed = 0
            for host in self.root.hosts():
                if host.nqn not in refs:
                    with contextlib.suppress(OSError):
                        host.delete()
                        removed += 1
            return removed

    def revalidate(self, volume_id: str) -> None:
        ns = self.root.subsystem(self.nqn(volume_id)).namespace(1)
        if ns.exists() and ns.enabled:
            ns.set_attr("revalidate_size", "1")

    def exported_ids(self) -> set[str]:
        """Volume ids of this node's subsystems present in configfs (only active volumes: small).

        Ours: an NQN under this node's name, unless the volume moved away (its subsystem, if one
        exists, is the new holder's: nodes that share a configfs, as in the lab); and the NQN of
        each volume that moved here under its first node's name. Reads the moved rows: start-up only."""
        prefix = names.subsystem_nqn(self.cfg.node, "x")[:-1]
        away = self._index.moved_away()
        theirs = {names.subsystem_nqn(home, vid): vid for vid, home in self._homes.items()}
        found = set()
        for sub in self.root.subsystems():
            if sub.nqn in theirs:
                found.add(theirs[sub.nqn])
            elif sub.nqn.startswith(prefix) and sub.nqn.removeprefix(prefix) not in away:
                found.add(sub.nqn.removeprefix(prefix))
        return found

    def condition(self, volume_id: str, dataset: str, hosts: list[str]) -> tuple[bool, str]:
        """Does configfs + the device match the stored publish state? (healthy, why not)."""
        sub = self.root.subsystem(self.nqn(volume_id))
        if not hosts:
            if sub.exists():
                return False, "volume is not published but its NVMe subsystem still exists"
            return True, ""
        if not sub.exists():
            return False, "volume is published but its NVMe subsystem is missing"
        if sub.attr("allow_any_host") != "0":
            return False, "NVMe subsystem allows any host (allow_any_host is not 0): access control is off"
        # Each host's kept keys, read once here for every check below (one file per host).
        kept = {h: self.auth.load(h) for h in hosts} if self.auth is not None else {}
        keyless = [h for h, found in kept.items() if (self.require_auth or (found is not None and found.secret))
                   and not self.root.host(h).attr("dhchap_key")]
        if keyless:
            return False, f"allowed host {keyless[0]} has no DH-HMAC-CHAP key on the target"
        ns = sub.namespace(1)
        if not ns.exists() or not ns.enabled:
            return False, "NVMe namespace 1 is missing or disabled"
        if ns.attr("device_path") != self.zfs.device_path(dataset):
            return False, f"namespace device is {ns.attr('device_path')!r}, expected the volume's zvol"
        if not self.zfs.device_ready(dataset):
            return False, "zvol device node is missing"
        if sorted(sub.allowed_hosts()) != sorted(hosts):
            return False, f"allowed hosts {sub.allowed_hosts()} differ from published hosts {sorted(hosts)}"
        psks = {h: found.tls_psk for h, found in kept.items() if found is not None and found.tls_psk}
        tls = bool(psks)
        if self.keyring is not None:
            missing = [h for h, psk in psks.items() if not self.keyring.has(tlspsk.identity(psk, h, sub.nqn))]
            if missing:
                return False, f"allowed host {missing[0]} has no TLS PSK in the .nvme keyring"
        port = self.root.find_port(self.cfg.address, self.cfg.tls_port if tls else self.cfg.port)
        # Look up this one link, never list the port: the port links every export, and a listing
        # made each idempotent publish and GetVolume O(exports) (bench: zvolt-bench restore).
        if port is None or not port.links(sub.nqn):
            return False, f"subsystem is not linked to the NVMe/TCP {'TLS ' if tls else ''}port"
        if tls and port.tsas != "tls1.3":
            return False, f"the TLS port {self.cfg.tls_port} does not require TLS 1.3 (addr_tsas is {port.tsas!r})"
        if tls:
            plain = self.root.find_port(self.cfg.address, self.cfg.port)
            if plain is not None and plain.links(sub.nqn):
                return False, f"TLS volume's subsystem is also linked to the clear-text port {self.cfg.port}"
        return True, ""
