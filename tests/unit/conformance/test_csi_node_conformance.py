"""CSI spec v1.12.0 conformance of the Node service (real gRPC, fake NVMe host and mounter)."""

from __future__ import annotations

import os
import threading
from concurrent import futures

import grpc
import pytest

from csi import TOPOLOGY_ZONE_KEY
from csi.fakes import GiB
from csi.identity import IdentityService, plugin_capabilities
from zvolt.names import subsystem_nqn
from zvolt.pb import csi_pb2

from .support import NodeEnv, block_cap, code_of, mount_cap

Mode = csi_pb2.VolumeCapability.AccessMode
NodeRPC = csi_pb2.NodeServiceCapability.RPC
C = grpc.StatusCode
VOL = "storage-0/vabc"
NQN = subsystem_nqn("storage-0", "vabc")
CTX = {"nqn": NQN, "transport": "tcp", "address": "10.0.0.1", "port": "4420"}


def paths(env: NodeEnv) -> tuple[str, str]:
    return f"{env.root}/staging/{VOL.replace('/', '_')}", f"{env.root}/pods/p1/volumes/{VOL.replace('/', '_')}"


def stage(env: NodeEnv, cap: csi_pb2.VolumeCapability | None = None, ctx: dict[str, str] | None = None) -> str:
    staging, _ = paths(env)
    env.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=VOL, staging_target_path=staging, volume_capability=cap or mount_cap(),
            publish_context=CTX if ctx is None else ctx,
        )
    )  # fmt: skip
    return staging


def publish(env: NodeEnv, cap: csi_pb2.VolumeCapability | None = None, readonly: bool = False) -> str:
    staging, target = paths(env)
    env.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=VOL, staging_target_path=staging, target_path=target,
            volume_capability=cap or mount_cap(), readonly=readonly, publish_context=CTX,
        )
    )  # fmt: skip
    return target


@pytest.fixture
def env(nde: NodeEnv) -> NodeEnv:
    nde.nvme.add_subsystem(NQN, GiB)
    return nde


def test_node_info_and_capabilities(env: NodeEnv) -> None:
    info = env.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == env.hostnqn and info.max_volumes_per_node == 100
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_ZONE_KEY: "default"}
    caps = {c.rpc.type for c in env.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    assert caps == {
        NodeRPC.STAGE_UNSTAGE_VOLUME,
        NodeRPC.GET_VOLUME_STATS,
        NodeRPC.EXPAND_VOLUME,
        NodeRPC.VOLUME_CONDITION,
        NodeRPC.SINGLE_NODE_MULTI_WRITER,
    }
    assert env.identity.Probe(csi_pb2.ProbeRequest()).ready.value


def test_node_plugin_reports_the_same_plugin_capabilities_as_the_controller(env: NodeEnv) -> None:
    # CSI: all instances of one plugin version return the same set, so the node plugin names the
    # controller service too (csi-sanity's node specs skip publish/stage when it is missing).
    plugin = env.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    S = csi_pb2.PluginCapability.Service
    assert S.CONTROLLER_SERVICE in {c.service.type for c in plugin if c.HasField("service")}
    assert list(plugin) == plugin_capabilities()
    controller = IdentityService(controller=True, ready=lambda: True).GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), None
    )
    assert list(plugin) == list(controller.capabilities)


def test_stage_connects_with_own_identity_formats_once_and_mounts(env: NodeEnv) -> None:
    staging = stage(env, mount_cap(flags=("noatime",)))
    [spec] = env.nvme.connects
    assert (spec.nqn, spec.hostnqn, spec.address, spec.port) == (NQN, env.hostnqn, "10.0.0.1", "4420")
    assert spec.hostid and spec.ctrl_loss_tmo == 600 and spec.reconnect_delay == 10
    device = env.nvme.namespace_device(NQN)
    assert env.mounter.mkfs_calls == [(device, "ext4")]
    info = env.mounter.mount_info(staging)
    assert info is not None and (info.source, info.fstype, info.options) == (device, "ext4", ("noatime",))
    stage(env, mount_cap(flags=("noatime",)))  # idempotent repeat: nothing new happens
    assert len(env.nvme.connects) == 1 and len(env.mounter.mkfs_calls) == 1
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging))
    stage(env)
    # The filesystem written the first time is kept: never reformatted.
    assert len(env.mounter.mkfs_calls) == 1 and len(env.nvme.connects) == 2


def test_stage_xfs_mounts_with_nouuid(env: NodeEnv) -> None:
    staging = stage(env, mount_cap(fs="xfs"))
    info = env.mounter.mount_info(staging)
    assert info is not None and info.fstype == "xfs" and "nouuid" in info.options


