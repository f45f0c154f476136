"""Several storage nodes on real ZFS: two (ZVOLT_LAB_NODES=3: three) storage guests, each with
its own pool and agent, on one storage network (lab/cluster.py). The CSI controller runs on the
host, as in production, and places volumes on them over the agents' forwarded gRPC ports.

The PVC placement records the controller reads for groupSpread live on PVCs in a cluster; here
an in-memory store stands in for the API server (tests/unit/memrecords.py). Everything else is
real: agents, ZFS, and `zfs list` in each guest shows where each volume landed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from lab import cluster, control, hostpkgs
from lab.guest import POOL, STORAGE_NS
from lab.paths import Cache, instance_from_env
from tests.unit.memrecords import MemoryGroupRecords
from zvolt.errors import ZvoltError
from zvolt.names import split_volume_id
from zvolt.pb import agent_pb2, agent_pb2_grpc, csi_pb2

# slow: two or three guests at once (7-12 min with boots under TCG); kept out of the default run
# after its first CI run here, beside other guests, failed (closing note of 2026-12-06).
# Run: python -m pytest tests/lab/test_multinode_lab.py
pytestmark = [pytest.mark.lab, pytest.mark.slow]

GiB = 1 << 30
MiB = 1 << 20
T = 180  # per-RPC deadline under TCG
PARENT = f"{POOL}/zvolt"
HEAVY = 12 * GiB  # thin, never written: commitment only (each pool is ~15.5 GiB)
FILLER_MIB = 256  # written on the other node: it has less free space, but nothing promised
NAMESPACE = "lab-multi"


def loopback_multicast() -> str:
    """'' if UDP multicast works on 127.0.0.1 here (the storage network needs it), else why not."""
    group, port = "239.255.42.250", 0
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            rx.bind((group, port))
            port = rx.getsockname()[1]
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                          struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("127.0.0.1")))
            rx.settimeout(2)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            tx.sendto(b"zvolt", (group, port))
            return "" if rx.recv(16) == b"zvolt" else "multicast on 127.0.0.1 delivered something else"
    except OSError as exc:
        return f"multicast on 127.0.0.1 does not work here: {exc}"


def host_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


@dataclass
class Env:
    members: list[cluster.Member]
    ctrl: ControllerService
    records: MemoryGroupRecords
    pool: AgentPool

    def member(self, node: str) -> cluster.Member:
        return next(m for m in self.members if m.node == node)

    def agent(self, node: str) -> agent_pb2_grpc.AgentStub:
        return agent_pb2_grpc.AgentStub(grpc.insecure_channel(self.member(node).lab.grpc_target("agent")))

    def zfs_volumes(self, node: str) -> dict[str, int]:
        """Volume id -> volsize of every zvolt volume on the node's pool, read from ZFS."""
        out = self.member(node).lab.run(["zfs", "list", "-H", "-p", "-t", "volume", "-o", "name,volsize",
                                         "-r", f"{PARENT}/v"], timeout=T, check=False).stdout
        found = {}
        for line in out.splitlines():
            name, size = line.split("\t")
            found[name.removeprefix(f"{PARENT}/v/")] = int(size)
        return found

    def show(self, title: str) -> dict[str, dict[str, int]]:
        where = {m.node: self.zfs_volumes(m.node) for m in self.members}
        print(f"\n{title}: zfs list -t volume in each guest", flush=True)
        for node, vols in where.items():
            for vid, size in sorted(vols.items()):
                print(f"  {node}: {PARENT}/v/{vid} volsize {size}", flush=True)
        return where


@pytest.fixture(scope="module")
def storage_cluster() -> Iterator[list[cluster.Member]]:
    with booted_cluster() as members:
        yield members


