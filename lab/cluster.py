"""A lab cluster: N storage guests, each with its own pool and agent, on one storage network.

Guest i is lab instance `<base>` (i = 0) or `<base><i+1>`, its agent is storage node
`storage-<i>`, and it has storage-network address 10.45.0.<i+1> in its storage netns (a qemu
multicast NIC on 127.0.0.1, lab.qemu.StorageNet), so agents can reach each other directly. The
guests boot at once; a CSI controller on the host reaches each agent over its forwarded port.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TextIO

from lab import control, guest, qemu
from lab.guest import Lab
from lab.paths import Cache, check_instance

MAX_NODES = 3
# Measured 2026-12-06 (TCG, 2 host cores shared by 2 guests): boots, imports its pool and runs the agent.
CLUSTER_MEMORY_MB = 2048


def instances(base: str, nodes: int) -> list[str]:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"a lab cluster has 1 to {MAX_NODES} storage guests, not {nodes}")
    return [check_instance(base if i == 0 else f"{base}{i + 1}") for i in range(nodes)]


def node_name(index: int) -> str:
    return f"storage-{index}"


class _Prefixed(io.TextIOBase):
    """Writes whole lines to `out`, each prefixed with the guest's instance (boots run in threads)."""

    def __init__(self, out: TextIO, prefix: str, lock: threading.Lock) -> None:
        self._out, self._prefix, self._lock, self._partial = out, prefix, lock, ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        with self._lock:
            for line in lines:
                self._out.write(f"[{self._prefix}] {line}\n")
            self._out.flush()
        return len(text)


@dataclass(frozen=True)
class Member:
    instance: str
    lab: Lab
    booted: bool  # False: a running guest was reused (whoever booted it stops it)

    @property
    def node(self) -> str:
        return self.lab.node_name


def _storage_net(cache: Cache, names: list[str]) -> int:
    """The cluster's multicast port: the one its running guests use, else a fresh one."""
    for name in names:
        st = control.running_state(cache, name)
        net = control.storage_net_of(st) if st is not None else None
        if net is not None:
            return net.port
    return qemu.free_udp_port()


def up(cache: Cache, base: str, nodes: int, opts: control.UpOptions, out: TextIO) -> list[Member]:
    """Boot (or reuse) every storage guest at once and start each one's agent. On failure the
    guests this call booted are stopped again (unless ZVOLT_LAB_KEEP=1, as for one guest)."""
    names = instances(base, nodes)
    port = _storage_net(cache, names)
    lock = threading.Lock()

    def one(index: int) -> control.UpResult:
        mine = replace(opts, services=False, node_name=node_name(index),
                       storage_net=qemu.StorageNet(port=port, index=index))
        res = control.up_result(cache, names[index], mine, _Prefixed(out, names[index], lock))  # type: ignore[arg-type]
        try:
            if opts.services and not res.lab.service_running("agent"):
                res.lab.start_agent()  # in this thread too: agent start-ups overlap like the boots
        except BaseException:
            if res.booted:
                control.down(cache, names[index], out)
            raise
        return res

    with ThreadPoolExecutor(max_workers=nodes) as pool:
        futures = [pool.submit(one, i) for i in range(nodes)]
    members, errors = [], []
    for name, fut in zip(names, futures, strict=True):
        try:
            res = fut.result()
        except BaseException as exc:  # collected: the first is raised below, after the rest are known
            errors.append(exc)
            continue
        members.append(Member(instance=name, lab=res.lab, booted=res.booted))
    if errors:
        down(cache, [m for m in members if m.booted], out)
        raise errors[0]
    return members


def down(cache: Cache, members: list[Member], out: TextIO) -> None:
    for m in members:
        control.down(cache, m.instance, out)


def down_all(cache: Cache, base: str, out: TextIO) -> list[str]:
    """Stop every guest of the cluster named base (whatever its size). Returns those that ran."""
    stopped = []
    for name in instances(base, MAX_NODES):
        if control.down(cache, name, out):
            stopped.append(name)
    return stopped


@contextlib.contextmanager
def running(cache: Cache, base: str, nodes: int, opts: control.UpOptions, out: TextIO) -> Iterator[list[Member]]:
    """The cluster for a block of work: guests it booted are stopped afterwards."""
    members = up(cache, base, nodes, opts, out)
    try:
        yield members
    finally:
        down(cache, [m for m in members if m.booted], out)


def storage_ips(members: list[Member]) -> dict[str, str]:
    """Storage node name -> its address on the storage network."""
    return {m.node: guest.storage_net_ip(i) for i, m in enumerate(members)}