def test_stage_refuses_to_reformat_another_filesystem(env: NodeEnv) -> None:
    staging = stage(env, mount_cap(fs="xfs"))
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging))
    with pytest.raises(grpc.RpcError) as err:
        stage(env, mount_cap(fs="ext4"))
    assert err.value.code() == C.FAILED_PRECONDITION and "never reformats" in err.value.details()
    assert [fs for _, fs in env.mounter.mkfs_calls] == ["xfs"]


@pytest.mark.parametrize("fs,no_replay", [("ext4", "noload"), ("xfs", "norecovery")])
def test_stage_multi_node_reader_only_mounts_without_any_write(env: NodeEnv, fs: str, no_replay: str) -> None:
    """MULTI_NODE_READER_ONLY: several nodes mount the filesystem at once, so each mounts it
    read-only without a journal replay, and a volume without a filesystem is not formatted."""
    with pytest.raises(grpc.RpcError) as err:
        stage(env, mount_cap(mode=Mode.MULTI_NODE_READER_ONLY, fs=fs))
    assert err.value.code() == C.FAILED_PRECONDITION and "holds no filesystem" in err.value.details()
    assert env.mounter.mkfs_calls == []
    staging = stage(env, mount_cap(fs=fs))  # formatted by a writer first
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging))
    stage(env, mount_cap(mode=Mode.MULTI_NODE_READER_ONLY, fs=fs))
    info = env.mounter.mount_info(staging)
    assert info is not None and "ro" in info.options and no_replay in info.options, info
    assert len(env.mounter.mkfs_calls) == 1


def test_stage_on_path_with_another_device_is_already_exists(env: NodeEnv) -> None:
    staging, _ = paths(env)
    env.mounter.filesystems["/dev/sdz"] = "ext4"
    env.mounter.mount("/dev/sdz", staging, "ext4", [])
    with pytest.raises(grpc.RpcError) as err:
        stage(env)
    assert err.value.code() == C.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("volume_id", "", C.INVALID_ARGUMENT),
        ("staging_target_path", "", C.INVALID_ARGUMENT),
        ("staging_target_path", "relative/path", C.INVALID_ARGUMENT),
        ("volume_capability", None, C.INVALID_ARGUMENT),
        ("publish_context", {}, C.FAILED_PRECONDITION),
        ("publish_context", {**CTX, "nqn": subsystem_nqn("storage-0", "vother")}, C.INVALID_ARGUMENT),
        ("publish_context", {**CTX, "address": "-oProxyCommand=x"}, C.INVALID_ARGUMENT),
        ("publish_context", {**CTX, "port": "44200000"}, C.INVALID_ARGUMENT),
        ("publish_context", {**CTX, "transport": "rdma"}, C.INVALID_ARGUMENT),
        ("volume_id", "not-a-zvolt-id", C.NOT_FOUND),
        ("cap", mount_cap(flags=("exec,suid",)), C.INVALID_ARGUMENT),
        ("cap", mount_cap(flags=("context=system_u:object_r:x",)), C.INVALID_ARGUMENT),
        ("cap", mount_cap(Mode.MULTI_NODE_MULTI_WRITER), C.INVALID_ARGUMENT),
    ],
)
def test_stage_errors(env: NodeEnv, field: str, value: object, code: grpc.StatusCode) -> None:
    staging, _ = paths(env)
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=VOL, staging_target_path=staging, volume_capability=mount_cap(), publish_context=CTX
    )
    if field == "volume_capability":
        req.ClearField("volume_capability")
    elif field == "publish_context":
        req.ClearField("publish_context")
        req.publish_context.update(value)  # type: ignore[arg-type]
    elif field == "cap":
        req.volume_capability.CopyFrom(value)  # type: ignore[arg-type]
    else:
        setattr(req, field, value)
    assert code_of(env.node.NodeStageVolume, req) == code
    assert env.nvme.connects == []


def test_unstage_unmounts_and_disconnects_only_our_controller(env: NodeEnv) -> None:
    foreign = env.nvme.add_foreign_controller(NQN, "nqn.2014-08.org.nvmexpress:uuid:someone-else")
    staging = stage(env)
    ours = [c.name for c in env.nvme.controllers(NQN) if c.hostnqn == env.hostnqn]
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=VOL, staging_target_path=staging)
    for _ in range(2):
        env.node.NodeUnstageVolume(req)
    assert env.mounter.mount_info(staging) is None
    assert env.nvme.disconnects == ours and foreign in env.nvme.ctrls
    env.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id="junk", staging_target_path=staging))
    U = csi_pb2.NodeUnstageVolumeRequest
    assert code_of(env.node.NodeUnstageVolume, U(staging_target_path=staging)) == C.INVALID_ARGUMENT
    assert code_of(env.node.NodeUnstageVolume, U(volume_id=VOL)) == C.INVALID_ARGUMENT


