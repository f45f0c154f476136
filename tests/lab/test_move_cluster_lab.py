"""A moved volume keeps its CSI ids, on two storage guests (lab/cluster.py) with real ZFS.

The controller runs on the host as in production. A volume is created, written and snapshotted
through CSI, moved by the one-shot entry point `zvolt-csi --mode move` (what `kubectl zvolt move`
runs in the controller container), and then every CSI call goes by the OLD ids: the controller
follows the tombstone the source keeps (csi/locator.py). Last, the source storage node is removed
for good (its agent stopped, gone from discovery): the ids still resolve, by asking the other
agents once, and deleting by them removes the moved copy.

Run: ZVOLT_LAB_NAME=wire pytest tests/lab/test_move_cluster_lab.py -m lab -s
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator

import pytest

import csi.main
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from lab import cluster
from lab.guest import POOL, unit_name
from tests.lab.test_multinode_lab import storage_cluster  # noqa: F401 - the fixture, booted here too
from zvolt.names import split_volume_id
from zvolt.pb import csi_pb2

# slow: two or three guests at once (7-12 min with boots under TCG); kept out of the default run
# after its first CI run here, beside other guests, failed (closing note of 2026-12-06).
# Run: python -m pytest tests/lab/test_move_cluster_lab.py
pytestmark = [pytest.mark.lab, pytest.mark.slow]

MiB = 1 << 20
GiB = 1 << 30
T = 180  # per-RPC deadline under TCG
DATA_MIB = 64
MOVE_PORT = 7011

# In a guest: make the zvol a device for a moment, write or read its first DATA_MIB, print a hash.
ZVOL_IO = """
import hashlib, os, subprocess, sys, time
ds, write = sys.argv[1], sys.argv[2] == "write"
subprocess.run(["zfs", "set", "volmode=dev", ds], check=True)
dev = "/dev/zvol/" + ds
try:
    for _ in range(300):
        subprocess.run(["udevadm", "settle"], check=False)
        if os.path.exists(dev):
            break
        time.sleep(0.2)
    n = int(sys.argv[3]) << 20
    if write:
        data = os.urandom(n)
        with open(dev, "r+b", buffering=0) as f:
            f.write(data)
            os.fsync(f.fileno())
    with open(dev, "rb", buffering=0) as f:
        got = f.read(n)
    print(hashlib.sha256(got).hexdigest())
finally:
    subprocess.run(["udevadm", "settle"], check=False)
    subprocess.run(["zfs", "set", "volmode=none", ds], check=True)
