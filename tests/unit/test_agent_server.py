"""The agent over real gRPC (unix socket) on fakes: readiness gate, status codes, metrics."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

GiB = 1 << 30
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"


class Served:
    def __init__(self, node: FakeNode, stub: pb_grpc.AgentStub, metrics: Metrics) -> None:
        self.node = node
        self.stub = stub
        self.metrics = metrics


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"), recover=False)
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=4)
    sock = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield Served(node, pb_grpc.AgentStub(channel), metrics)
    finally:
        channel.close()
        server.stop(None)


def code(call: object, req: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(req, timeout=10)  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


def test_unavailable_until_recovery_done(served: Served) -> None:
    info = served.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert not info.ready and info.not_ready_reason
    assert code(served.stub.CreateVolume, pb.CreateVolumeRequest(name="x", size_bytes=GiB)) == \
        grpc.StatusCode.UNAVAILABLE
    assert code(served.stub.ListVolumes, pb.ListVolumesRequest()) == grpc.StatusCode.UNAVAILABLE
    served.node.recovery.run()
    info = served.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.ready and info.node_name == "storage-0" and info.parent_dataset == "tank/zvolt"
    assert info.nvme_address == "10.42.0.1" and info.nvme_port == "4420" and info.nvme_transport == "tcp"


def test_full_flow_and_codes(served: Served) -> None:
    served.node.recovery.run()
    s = served.stub
    vol = s.CreateVolume(pb.CreateVolumeRequest(name="pvc-a", size_bytes=GiB, labels={"pvc": "a"}), timeout=10).volume
    assert vol.size_bytes == GiB and vol.nqn.endswith(":" + vol.id) and vol.volblocksize == 16384
    snap = s.CreateSnapshot(pb.CreateSnapshotRequest(name="snap-a", source_volume_id=vol.id), timeout=10).snapshot
    assert snap.ready_to_use and snap.size_bytes == GiB and snap.source_volume_id == vol.id
    clone = s.CreateVolume(pb.CreateVolumeRequest(name="pvc-b", size_bytes=GiB, source_snapshot_id=snap.id),
                           timeout=10).volume
    assert clone.source_snapshot_id == snap.id
    pub = s.PublishVolume(pb.PublishVolumeRequest(volume_id=clone.id, host_nqn=HOST), timeout=10)
    assert (pub.nqn, pub.transport, pub.address, pub.port) == (clone.nqn, "tcp", "10.42.0.1", "4420")
    assert pub.host_nqn == HOST  # no keys: the node's own NQN is the one allowed
    got = s.GetVolume(pb.GetVolumeRequest(volume_id=clone.id), timeout=10).volume
    assert got.condition == pb.VOLUME_CONDITION_HEALTHY and list(got.published_hosts) == [HOST]
    assert s.ExpandVolume(pb.ExpandVolumeRequest(volume_id=clone.id, size_bytes=2 * GiB), timeout=10) \
        .volume.size_bytes == 2 * GiB
    assert code(s.DeleteVolume, pb.DeleteVolumeRequest(volume_id=clone.id)) == grpc.StatusCode.FAILED_PRECONDITION
    s.UnpublishVolume(pb.UnpublishVolumeRequest(volume_id=clone.id, host_nqn=HOST), timeout=10)
    page = s.ListVolumes(pb.ListVolumesRequest(max_entries=1), timeout=10)
    assert len(page.volumes) == 1 and page.next_token
    page2 = s.ListVolumes(pb.ListVolumesRequest(max_entries=1, starting_token=page.next_token), timeout=10)
    assert {page.volumes[0].id, page2.volumes[0].id} == {vol.id, clone.id} and not page2.next_token
    assert [x.id for x in s.ListSnapshots(pb.ListSnapshotsRequest(), timeout=10).snapshots] == [snap.id]
    cap = s.GetCapacity(pb.GetCapacityRequest(), timeout=10)
    assert 0 < cap.available_bytes < cap.total_bytes and cap.maximum_volume_size > 0
    for req in (pb.DeleteSnapshotRequest(snapshot_id=snap.id),):
        s.DeleteSnapshot(req, timeout=10)
    s.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.id), timeout=10)
    s.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.id), timeout=10)
    s.DeleteVolume(pb.DeleteVolumeRequest(volume_id=clone.id), timeout=10)
    info = s.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert (info.volumes, info.snapshots, info.exports) == (0, 0, 0)
    # Codes through the interceptor.
    assert code(s.CreateVolume, pb.CreateVolumeRequest(name="pvc-a2", size_bytes=GiB, encryption_key=b"k" * 31)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert code(s.GetVolume, pb.GetVolumeRequest(volume_id="vnothere")) == grpc.StatusCode.NOT_FOUND
    assert code(s.GetVolume, pb.GetVolumeRequest(volume_id="../../x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(s.ListVolumes, pb.ListVolumesRequest(starting_token="@@@")) == grpc.StatusCode.ABORTED
    # Metrics counted the calls by method and status.
    reg = served.metrics.registry
    assert reg.get_sample_value("zvolt_agent_operations_total",
                                {"method": "CreateVolume", "status": "OK"}) == 2.0
    assert reg.get_sample_value("zvolt_agent_operations_total",
                                {"method": "GetVolume", "status": "NOT_FOUND"}) == 1.0
    assert reg.get_sample_value("zvolt_agent_operation_seconds_count", {"method": "PublishVolume"}) == 1.0


def test_internal_errors_do_not_leak_tracebacks(served: Served) -> None:
    served.node.recovery.run()

    def boom(*_: object) -> None:
        raise RuntimeError("secret internals")

    served.node.volumes.capacity = boom  # type: ignore[assignment,method-assign]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.GetCapacity(pb.GetCapacityRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.value.details() or "")
