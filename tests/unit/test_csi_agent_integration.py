"""Controller -> the real agent servicer (agent.server) on its fake backends (agent.fakes), over gRPC.

Checks that the two halves of the contract fit: ids, idempotency, clones on the source node,
publish contexts, pagination tokens and error codes as the real agent produces them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import grpc
import pytest

from agent.fakes import make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.server import Services, build_server
from zvolt.names import subsystem_nqn
from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import parse_endpoint

GiB = 1024**3
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
Mode = csi_pb2.VolumeCapability.AccessMode
CAP = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"), access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)
)


@pytest.fixture
def stub() -> Iterator[csi_pb2_grpc.ControllerStub]:
    tmp = tempfile.mkdtemp(prefix="zvint", dir="/tmp")
    node = make_node(f"{tmp}/state", f"{tmp}/configfs", node="storage-0")
    metrics = Metrics()
    agent_server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics)
    agent_server.add_insecure_port(f"unix://{tmp}/agent.sock")
    agent_server.start()
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{tmp}/agent.sock"), tls=None, timeout=10)
    server, target = build_server(
        Services(identity=IdentityService(True, lambda: True), controller=ControllerService(pool)),
        parse_endpoint(f"unix://{tmp}/controller.sock"),
    )
    server.start()
    channel = grpc.insecure_channel(target)
    yield csi_pb2_grpc.ControllerStub(channel)
    channel.close()
    server.stop(None)
    pool.close()
    agent_server.stop(None)
    node.index.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_controller_against_real_agent_servicer(stub: csi_pb2_grpc.ControllerStub) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-int", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[CAP],
        parameters={"volblocksize": "8K"},
    )  # fmt: skip
    vol = stub.CreateVolume(req).volume
    assert vol.volume_id.startswith("storage-0/") and vol.capacity_bytes == GiB
    assert stub.CreateVolume(req).volume == vol  # idempotent through the agent's own index
    bigger = csi_pb2.CreateVolumeRequest()
    bigger.CopyFrom(req)
    bigger.capacity_range.required_bytes = 2 * GiB
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVolume(bigger)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    snap = stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="snap-int", source_volume_id=vol.volume_id)).snapshot
    assert snap.size_bytes == GiB and snap.source_volume_id == vol.volume_id and snap.ready_to_use
    restore = stub.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-int-restore", volume_capabilities=[CAP],
            volume_content_source=csi_pb2.VolumeContentSource(
                snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
            ),
        )
    ).volume  # fmt: skip
    assert restore.capacity_bytes == GiB and restore.content_source.snapshot.snapshot_id == snap.snapshot_id
    clone = stub.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="pvc-int-clone", volume_capabilities=[CAP],
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
            volume_content_source=csi_pb2.VolumeContentSource(
                volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=vol.volume_id)
            ),
        )
    ).volume  # fmt: skip
    assert clone.capacity_bytes >= 2 * GiB

    pub = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=HOST, volume_capability=CAP)
    ctx = dict(stub.ControllerPublishVolume(pub).publish_context)
    local = vol.volume_id.split("/")[1]
    assert ctx["nqn"] == subsystem_nqn("storage-0", local) and ctx["transport"] == "tcp" and ctx["port"]
    assert dict(stub.ControllerPublishVolume(pub).publish_context) == ctx
    got = stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == [HOST]

    grown = stub.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB)
        )
    )
    assert grown.capacity_bytes == 3 * GiB and grown.node_expansion_required

    listed: list[str] = []
    token = ""
    while True:
        page = stub.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=1, starting_token=token))
        listed += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert set(listed) == {vol.volume_id, restore.volume_id, clone.volume_id}

    unpub = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=HOST)
    stub.ControllerUnpublishVolume(unpub)
    stub.ControllerUnpublishVolume(unpub)
    # Delete in any order: the origin first, then its snapshot, then the branches; twice each.
    for _ in range(2):
        stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
        stub.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    for v in (restore, clone):
        stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v.volume_id))
    assert not stub.ListVolumes(csi_pb2.ListVolumesRequest()).entries
