"""After a move, the old ids keep working: the node a volume left answers every call on it with
Moved (agent/volumes.py `not_moved_away`), and the controller follows it (csi/locator.py).

Two real agent servicers on their fakes, each with its own FakeZfs (two machines), moved between
by csi/moves.py over a real localhost stream; the controller reaches them over gRPC.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.moves import SendServer
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from csi import moves as orchestrator
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.group_controller import GroupControllerService
from tests.unit.directagent import Direct
from zvolt.errors import Moved, ZvoltError
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import csi_pb2

MiB = 1 << 20
GiB = 1 << 30
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
KEY = b"k" * 32
Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


# -- the agent: a tombstone answers Moved -----------------------------------------------------


@dataclass
class Moved2:
    a: FakeNode
    b: FakeNode
    vid: str
    snaps: list[str]


@pytest.fixture
def moved_away(tmp_path: Any) -> Iterator[Moved2]:
    nodes, servers = [], []
    for name, pool in (("storage-a", "tanka"), ("storage-b", "tankb")):
        node = make_node(str(tmp_path / name / "state"), str(tmp_path / name / "configfs"), node=name, pool=pool)
        server = SendServer(node.moves, "127.0.0.1:0")
        server.start()
        nodes.append(node)
        servers.append(server)
    a, b = nodes
    vol = a.volumes.create_volume(VolumeSpec(name="pvc-move", size=64 * MiB))
    snaps = [a.volumes.create_snapshot(f"snap-{i}", vol.id).id for i in range(2)]
    orchestrator.move(Direct(a), Direct(b), vol.id)
    yield Moved2(a, b, vol.id, snaps)
    for s in servers:
        s.close()


def _calls(m: Moved2) -> dict[str, Callable[[], Any]]:
    """Every volume call of the node the volume left, on the moved volume's ids."""
    v, vid, sid = m.a.volumes, m.vid, m.snaps[0]
    return {
        "DeleteVolume": lambda: v.delete_volume(vid),
        "ExpandVolume": lambda: v.expand_volume(vid, 128 * MiB),
        "ModifyVolume": lambda: v.modify_volume(vid, compression="zstd"),
        "PublishVolume": lambda: v.publish(vid, HOST),
        "UnpublishVolume": lambda: v.unpublish(vid, HOST),
        "CreateSnapshot": lambda: v.create_snapshot("snap-new", vid),
        "DeleteSnapshot": lambda: v.delete_snapshot(sid),
        "ListSnapshots by volume": lambda: v.list_snapshots(0, "", source_volume=vid),
        "ListSnapshots by id": lambda: v.list_snapshots(0, "", snapshot_id=sid),
        "CreateVolume again": lambda: v.create_volume(VolumeSpec(name="pvc-move", size=64 * MiB)),
        "CreateVolume from snapshot": lambda: v.create_volume(
            VolumeSpec(name="pvc-restore", size=64 * MiB, source_snapshot=sid)),
        "CreateVolume from volume": lambda: v.create_volume(
            VolumeSpec(name="pvc-clone", size=64 * MiB, source_volume=vid)),
        "RotateKey": lambda: v.rotate_key(vid, KEY, KEY[::-1]),
        "GetVolume (plain)": lambda: v.get_volume(vid),
        "CreateSnapshotGroup": lambda: Direct(m.a).servicer.groups.create("group-1", [vid]),
    }


CALLS = ("DeleteVolume", "ExpandVolume", "ModifyVolume", "PublishVolume", "UnpublishVolume", "CreateSnapshot",
         "DeleteSnapshot", "ListSnapshots by volume", "ListSnapshots by id", "CreateVolume again",
         "CreateVolume from snapshot", "CreateVolume from volume", "RotateKey", "GetVolume (plain)",
         "CreateSnapshotGroup")


@pytest.mark.parametrize("call", CALLS)
def test_every_call_on_a_tombstone_answers_moved(moved_away: Moved2, call: str) -> None:
    m = moved_away
    assert sorted(_calls(m)) == sorted(CALLS)
    with pytest.raises(Moved) as err:
        _calls(m)[call]()
    assert err.value.to == "storage-b" and err.value.code == grpc.StatusCode.NOT_FOUND
    assert "moved to storage node storage-b" in err.value.message
    # Nothing was made or removed on either side: the target's copy is whole, the source has none.
    assert m.b.index.volume(m.vid) is not None
    assert sorted(s.id for s in m.b.index.snapshots(volume_id=m.vid)) == sorted(m.snaps)
    assert m.a.index.volume(m.vid) is None and not [n for n in m.a.zfs.ds if m.vid in n]


def test_get_volume_still_says_where_it_went(moved_away: Moved2) -> None:
    got = Direct(moved_away.a).call("GetVolume", pb.GetVolumeRequest(volume_id=moved_away.vid))
    assert got.placement == pb.PLACEMENT_MOVED and got.moved_to == "storage-b"