"""


def zvol_io(member: cluster.Member, vid: str, write: bool) -> str:
    ds = f"{POOL}/zvolt/v/{vid}"
    out = member.lab.run(["python3", "-c", ZVOL_IO, ds, "write" if write else "read", str(DATA_MIB)], timeout=600)
    return str(out.stdout.strip().splitlines()[-1])


def volumes_on(member: cluster.Member, vid: str) -> list[str]:
    out = member.lab.run(["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", f"{POOL}/zvolt"], timeout=T,
                         check=False).stdout
    return [line for line in out.splitlines() if vid in line]


@pytest.fixture(scope="module")
def members(storage_cluster: list[cluster.Member]) -> Iterator[list[cluster.Member]]:  # noqa: F811
    """Each agent's move port on its own storage-network address (the default, the NVMe/TCP
    listen address, is the same 10.42.0.1 in every guest)."""
    ips = cluster.storage_ips(storage_cluster)
    for m in storage_cluster:
        m.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
        m.lab.start_agent("--move-listen", f"{ips[m.node]}:{MOVE_PORT}")
    yield storage_cluster
    for m in storage_cluster:  # as the cluster fixture left them
        m.lab.run(["systemctl", "stop", unit_name("agent")], timeout=T, check=False)
        m.lab.start_agent()


def spec(members: list[cluster.Member]) -> str:
    return ",".join(f"{m.node}={m.lab.grpc_target('agent')}" for m in members)


def cap() -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)


def create(ctl: ControllerService, name: str, snapshot_id: str = "") -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap()],
                                      capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))
    if snapshot_id:
        req.volume_content_source.snapshot.snapshot_id = snapshot_id
    made: csi_pb2.Volume = ctl.CreateVolume(req, None).volume
    return made


def test_old_ids_follow_a_moved_volume_also_after_its_source_is_removed(members: list[cluster.Member]) -> None:
    by_node = {m.node: m for m in members}
    pool = AgentPool(lambda: parse_static(spec(members)), tls=None, timeout=T)
    ctl = ControllerService(pool)
    stamp = str(int(time.time()))
    vol = create(ctl, f"pvc-move-{stamp}")
    home, vid = split_volume_id(vol.volume_id)
    target = next(m.node for m in members if m.node != home)
    made = [vol.volume_id]
    try:
        written = zvol_io(by_node[home], vid, write=True)
        snap = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name=f"snap-move-{stamp}",
                                                                source_volume_id=vol.volume_id), None).snapshot
        out = io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out):
            code = csi.main.main(["--mode=move", f"--agents={spec(members)}", "--insecure", "--log-level=error",
                                  f"--volume-id={vol.volume_id}", f"--to={target}"])
        took = time.monotonic() - t0
        print(f"\n{out.getvalue()}one-shot move: exit {code} in {took:.1f} s", flush=True)
        assert code == 0
        assert volumes_on(by_node[home], vid) == [], "the source's copy must be gone"
        assert zvol_io(by_node[target], vid, write=False) == written

        got = ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), None)
        assert got.volume.volume_id == vol.volume_id
        assert got.volume.volume_context["zvolt.io/storage-node"] == target
        restore = create(ctl, f"pvc-restore-{stamp}", snap.snapshot_id)
        made.append(restore.volume_id)
        assert split_volume_id(restore.volume_id)[0] == target
        assert restore.content_source.snapshot.snapshot_id == snap.snapshot_id
        assert zvol_io(by_node[target], split_volume_id(restore.volume_id)[1], write=False) == written
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restore.volume_id), None)
        made.remove(restore.volume_id)

        # The source node is removed for good: its agent stops, and discovery no longer lists it.
        by_node[home].lab.run(["systemctl", "stop", unit_name("agent")], timeout=T)
        only = AgentPool(lambda: parse_static(spec([by_node[target]])), tls=None, timeout=T)
        try:
            fresh = ControllerService(only)  # no cache: found by asking the agents there are
            t0 = time.monotonic()
            got = fresh.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), None)
            print(f"resolved {vol.volume_id} without its home in {time.monotonic() - t0:.2f} s", flush=True)
            assert got.volume.volume_id == vol.volume_id
            again = create(fresh, f"pvc-restore2-{stamp}", snap.snapshot_id)
            assert split_volume_id(again.volume_id)[0] == target
            fresh.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=again.volume_id), None)
            fresh.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), None)
            fresh.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), None)
            made.remove(vol.volume_id)
            assert volumes_on(by_node[target], vid) == [], "deleting by the old id removes the moved copy"
        finally:
            only.close()
    finally:
        for left in made:
            with contextlib.suppress(Exception):
                ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=left), None)
        pool.close()


RAW_PORT = 7098  # the raw baseline's socat listener on the target's storage-network address


def test_an_idle_move_between_two_guests_against_a_raw_send_receive(members: list[cluster.Member]) -> None:
    """Issue 17's bar: an offline move of written data at >= 0.8x the throughput of a raw
    `zfs send -R | zfs receive` of the same snapshot between the same two guests, over the same
    storage network (socat in the agents' network namespace; no token, no TLS, no steps). Both are
    timed on the host around their commands, so each carries its ssh or gRPC round trips."""
    from csi import moves
    from zvolt.pb import agent_pb2 as pb

    by_node = {m.node: m for m in members}
    src, dst = by_node["storage-0"], by_node["storage-1"]
    ips = cluster.storage_ips(members)
    pool = AgentPool(lambda: parse_static(spec(members)), tls=None, timeout=T)
    source, target = pool.get(src.node), pool.get(dst.node)
    vid = source.call("CreateVolume", pb.CreateVolumeRequest(name=f"pvc-thr-{int(time.time())}",
                                                             size_bytes=4 * DATA_MIB * MiB), timeout=T).volume.id
    ds = f"{POOL}/zvolt/v/{vid}"
    raw_copy = f"{POOL}/rawcopy"
    try:
        written = zvol_io(src, vid, write=True)
        src.lab.run(["zfs", "snapshot", f"{ds}@raw"], timeout=T)
        receiving: dict[str, float] = {}

        def receive() -> None:
            dst.lab.run(["sh", "-c", f"socat -u TCP-LISTEN:{RAW_PORT},bind={ips[dst.node]},reuseaddr - "
                         f"| zfs receive {raw_copy}"], netns="storage", timeout=900)
            receiving["done"] = time.monotonic()

        listener = threading.Thread(target=receive, daemon=True)
        listener.start()
        for _ in range(100):
            ss = dst.lab.run(["ss", "-ltn", f"sport = :{RAW_PORT}"], netns="storage", timeout=T).stdout
            if f":{RAW_PORT}" in ss:
                break
            time.sleep(0.3)
        t0 = time.monotonic()
        src.lab.run(["sh", "-c", f"zfs send -R {ds}@raw | socat -u - TCP:{ips[dst.node]}:{RAW_PORT}"],
                    netns="storage", timeout=900)
        listener.join(900)
        raw = receiving["done"] - t0
        sent = int(src.lab.run(["zfs", "get", "-Hp", "-o", "value", "referenced", f"{ds}@raw"], timeout=T).stdout)
        dst.lab.run(["zfs", "destroy", "-r", raw_copy], timeout=T)
        src.lab.run(["zfs", "destroy", f"{ds}@raw"], timeout=T)

        t0 = time.monotonic()
        result = moves.move(source, target, vid)
        took = time.monotonic() - t0
        assert zvol_io(dst, vid, write=False) == written
        lines = [ln for ln in dst.lab.service_log("agent", 120).splitlines()
                 if "move stream received" in ln and vid in ln]
        stream = max(json.loads(ln[ln.index("{"):])["seconds"] for ln in lines)
        print(f"\nIDLE MOVE between two guests: {sent / MiB:.0f} MiB referenced; raw send|receive {raw:.2f} s "
              f"({sent / MiB / raw:.2f} MiB/s); move {took:.2f} s for {result.bytes / MiB:.0f} MiB in "
              f"{result.streams} stream(s), its stream {stream:.2f} s; throughput vs raw: whole move "
              f"{raw / took:.2f}x, stream {raw / stream:.2f}x (bar >= 0.8x)", flush=True)
        assert raw / took >= 0.8, "an idle move is slower than 0.8x a raw send|receive of the same data"
    finally:
        with contextlib.suppress(Exception):
            dst.lab.run(["zfs", "destroy", "-r", raw_copy], timeout=T, check=False)
        for agent in (target, source):
            with contextlib.suppress(Exception):
                agent.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid), timeout=T)
        pool.close()