@contextlib.contextmanager
def booted_cluster(multipath: bool = False) -> Iterator[list[cluster.Member]]:
    """ZVOLT_LAB_NODES storage guests (default 2), booted or reused; skips where the host cannot."""
    ok, why = hostpkgs.qemu_available()
    if not ok:
        pytest.skip(f"lab tests need qemu: {why}")
    if why := loopback_multicast():
        pytest.skip(f"the lab's storage network needs it: {why}")
    nodes = int(os.environ.get("ZVOLT_LAB_NODES", "2"))
    need = nodes * (cluster.CLUSTER_MEMORY_MB + 512)
    if host_memory_mb() < need:
        pytest.skip(f"{nodes} storage guests need ~{need} MiB of host memory; {host_memory_mb()} MiB available")
    cache = Cache.from_env()
    opts = control.UpOptions(memory_mb=cluster.CLUSTER_MEMORY_MB, multipath=multipath)
    t0 = time.monotonic()
    try:
        members = cluster.up(cache, instance_from_env(), nodes, opts, sys.stderr)
    except control.LabError as exc:
        pytest.skip(f"the lab could not boot {nodes} storage guests here: {exc}")
    print(f"\n{nodes} storage guests up in {time.monotonic() - t0:.1f} s "
          f"({cluster.CLUSTER_MEMORY_MB} MiB each)", flush=True)
    yield members
    if os.environ.get("ZVOLT_LAB_KEEP") != "1":
        cluster.down(cache, [m for m in members if m.booted], sys.stderr)


@pytest.fixture(scope="module")
def env(storage_cluster: list[cluster.Member]) -> Iterator[Env]:
    """The controller on the host, and a skew: the node first in name order holds a big thin
    volume (committed, not written); the next one has data written outside zvolt (less free
    space, nothing promised). By free space alone the first would take the next volumes."""
    spec = ",".join(f"{m.node}={m.lab.grpc_target('agent')}" for m in storage_cluster)
    pool = AgentPool(lambda: parse_static(spec), tls=None, timeout=T)
    records = MemoryGroupRecords()
    e = Env(storage_cluster, ControllerService(pool, records=records), records, pool)
    heavy_node, filled = storage_cluster[0], storage_cluster[1]
    heavy = e.agent(heavy_node.node).CreateVolume(
        agent_pb2.CreateVolumeRequest(name=f"lab-multi-heavy-{uuid.uuid4().hex[:8]}", size_bytes=HEAVY), timeout=T
    ).volume
    filled.lab.run(["zfs", "create", "-p", f"{POOL}/filler"], timeout=T)
    filled.lab.run(["dd", "if=/dev/urandom", f"of=/{POOL}/filler/data", "bs=1M", f"count={FILLER_MIB}",
                    "conv=fsync", "status=none"], timeout=600)
    filled.lab.run(["zpool", "sync", POOL], timeout=T)
    try:
        yield e
    finally:
        e.agent(heavy_node.node).DeleteVolume(agent_pb2.DeleteVolumeRequest(volume_id=heavy.id), timeout=T)
        filled.lab.run(["zfs", "destroy", "-r", f"{POOL}/filler"], timeout=T, check=False)
        pool.close()


def cap() -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)


def request(pvc: str, spread: str = "") -> csi_pb2.CreateVolumeRequest:
    par = {"csi.storage.k8s.io/pvc/name": pvc, "csi.storage.k8s.io/pvc/namespace": NAMESPACE}
    if spread:
        par["groupSpread"] = spread
    return csi_pb2.CreateVolumeRequest(name=f"pvc-{uuid.uuid4()}", volume_capabilities=[cap()], parameters=par,
                                       capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))


@contextlib.contextmanager
def volumes(e: Env) -> Iterator[list[str]]:
    made: list[str] = []
    try:
        yield made
    finally:
        for vid in made:
            e.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), None)


def create(e: Env, made: list[str], req: csi_pb2.CreateVolumeRequest) -> tuple[str, str]:
    """(storage node, agent-local id) of the new volume."""
    vol = e.ctrl.CreateVolume(req, None).volume
    if vol.volume_id not in made:
        made.append(vol.volume_id)
    return split_volume_id(vol.volume_id)