def test_an_id_never_held_is_still_a_plain_not_found_or_ok(moved_away: Moved2) -> None:
    v = moved_away.a.volumes
    v.delete_volume("vnever")  # deleting what never existed stays OK
    with pytest.raises(ZvoltError) as err:
        v.expand_volume("vnever", GiB)
    assert err.value.code == grpc.StatusCode.NOT_FOUND and not isinstance(err.value, Moved)


def test_the_target_reports_the_home_of_what_it_holds(moved_away: Moved2) -> None:
    b = Direct(moved_away.b)
    listed = b.call("ListVolumes", pb.ListVolumesRequest()).volumes
    assert [(v.id, v.home_node) for v in listed] == [(moved_away.vid, "storage-a")]
    snaps = b.call("ListSnapshots", pb.ListSnapshotsRequest(source_volume_id=moved_away.vid)).snapshots
    assert {s.home_node for s in snaps} == {"storage-a"}
    made = b.call("CreateVolume", pb.CreateVolumeRequest(name="pvc-b", size_bytes=64 * MiB)).volume
    assert made.home_node == "storage-b"
    clone = b.call("CreateVolume", pb.CreateVolumeRequest(
        name="pvc-restore", size_bytes=64 * MiB, source_snapshot_id=moved_away.snaps[0])).volume
    assert (clone.home_node, clone.source_home_node) == ("storage-b", "storage-a")


# -- the controller: old ids reach the holder -------------------------------------------------


@dataclass
class Cluster:
    nodes: dict[str, FakeNode]
    pool: AgentPool
    ctl: ControllerService
    groups: GroupControllerService
    sock: str

    def node_of(self, volume_id: str) -> FakeNode:
        return self.nodes[volume_id.partition("/")[0]]


def _stopper(server: grpc.Server) -> Callable[[], None]:
    return lambda: server.stop(None)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    tmp = tempfile.mkdtemp(prefix="zvmv", dir="/tmp")
    nodes: dict[str, FakeNode] = {}
    stops: list[Callable[[], None]] = []
    for name, zpool in (("storage-a", "tanka"), ("storage-b", "tankb")):
        node = make_node(f"{tmp}/{name}/state", f"{tmp}/{name}/configfs", node=name, pool=zpool)
        send = SendServer(node.moves, "127.0.0.1:0")
        send.start()
        metrics = Metrics()
        server = make_server(AgentServicer(node.volumes, node.readiness, metrics, moves=node.moves), metrics)
        server.add_insecure_port(f"unix://{tmp}/{name}.sock")
        server.start()
        nodes[name] = node
        stops += [send.close, _stopper(server)]
    pool = AgentPool(lambda: parse_static(",".join(f"{n}=unix://{tmp}/{n}.sock" for n in nodes)), tls=None,
                     timeout=10)
    ctl = ControllerService(pool)
    yield Cluster(nodes, pool, ctl, GroupControllerService(pool, ctl.locks, ctl.locator), tmp)
    pool.close()
    for stop in stops:
        stop()
    for node in nodes.values():
        node.index.close()
    shutil.rmtree(tmp, ignore_errors=True)


def _create(ctl: ControllerService, name: str, source: csi_pb2.VolumeContentSource | None = None) -> Any:
    req = csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
                                      volume_capabilities=[CAP])
    if source is not None:
        req.volume_content_source.CopyFrom(source)
    return ctl.CreateVolume(req, None).volume


def _from_snapshot(sid: str) -> csi_pb2.VolumeContentSource:
    return csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def _move(c: Cluster, volume_id: str) -> tuple[str, FakeNode, FakeNode]:
    """Move the volume to the other node, as `zvolt-csi --mode move` does: (local id, source, target)."""
    home, _, vid = volume_id.partition("/")
    other = next(n for n in c.nodes if n != home)
    orchestrator.move(c.pool.get(home), c.pool.get(other), vid)
    return vid, c.nodes[home], c.nodes[other]


