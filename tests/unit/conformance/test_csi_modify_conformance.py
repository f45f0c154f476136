"""ControllerModifyVolume and VolumeAttributesClass parameters (CSI 1.12 MODIFY_VOLUME), over
real gRPC against fake agents."""

from __future__ import annotations

import grpc
import pytest

from csi.fakes import GiB
from zvolt.pb import csi_pb2

from .support import ControllerEnv, code_of, mount_cap

C = grpc.StatusCode


def create(env: ControllerEnv, name: str, **kw: object) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[mount_cap()],
        **kw,  # type: ignore[arg-type]
    )
    vol: csi_pb2.Volume = env.controller.CreateVolume(req).volume
    return vol


def stored_compression(env: ControllerEnv, volume_id: str) -> str:
    node, _, local = volume_id.partition("/")
    return str(env.agents[node].state.volumes[local].compression)


def modify(env: ControllerEnv, volume_id: str, mutable: dict[str, str]) -> None:
    env.controller.ControllerModifyVolume(
        csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=mutable)
    )


def test_modify_changes_compression_and_repeats(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-m")
    assert stored_compression(ctl, vol.volume_id) == "lz4"
    modify(ctl, vol.volume_id, {"compression": "zstd"})
    assert stored_compression(ctl, vol.volume_id) == "zstd"
    modify(ctl, vol.volume_id, {"compression": "zstd"})
    modify(ctl, vol.volume_id, {})  # a class without parameters changes nothing
    assert stored_compression(ctl, vol.volume_id) == "zstd"


@pytest.mark.parametrize(
    ("volume_id", "code"),
    [
        ("", C.INVALID_ARGUMENT),
        ("non-existing-volume-id", C.NOT_FOUND),  # csi-sanity's id: not even well-formed
        ("storage-0/v" + "0" * 31, C.NOT_FOUND),
    ],
)
def test_modify_volume_id_errors(ctl: ControllerEnv, volume_id: str, code: grpc.StatusCode) -> None:
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters={"compression": "zstd"})
    assert code_of(ctl.controller.ControllerModifyVolume, req) == code


def test_empty_class_on_a_missing_volume_is_not_found(ctl: ControllerEnv) -> None:
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id="storage-0/v" + "0" * 31)
    assert code_of(ctl.controller.ControllerModifyVolume, req) == C.NOT_FOUND


@pytest.mark.parametrize(
    "mutable",
    [{"XXX_FakeKey": "XXX_FakeValue"}, {"volblocksize": "8K"}, {"thin": "false"}, {"compression": "brotli"}],
)
def test_modify_refuses_bad_parameters_before_any_agent_call(ctl: ControllerEnv, mutable: dict[str, str]) -> None:
    vol = create(ctl, "pvc-bad")
    node = vol.volume_id.partition("/")[0]
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=vol.volume_id, mutable_parameters=mutable)
    with pytest.raises(grpc.RpcError) as err:
        ctl.controller.ControllerModifyVolume(req)
    assert err.value.code() == C.INVALID_ARGUMENT
    assert next(iter(mutable)) in (err.value.details() or "")
    assert "ModifyVolume" not in ctl.agents[node].state.calls
    assert stored_compression(ctl, vol.volume_id) == "lz4"


def test_create_applies_the_volume_attributes_class(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-vac", parameters={"compression": "gzip"}, mutable_parameters={"compression": "zstd"})
    assert stored_compression(ctl, vol.volume_id) == "zstd"


@pytest.mark.parametrize("mutable", [{"XXX_FakeKey": "XXX_FakeValue"}, {"volblocksize": "8K"}])
def test_create_refuses_a_bad_volume_attributes_class(ctl: ControllerEnv, mutable: dict[str, str]) -> None:
    req = csi_pb2.CreateVolumeRequest(name="pvc-badvac", volume_capabilities=[mount_cap()], mutable_parameters=mutable)
    assert code_of(ctl.controller.CreateVolume, req) == C.INVALID_ARGUMENT
    assert all(not a.state.volumes for a in ctl.agents.values())


def test_validate_checks_mutable_parameters(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-val")
    good = ctl.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()], mutable_parameters={"compression": "zstd"}))
    assert dict(good.confirmed.mutable_parameters) == {"compression": "zstd"}
    bad = ctl.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()], mutable_parameters={"thin": "false"}))
    assert not bad.HasField("confirmed") and "'thin'" in bad.message