def test_publish_mount_bind_readonly_and_unpublish(env: NodeEnv) -> None:
    staging = stage(env)
    target = publish(env)
    info = env.mounter.mount_info(target)
    assert os.path.isdir(target) and info is not None and info.options == ("rw",)
    publish(env)  # repeat
    with pytest.raises(grpc.RpcError) as err:
        publish(env, readonly=True)  # same target, incompatible
    assert err.value.code() == C.ALREADY_EXISTS
    U = csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=target)
    for _ in range(2):
        env.node.NodeUnpublishVolume(U)
    assert env.mounter.mount_info(target) is None and not os.path.exists(target)
    publish(env, readonly=True)
    ro = env.mounter.mount_info(target)
    assert ro is not None and ro.options == ("ro",)
    env.node.NodeUnpublishVolume(U)
    publish(env, cap=mount_cap(Mode.SINGLE_NODE_READER_ONLY))  # read-only mode implies ro
    ro = env.mounter.mount_info(target)
    assert ro is not None and ro.options == ("ro",)
    assert env.mounter.mount_info(staging) is not None


def test_publish_errors(env: NodeEnv) -> None:
    staging, target = paths(env)
    P = csi_pb2.NodePublishVolumeRequest
    call = env.node.NodePublishVolume
    not_staged = P(volume_id=VOL, staging_target_path=staging, target_path=target, volume_capability=mount_cap())
    assert code_of(call, not_staged) == C.FAILED_PRECONDITION
    block_not_staged = P(volume_id=VOL, staging_target_path=staging, target_path=target, volume_capability=block_cap())
    assert code_of(call, block_not_staged) == C.FAILED_PRECONDITION
    assert (
        code_of(call, P(staging_target_path=staging, target_path=target, volume_capability=mount_cap()))
        == C.INVALID_ARGUMENT
    )
    assert (
        code_of(call, P(volume_id=VOL, staging_target_path=staging, volume_capability=mount_cap()))
        == C.INVALID_ARGUMENT
    )
    assert code_of(call, P(volume_id=VOL, target_path=target, volume_capability=mount_cap())) == C.INVALID_ARGUMENT
    assert code_of(call, P(volume_id=VOL, staging_target_path=staging, target_path=target)) == C.INVALID_ARGUMENT
    U = csi_pb2.NodeUnpublishVolumeRequest
    assert code_of(env.node.NodeUnpublishVolume, U(target_path=target)) == C.INVALID_ARGUMENT
    assert code_of(env.node.NodeUnpublishVolume, U(volume_id=VOL)) == C.INVALID_ARGUMENT


def test_raw_block_publish_binds_device_file(env: NodeEnv) -> None:
    stage(env, block_cap())
    assert env.mounter.mkfs_calls == []  # raw block: never formatted
    target = publish(env, cap=block_cap(), readonly=True)
    info = env.mounter.mount_info(target)
    assert os.path.isfile(target) and info is not None
    assert info.source == env.nvme.namespace_device(NQN) and info.options == ("ro",)
    stats = env.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=target))
    assert [(u.unit, u.total) for u in stats.usage] == [(csi_pb2.VolumeUsage.BYTES, GiB)]
    env.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=VOL, target_path=target))
    assert not os.path.exists(target)


def test_stats_and_volume_condition_follow_controller_state(env: NodeEnv) -> None:
    stage(env)
    target = publish(env)
    R = csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=target)
    stats = env.node.NodeGetVolumeStats(R)
    usage = {u.unit: (u.total, u.used, u.available) for u in stats.usage}
    fs = env.mounter.fs_stats
    assert usage[csi_pb2.VolumeUsage.BYTES] == (fs.total_bytes, fs.used_bytes, fs.available_bytes)
    assert usage[csi_pb2.VolumeUsage.INODES] == (fs.total_inodes, fs.used_inodes, fs.free_inodes)
    assert not stats.volume_condition.abnormal and "live" in stats.volume_condition.message
    env.nvme.set_state(NQN, "connecting")
    cond = env.node.NodeGetVolumeStats(R).volume_condition
    assert cond.abnormal and "connecting" in cond.message
    env.nvme.set_state(NQN, "live")
    assert not env.node.NodeGetVolumeStats(R).volume_condition.abnormal
    call = env.node.NodeGetVolumeStats
    assert (
        code_of(call, csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL, volume_path=f"{env.root}/nope")) == C.NOT_FOUND
    )
    assert code_of(call, csi_pb2.NodeGetVolumeStatsRequest(volume_id=VOL)) == C.INVALID_ARGUMENT
    assert code_of(call, csi_pb2.NodeGetVolumeStatsRequest(volume_path=target)) == C.INVALID_ARGUMENT