def test_every_csi_call_on_old_ids_reaches_the_target(cluster: Cluster) -> None:
    c, ctl = cluster, cluster.ctl
    vol = _create(ctl, "pvc-pg")
    snap = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-pg", source_volume_id=vol.volume_id),
                              None).snapshot
    vid, source, target = _move(c, vol.volume_id)
    target_name = target.volumes.cfg.node
    # A controller that never saw the move (restarted, no cache): every id still resolves.
    fresh = ControllerService(c.pool)
    for svc in (fresh, ctl):
        got = svc.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), None)
        assert got.volume.volume_id == vol.volume_id
        assert got.volume.volume_context["zvolt.io/storage-node"] == target_name
    assert _create(ctl, "pvc-pg").volume_id == vol.volume_id  # the CO's retry of the create finds it moved
    listed = ctl.ListVolumes(csi_pb2.ListVolumesRequest(), None).entries
    assert [e.volume.volume_id for e in listed] == [vol.volume_id]
    by_vol = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id), None).entries
    by_id = ctl.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=snap.snapshot_id), None).entries
    assert [e.snapshot.snapshot_id for e in by_vol] == [e.snapshot.snapshot_id for e in by_id] == [snap.snapshot_id]
    got_snap = ctl.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), None).snapshot
    assert got_snap.snapshot_id == snap.snapshot_id and got_snap.source_volume_id == vol.volume_id
    # New snapshots of the old id are taken on the target and named by the home.
    later = ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-later", source_volume_id=vol.volume_id),
                               None).snapshot
    assert later.snapshot_id.startswith(vol.volume_id.partition("/")[0] + "/")
    assert later.source_volume_id == vol.volume_id
    assert target.index.snapshot(later.snapshot_id.partition("/")[2]) is not None
    # A restore from the old snapshot id lands on the target, and says where it came from.
    restore = _create(ctl, "pvc-restore", _from_snapshot(snap.snapshot_id))
    assert restore.volume_id.startswith(f"{target_name}/")
    assert restore.content_source.snapshot.snapshot_id == snap.snapshot_id
    ctl.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[CAP]), None)
    grown = ctl.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)), None)
    assert grown.capacity_bytes == 2 * GiB and target.index.volume(vid).size == 2 * GiB  # type: ignore[union-attr]
    ctl.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=vol.volume_id, mutable_parameters={"compression": "zstd"}), None)
    assert target.index.volume(vid).compression == "zstd"  # type: ignore[union-attr]
    ctx = ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP), None).publish_context
    assert target.index.volume(vid).hosts == [HOST] and ctx["nqn"]  # type: ignore[union-attr]
    ctl.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=HOST),
                                  None)
    assert target.index.volume(vid).hosts == []  # type: ignore[union-attr]
    ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=later.snapshot_id), None)
    assert target.index.snapshot(later.snapshot_id.partition("/")[2]) is None
    assert source.index.volume(vid) is None


def test_delete_on_the_old_id_deletes_the_targets_copy(cluster: Cluster) -> None:
    c = cluster
    vol = _create(c.ctl, "pvc-gone")
    vid, _, target = _move(c, vol.volume_id)
    ControllerService(c.pool).DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), None)
    assert target.index.volume(vid) is None
    assert not [n for n in target.zfs.ds if vid in n], "the moved copy must be destroyed, not orphaned"


def test_group_snapshots_of_moved_volumes_follow_them(cluster: Cluster) -> None:
    c = cluster
    vol = _create(c.ctl, "pvc-grp")
    vid, _, target = _move(c, vol.volume_id)
    group = c.groups.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="grp-1", source_volume_ids=[vol.volume_id]), None).group_snapshot
    home = vol.volume_id.partition("/")[0]
    assert group.group_snapshot_id.startswith(f"{home}/")
    members = [s.snapshot_id for s in group.snapshots]
    assert [m.partition("/")[0] for m in members] == [home]
    got = c.groups.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=members), None).group_snapshot
    assert [s.snapshot_id for s in got.snapshots] == members
    c.groups.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=members), None)
    assert not target.index.snapshots(volume_id=vid)


def test_group_members_that_moved_after_the_snapshot_are_found_and_deleted(cluster: Cluster) -> None:
    c = cluster
    vol = _create(c.ctl, "pvc-grp2")
    group = c.groups.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="grp-2", source_volume_ids=[vol.volume_id]), None).group_snapshot
    members = [s.snapshot_id for s in group.snapshots]
    vid, _, target = _move(c, vol.volume_id)
    fresh = GroupControllerService(c.pool)
    got = fresh.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=members), None).group_snapshot
    assert [s.snapshot_id for s in got.snapshots] == members
    fresh.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=members), None)
    assert not target.index.snapshots(volume_id=vid), "a moved member must be deleted where it is"


def test_ids_resolve_after_the_source_is_removed_for_good(cluster: Cluster) -> None:
    c = cluster
    vol = _create(c.ctl, "pvc-orphan")
    snap = c.ctl.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-orphan", source_volume_id=vol.volume_id),
                                None).snapshot
    vid, _, target = _move(c, vol.volume_id)
    left = target.volumes.cfg.node
    only = AgentPool(lambda: parse_static(f"{left}=unix://{c.sock}/{left}.sock"), tls=None, timeout=10)
    try:
        ctl = ControllerService(only)
        got = ctl.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id), None)
        assert got.volume.volume_id == vol.volume_id
        restore = _create(ctl, "pvc-orphan-restore", _from_snapshot(snap.snapshot_id))
        assert restore.volume_id.startswith(f"{left}/")
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restore.volume_id), None)
        ctl.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), None)
        ctl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), None)
        assert target.index.volume(vid) is None and not [n for n in target.zfs.ds if vid in n]
    finally:
        only.close()


def test_the_attachment_reconciler_sees_a_moved_volume_by_its_old_id(cluster: Cluster) -> None:
    """Else a moved, attached volume would look stale (no VolumeAttachment names target/<id>)
    and `--reconcile-attachments` would unpublish it under its pod."""
    from csi.attachments import list_publishes

    c = cluster
    vol = _create(c.ctl, "pvc-att")
    _move(c, vol.volume_id)
    c.ctl.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP), None)
    found, failed = list_publishes(c.pool)
    assert [(p.volume_id, p.host) for p in found] == [(vol.volume_id, HOST)] and not failed
