"""Spot checks of proto/csi.proto against CSI v1.12.0: what a careless edit would break on the wire."""

from __future__ import annotations

from google.protobuf import descriptor_pb2

from zvolt.pb import csi_pb2


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    csi_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def test_package_services_and_method_order() -> None:
    f = _file()
    assert f.package == "csi.v1"
    methods = {s.name: [m.name for m in s.method] for s in f.service}
    assert list(methods) == ["Identity", "Controller", "GroupController", "SnapshotMetadata", "Node"]
    assert methods["Controller"] == [
        "CreateVolume", "DeleteVolume", "ControllerPublishVolume", "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities", "ListVolumes", "GetCapacity", "ControllerGetCapabilities", "CreateSnapshot",
        "DeleteSnapshot", "ListSnapshots", "GetSnapshot", "ControllerExpandVolume", "ControllerGetVolume",
        "ControllerModifyVolume",
    ]  # fmt: skip
    assert methods["Node"] == [
        "NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume", "NodeGetVolumeStats",
        "NodeExpandVolume", "NodeGetCapabilities", "NodeGetInfo",
    ]  # fmt: skip


def test_every_secrets_field_is_marked_secret() -> None:
    secret = csi_pb2.csi_secret
    found = 0
    for msg in csi_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in msg.fields:
            if field.name == "secrets":
                assert field.GetOptions().Extensions[secret], msg.name
                found += 1
    assert found == 19
    assert secret.number == 1059 and csi_pb2.alpha_field.number == 1060


def test_selected_numbers_and_alpha_markers() -> None:
    d = csi_pb2.DESCRIPTOR.message_types_by_name
    assert d["CreateVolumeRequest"].fields_by_name["mutable_parameters"].number == 8
    assert d["NodePublishVolumeRequest"].fields_by_name["volume_context"].number == 8
    assert d["Snapshot"].fields_by_name["group_snapshot_id"].number == 6
    rpc = csi_pb2.ControllerServiceCapability.RPC
    assert (rpc.MODIFY_VOLUME, rpc.GET_SNAPSHOT) == (14, 15)
    values = csi_pb2.ControllerServiceCapability.RPC.Type.DESCRIPTOR.values_by_name
    assert values["GET_SNAPSHOT"].GetOptions().Extensions[csi_pb2.alpha_enum_value]
    assert not values["MODIFY_VOLUME"].GetOptions().Extensions[csi_pb2.alpha_enum_value]  # GA in v1.12.0
    assert d["GetSnapshotRequest"].GetOptions().Extensions[csi_pb2.alpha_message]
    mode = csi_pb2.VolumeCapability.AccessMode
    assert (mode.SINGLE_NODE_SINGLE_WRITER, mode.SINGLE_NODE_MULTI_WRITER) == (6, 7)