def test_node_expand_rescans_and_grows_filesystem(env: NodeEnv) -> None:
    staging = stage(env)
    target = publish(env)
    env.nvme.subsystems[NQN].pending_size = 2 * GiB
    E = csi_pb2.NodeExpandVolumeRequest
    resp = env.node.NodeExpandVolume(
        E(volume_id=VOL, volume_path=target, staging_target_path=staging,
          capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB), volume_capability=mount_cap())
    )  # fmt: skip
    device = env.nvme.namespace_device(NQN)
    assert resp.capacity_bytes == 2 * GiB and env.nvme.rescans
    assert env.mounter.grow_calls == [(device, target, "ext4")]
    call = env.node.NodeExpandVolume
    too_big = E(volume_id=VOL, volume_path=target, capacity_range=csi_pb2.CapacityRange(required_bytes=5 * GiB))
    assert code_of(call, too_big) == C.OUT_OF_RANGE
    assert code_of(call, E(volume_id=VOL)) == C.INVALID_ARGUMENT
    assert code_of(call, E(volume_path=target)) == C.INVALID_ARGUMENT
    assert code_of(call, E(volume_id=VOL, volume_path=f"{env.root}/nope")) == C.NOT_FOUND
    assert code_of(call, E(volume_id="storage-0/vother", volume_path=target)) == C.NOT_FOUND


def test_node_expand_raw_block_does_not_touch_a_filesystem(env: NodeEnv) -> None:
    stage(env, block_cap())
    target = publish(env, cap=block_cap())
    env.nvme.subsystems[NQN].pending_size = 3 * GiB
    resp = env.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=VOL, volume_path=target, volume_capability=block_cap())
    )
    assert resp.capacity_bytes == 3 * GiB and env.mounter.grow_calls == []


def test_concurrent_stage_of_one_volume_is_aborted(env: NodeEnv) -> None:
    gate = threading.Event()
    env.nvme.connect_gate = gate
    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(stage, env)
        assert env.nvme.connect_entered.wait(5)
        staging, _ = paths(env)
        req = csi_pb2.NodeStageVolumeRequest(
            volume_id=VOL, staging_target_path=staging, volume_capability=mount_cap(), publish_context=CTX
        )
        assert code_of(env.node.NodeStageVolume, req) == C.ABORTED
        gate.set()
        first.result(10)
    assert len(env.nvme.connects) == 1


# csi-sanity v5.4.0 "NodeGetVolumeStats/NodeExpandVolume should fail when volume is not found" and
# "... when volume does not exist on the specified path": a path the volume is not at, relative
# ("some/path") or absent, is NOT_FOUND; only a missing field is INVALID_ARGUMENT.
@pytest.mark.parametrize("path", ["some/path", "relative", "/does/not/exist"])
@pytest.mark.parametrize("volume_id", [VOL, "storage-0/vnothere", "fake-vol-id-0123456789"])
def test_stats_and_expand_where_the_volume_is_not_are_not_found(env: NodeEnv, volume_id: str, path: str) -> None:
    stage(env)
    publish(env)
    S = csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path)
    assert code_of(env.node.NodeGetVolumeStats, S) == C.NOT_FOUND
    E = csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume_id, volume_path=path, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB)
    )
    assert code_of(env.node.NodeExpandVolume, E) == C.NOT_FOUND
    assert env.nvme.rescans == [] and env.mounter.grow_calls == []


def test_stats_and_expand_still_refuse_missing_fields_and_bad_values(env: NodeEnv) -> None:
    _, target = paths(env)
    S = csi_pb2.NodeGetVolumeStatsRequest
    assert code_of(env.node.NodeGetVolumeStats, S(volume_path="some/path")) == C.INVALID_ARGUMENT
    assert code_of(env.node.NodeGetVolumeStats, S(volume_id="fake-vol-id-0123456789")) == C.INVALID_ARGUMENT
    E = csi_pb2.NodeExpandVolumeRequest
    assert code_of(env.node.NodeExpandVolume, E(volume_path=target, volume_capability=mount_cap())) == (
        C.INVALID_ARGUMENT
    )
    assert code_of(env.node.NodeExpandVolume, E(volume_id=VOL, volume_capability=mount_cap())) == C.INVALID_ARGUMENT
    negative = E(volume_id=VOL, volume_path="some/path", capacity_range=csi_pb2.CapacityRange(required_bytes=-1))
    assert code_of(env.node.NodeExpandVolume, negative) == C.INVALID_ARGUMENT
    assert code_of(env.node.NodeGetVolumeStats, S(volume_id=VOL, volume_path="/a\x00b")) == C.INVALID_ARGUMENT