def test_placement_spreads_by_free_and_committed_space(env: Env) -> None:
    heavy, filled = env.members[0].node, env.members[1].node
    caps = {m.node: env.agent(m.node).GetCapacity(agent_pb2.GetCapacityRequest(), timeout=T) for m in env.members}
    print("\ncapacity before: " + "; ".join(
        f"{n}: free {c.available_bytes / GiB:.2f} GiB, committed {c.committed_bytes / GiB:.2f} GiB"
        for n, c in caps.items()), flush=True)
    assert caps[heavy].available_bytes > caps[filled].available_bytes  # free space alone would pick `heavy`
    t0 = time.monotonic()
    with volumes(env) as made:
        env.ctrl.capacity.expire()
        placed = [create(env, made, request(f"spread-{i}")) for i in range(3)]
        took = time.monotonic() - t0
        where = env.show("after 3 creates of 1 GiB")
        for node, vid in placed:
            assert where[node].get(vid) == GiB, f"{vid} is not on {node} in ZFS"
        on = [node for node, _ in placed]
        print(f"placed on {on} in {took:.1f} s", flush=True)
        assert heavy not in on, f"the committed-heavy node {heavy} got {on.count(heavy)} of 3"
        if len(env.members) == 2:
            assert on == [filled] * 3


def test_a_group_lands_on_distinct_nodes_and_an_ungrouped_volume_does_not_care(env: Env) -> None:
    nodes = [m.node for m in env.members]
    heavy = nodes[0]
    with volumes(env) as made:
        env.ctrl.capacity.expire()
        first = create(env, made, request("data-pg-0", "required"))
        second_req = request("data-pg-1", "required")
        second = create(env, made, second_req)
        assert first[0] != heavy  # the most room after promises
        assert second[0] != first[0], f"data-pg-0 and data-pg-1 both on {first[0]}"
        # Without the group rule the same node takes the next volume: it does not care.
        loner = create(env, made, request("data-pg-2"))
        assert loner[0] == first[0]
        members = [first, second]
        if len(nodes) > 2:
            third = create(env, made, request("data-pg-3", "required"))
            assert third[0] not in {first[0], second[0]}
            members.append(third)
        # Every node holds a member now: one more is refused, naming them, and nothing is made.
        before = {n: set(env.zfs_volumes(n)) for n in nodes}
        with pytest.raises(ZvoltError) as err:
            env.ctrl.CreateVolume(request("data-pg-9", "required"), None)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"holding one already: {', '.join(sorted(nodes))};" in err.value.message, err.value.message
        print(f"refused: {err.value.message}", flush=True)
        # A retried create lands where its record says.
        assert create(env, made, second_req) == second
        where = env.show("group data-pg (required) and one ungrouped volume")
        assert {n: set(v) for n, v in where.items()} == before
        for node, vid in [*members, loner]:
            assert vid in where[node], f"{vid} is not on {node} in ZFS"
        labels = env.member(second[0]).lab.run(
            ["zfs", "get", "-H", "-o", "value", "zvolt:label:pvc-name", f"{PARENT}/v/{second[1]}"], timeout=T)
        assert labels.stdout.strip() == "data-pg-1"
        # The group put its last member on the node placement ranks last (the committed-heavy one).
        assert heavy in {node for node, _ in members}


def test_storage_guests_reach_each_other_on_the_storage_network(storage_cluster: list[cluster.Member]) -> None:
    """What the agents will stream ZFS send/receive over: each guest's storage netns reaches the
    next guest's storage-network address (TCP, 8 MiB through socat; the rate is printed)."""
    ips = cluster.storage_ips(storage_cluster)
    a, b = storage_cluster[0], storage_cluster[1]
    port = "9977"
    b.lab.run(["systemd-run", "--unit", "zvolt-lab-sink", "--collect", "--quiet", "-p",
               f"NetworkNamespacePath=/run/netns/{STORAGE_NS}", "--", "timeout", "120", "socat", "-u",
               f"TCP-LISTEN:{port},bind={ips[b.node]},reuseaddr", "OPEN:/dev/null"], timeout=60)
    try:
        t0 = time.monotonic()
        deadline = t0 + 60
        while True:
            sent = a.lab.run(["sh", "-c", f"head -c {8 * MiB} /dev/zero | socat -u STDIN TCP:{ips[b.node]}:{port}"],
                             netns=STORAGE_NS, timeout=120, check=False)
            if sent.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)  # the listener may not be up yet
        assert sent.returncode == 0, sent.stderr
        print(f"\nstorage network {a.node} {ips[a.node]} -> {b.node} {ips[b.node]}: 8 MiB in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    finally:
        b.lab.run(["systemctl", "stop", "zvolt-lab-sink"], timeout=30, check=False)
