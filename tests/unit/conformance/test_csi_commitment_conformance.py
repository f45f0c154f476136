"""The controller honours commitment limits, over gRPC against fake agents: GetCapacity reports
what the limits admit, CreateVolume (new, restore) is refused with RESOURCE_EXHAUSTED naming
the limit, and an agent that reports no limit is treated as before."""

from __future__ import annotations

import grpc

from zvolt.pb import csi_pb2

from .support import ControllerEnv, code_of, mount_cap

GiB = 1 << 30


def create_req(name: str, size: int, **params: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                                       volume_capabilities=[mount_cap()], parameters=params)


def test_get_capacity_reports_what_the_limits_admit(ctl: ControllerEnv) -> None:
    a, b = ctl.agents["storage-0"], ctl.agents["storage-1"]
    a.total, b.total = 10 * GiB, 10 * GiB
    a.commitment_ratio = b.commitment_ratio = 2.0
    ctl.controller.CreateVolume(create_req("pvc-a", 15 * GiB))
    cap = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap()]))
    # One node admits 20 GiB, the other 5 GiB: a thin branch of 15 GiB (more than either node's
    # free space) still schedules, one of 21 GiB does not.
    assert cap.maximum_volume_size.value == 20 * GiB and cap.available_capacity == 25 * GiB
    strict = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"commitmentRatio": "1"}))
    assert strict.maximum_volume_size.value == 10 * GiB and strict.available_capacity == 10 * GiB
    thick = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"thin": "false"}))
    assert thick.maximum_volume_size.value == 10 * GiB


def test_create_volume_refused_by_the_node_limit_names_it(ctl: ControllerEnv) -> None:
    for agent in ctl.agents.values():
        agent.total, agent.commitment_ratio = 10 * GiB, 1.0
    ctl.controller.CreateVolume(create_req("pvc-a", 8 * GiB))
    ctl.controller.CreateVolume(create_req("pvc-b", 8 * GiB))
    with_err = create_req("pvc-c", 4 * GiB)
    assert code_of(ctl.controller.CreateVolume, with_err) == grpc.StatusCode.RESOURCE_EXHAUSTED
    try:
        ctl.controller.CreateVolume(with_err)
    except grpc.RpcError as err:
        assert "commitment limit of storage node" in str(err.details())
        assert f"{8 * GiB} bytes committed" in str(err.details())


def test_the_class_limit_refuses_new_volumes_and_restores(ctl: ControllerEnv) -> None:
    for agent in ctl.agents.values():
        agent.total, agent.commitment_ratio = 10 * GiB, 3.0
    src = ctl.controller.CreateVolume(create_req("pvc-src", 8 * GiB)).volume
    src_node = src.volume_id.split("/")[0]
    # Half the pool for this class: the source's node admits nothing more, the other one 5 GiB.
    placed = ctl.controller.CreateVolume(create_req("pvc-half", 4 * GiB, commitmentRatio="0.5")).volume
    assert placed.volume_id.split("/")[0] != src_node
    strict = create_req("pvc-strict", 2 * GiB, commitmentRatio="0.5")
    assert code_of(ctl.controller.CreateVolume, strict) == grpc.StatusCode.RESOURCE_EXHAUSTED
    snap = ctl.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="s1", source_volume_id=src.volume_id))
    restore = create_req("pvc-restore", 8 * GiB, commitmentRatio="1")
    restore.volume_content_source.snapshot.snapshot_id = snap.snapshot.snapshot_id
    try:
        ctl.controller.CreateVolume(restore)
        raise AssertionError("a restore over the class limit was admitted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the StorageClass (commitmentRatio) on storage node" in str(err.details())
    restore.parameters["commitmentRatio"] = "2"
    assert ctl.controller.CreateVolume(restore).volume.capacity_bytes == 8 * GiB
