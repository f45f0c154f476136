"""CSI GroupController -> the real agent servicer on fakes, two storage nodes, over gRPC."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from csi.agents import AgentPool, parse_static
from csi.main import controller_services
from csi.server import build_server
from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import parse_endpoint

GiB = 1 << 30
C = grpc.StatusCode
Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                               access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))


@dataclass
class Env:
    controller: csi_pb2_grpc.ControllerStub
    groups: csi_pb2_grpc.GroupControllerStub
    identity: csi_pb2_grpc.IdentityStub
    nodes: dict[str, FakeNode]


@pytest.fixture
def env() -> Iterator[Env]:
    tmp = tempfile.mkdtemp(prefix="zvgrp", dir="/tmp")
    nodes: dict[str, FakeNode] = {}
    servers: list[grpc.Server] = []
    spec: list[str] = []
    for name in ("storage-0", "storage-1"):
        node = make_node(f"{tmp}/{name}/state", f"{tmp}/{name}/configfs", node=name)
        metrics = Metrics()
        server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics)
        server.add_insecure_port(f"unix://{tmp}/{name}.sock")
        server.start()
        nodes[name], servers = node, [*servers, server]
        spec.append(f"{name}=unix://{tmp}/{name}.sock")
    pool = AgentPool(lambda: parse_static(",".join(spec)), tls=None, timeout=10)
    server, target = build_server(controller_services(pool), parse_endpoint(f"unix://{tmp}/csi.sock"))
    server.start()
    channel = grpc.insecure_channel(target)
    yield Env(csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.GroupControllerStub(channel),
              csi_pb2_grpc.IdentityStub(channel), nodes)
    channel.close()
    server.stop(None)
    pool.close()
    for s in servers:
        s.stop(None)
    for node in nodes.values():
        node.index.close()
    shutil.rmtree(tmp, ignore_errors=True)


def volume(env: Env, name: str, node: str = "storage-0") -> str:
    """A volume on that storage node (made by its agent: placement would spread them)."""
    return f"{node}/{env.nodes[node].volumes.create_volume(VolumeSpec(name=name, size=GiB)).id}"


def code(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(request)  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_capabilities(env: Env) -> None:
    caps = env.groups.GroupControllerGetCapabilities(csi_pb2.GroupControllerGetCapabilitiesRequest()).capabilities
    assert [c.rpc.type for c in caps] == [
        csi_pb2.GroupControllerServiceCapability.RPC.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT]
    plugin = env.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    assert csi_pb2.PluginCapability.Service.GROUP_CONTROLLER_SERVICE in {c.service.type for c in plugin}


def test_create_get_restore_delete(env: Env) -> None:
    data, wal = volume(env, "data"), volume(env, "wal")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="group-1", source_volume_ids=[data, wal],
        parameters={"csi.storage.k8s.io/volumegroupsnapshot/name": "nightly"})
    group = env.groups.CreateVolumeGroupSnapshot(req).group_snapshot
    gsid = group.group_snapshot_id
    assert gsid.startswith("storage-0/g") and group.ready_to_use and group.creation_time.seconds > 0
    assert sorted(s.source_volume_id for s in group.snapshots) == sorted([data, wal])
    for s in group.snapshots:
        assert s.group_snapshot_id == gsid and s.snapshot_id.endswith("@" + gsid.partition("/")[2])
        assert s.size_bytes == GiB and s.ready_to_use
    assert env.groups.CreateVolumeGroupSnapshot(req).group_snapshot == group  # idempotent
    other = volume(env, "other")
    clash = csi_pb2.CreateVolumeGroupSnapshotRequest(name="group-1", source_volume_ids=[data, other])
    assert code(env.groups.CreateVolumeGroupSnapshot, clash) == C.ALREADY_EXISTS

    got = env.groups.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=gsid, snapshot_ids=[s.snapshot_id for s in group.snapshots])).group_snapshot
    assert got == group
    # Each member restores alone, as an ordinary snapshot.
    member = group.snapshots[0]
    restored = env.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="restored", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP],
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=member.snapshot_id)))).volume
    assert restored.content_source.snapshot.snapshot_id == member.snapshot_id

    delete = csi_pb2.DeleteVolumeGroupSnapshotRequest(
        group_snapshot_id=gsid, snapshot_ids=[s.snapshot_id for s in group.snapshots])
    env.groups.DeleteVolumeGroupSnapshot(delete)
    env.groups.DeleteVolumeGroupSnapshot(delete)  # idempotent: gone is success
    assert code(env.groups.GetVolumeGroupSnapshot,
                csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gsid)) == C.NOT_FOUND
    listed = env.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert not [e for e in listed if e.snapshot.snapshot_id in delete.snapshot_ids]


def test_volumes_on_two_nodes_are_refused_naming_the_nodes(env: Env) -> None:
    a, b = volume(env, "a", "storage-0"), volume(env, "b", "storage-1")
    with pytest.raises(grpc.RpcError) as err:
        env.groups.CreateVolumeGroupSnapshot(
            csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a, b]))
    assert err.value.code() == C.FAILED_PRECONDITION
    assert "storage-0" in err.value.details() and "storage-1" in err.value.details()
    assert a in err.value.details() and b in err.value.details()
    assert all(n.zfs.snapshot_batches == [] for n in env.nodes.values())


def test_errors_per_spec(env: Env) -> None:
    a = volume(env, "a")
    create = env.groups.CreateVolumeGroupSnapshot
    assert code(create, csi_pb2.CreateVolumeGroupSnapshotRequest(source_volume_ids=[a])) == C.INVALID_ARGUMENT
    assert code(create, csi_pb2.CreateVolumeGroupSnapshotRequest(name="g")) == C.INVALID_ARGUMENT
    assert code(create, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=[a], parameters={"volblocksize": "8K"})) == C.INVALID_ARGUMENT
    assert code(create, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=[a, "storage-0/vnothere"])) == C.NOT_FOUND
    assert code(create, csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=["not-an-id"])) == C.NOT_FOUND
    get, delete = env.groups.GetVolumeGroupSnapshot, env.groups.DeleteVolumeGroupSnapshot
    assert code(get, csi_pb2.GetVolumeGroupSnapshotRequest()) == C.INVALID_ARGUMENT
    assert code(get, csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="fake-volume-id")) == C.NOT_FOUND
    assert code(get, csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="storage-0/gnothere")) == C.NOT_FOUND
    assert code(delete, csi_pb2.DeleteVolumeGroupSnapshotRequest()) == C.INVALID_ARGUMENT
    delete(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="fake-volume-id"))
    delete(csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="storage-0/gnothere"))
    gsid = create(csi_pb2.CreateVolumeGroupSnapshotRequest(name="g", source_volume_ids=[a])).group_snapshot
    foreign = f"storage-1/{a.partition('/')[2]}@{gsid.group_snapshot_id.partition('/')[2]}"
    mismatch = csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=gsid.group_snapshot_id,
                                                        snapshot_ids=[foreign])
    assert code(delete, mismatch) == C.INVALID_ARGUMENT
    assert env.groups.GetVolumeGroupSnapshot(
        csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id=gsid.group_snapshot_id)).group_snapshot == gsid
