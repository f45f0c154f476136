"""Fuzz the CSI controller and node services over real gRPC.

Controller: the real ControllerService in front of the real agent servicer on fake ZFS
(agent.fakes), so hostile values travel the whole control path. Node: the real NodeService on
csi.fakes' NVMe host and mounter; paths stay under a scratch folder (the node plugin creates
and removes directories for real), hostile *segments* are still in them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_support import HOSTILE, Tally, hostile_text, sizes  # type: ignore[import-not-found]

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.fakes import FakeMounter, FakeNvmeHost, GiB
from csi.host_identity import HostIdentity
from csi.identity import IdentityService
from csi.mounter import check_mount_flags
from csi.node import NodeService
from csi.nvme_host import connect_argv
from csi.server import Services, build_server
from zvolt.names import id_for_name, subsystem_nqn
from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import parse_endpoint

EXAMPLES = 500
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
Mode = csi_pb2.VolumeCapability.AccessMode
MODES: list[Any] = list(Mode.Mode.values())


def no_agent(code: grpc.StatusCode, details: str) -> bool:
    # A well-formed id naming a storage node nobody runs: UNAVAILABLE (retry) is the design
    # (csi/README.md "Agent discovery"), so a volume is never falsely reported deleted.
    return code == grpc.StatusCode.UNAVAILABLE and "has no known agent" in details


@dataclass
class Ctl:
    stub: csi_pb2_grpc.ControllerStub
    tally: Tally
    node: FakeNode
    good_volume: str
    good_snapshot: str


@pytest.fixture(scope="module")
def ctl() -> Iterator[Ctl]:
    tmp = tempfile.mkdtemp(prefix="zvfzc", dir="/tmp")
    node = make_node(f"{tmp}/state", f"{tmp}/configfs", pool_size=1 << 44)
    metrics = Metrics()
    agent_server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=4)
    agent_server.add_insecure_port(f"unix://{tmp}/agent.sock")
    agent_server.start()
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{tmp}/agent.sock"), tls=None, timeout=60)
    server, target = build_server(
        Services(identity=IdentityService(True, lambda: True), controller=ControllerService(pool)),
        parse_endpoint(f"unix://{tmp}/controller.sock"),
    )
    server.start()
    channel = grpc.insecure_channel(target)
    stub = csi_pb2_grpc.ControllerStub(channel)
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                   access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    vol = stub.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="fuzz-seed", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB), volume_capabilities=[cap]),
        timeout=10).volume
    snap = stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(name="fuzz-seed-snap", source_volume_id=vol.volume_id),
                               timeout=10).snapshot
    tally = Tally(tolerate=no_agent)
    yield Ctl(stub, tally, node, vol.volume_id, snap.snapshot_id)
    print(f"\nCSI controller fuzz: {tally.cases} gRPC calls, codes {dict(sorted(tally.codes.items()))}")
    channel.close()
    server.stop(None)
    pool.close()
    agent_server.stop(None)
    node.index.close()
    shutil.rmtree(tmp, ignore_errors=True)


def caps() -> st.SearchStrategy[csi_pb2.VolumeCapability]:
    mount = st.builds(lambda fs, flags, group, mode: csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=flags, volume_mount_group=group),
        access_mode=Mode(mode=mode)),
        st.one_of(st.sampled_from(["", "ext4", "xfs"]), hostile_text), st.lists(hostile_text, max_size=3),
        st.one_of(st.just(""), hostile_text), st.sampled_from([*MODES, 99]))
    block = st.builds(lambda mode: csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                                            access_mode=Mode(mode=mode)), st.sampled_from(MODES))
    empty = st.just(csi_pb2.VolumeCapability())
    return st.one_of(mount, block, empty)


def vol_ids(good: str) -> st.SearchStrategy[str]:
    return st.one_of(hostile_text, st.just(good), st.builds(lambda s: "storage-0/" + s, hostile_text),
                     st.builds(lambda s: s + "/v" + "a" * 20, hostile_text))


params = st.dictionaries(
    st.one_of(st.sampled_from(["volblocksize", "compression", "thin", "csi.storage.k8s.io/fstype",
                               "csi.storage.k8s.io/pvc/name", "csi.storage.k8s.io/pvc/namespace"]), hostile_text),
    st.one_of(st.sampled_from(["8K", "16K", "lz4", "true", "false", "ext4", "xfs"]), hostile_text), max_size=4)


def ranges() -> st.SearchStrategy[csi_pb2.CapacityRange | None]:
    return st.one_of(st.none(), st.builds(lambda r, lim: csi_pb2.CapacityRange(required_bytes=r, limit_bytes=lim),
                                          sizes, sizes))


@FUZZ
@given(data=st.data())
def test_fuzz_controller_create(ctl: Ctl, data: st.DataObject) -> None:
    src = data.draw(st.sampled_from(["none", "snap", "vol"]))
    source = None
    if src == "snap":
        source = csi_pb2.VolumeContentSource(snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
            snapshot_id=data.draw(st.one_of(hostile_text, st.just(ctl.good_snapshot)))))
    elif src == "vol":
        source = csi_pb2.VolumeContentSource(volume=csi_pb2.VolumeContentSource.VolumeSource(
            volume_id=data.draw(vol_ids(ctl.good_volume))))
    req = csi_pb2.CreateVolumeRequest(
        name=data.draw(hostile_text), capacity_range=data.draw(ranges()),
        volume_capabilities=data.draw(st.lists(caps(), max_size=2)), parameters=data.draw(params),
        secrets=data.draw(st.dictionaries(hostile_text, hostile_text, max_size=2)),
        volume_content_source=source,
    )
    ctl.tally.call(ctl.stub.CreateVolume, req)


@FUZZ
@given(data=st.data(), op=st.sampled_from(["delete", "publish", "unpublish", "validate", "expand", "get",
                                           "snap", "delsnap", "listsnap", "list", "capacity", "modify"]))
def test_fuzz_controller_calls(ctl: Ctl, data: st.DataObject, op: str) -> None:
    s, t = ctl.stub, ctl.tally
    vid = data.draw(vol_ids(ctl.good_volume))
    if op == "delete" and vid != ctl.good_volume:
        t.call(s.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vid))
    elif op == "publish":
        node_id = data.draw(st.one_of(hostile_text, st.just(HOST)))
        res = t.call(s.ControllerPublishVolume, csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=node_id, volume_capability=data.draw(caps()), readonly=data.draw(st.booleans()),
            volume_context=data.draw(st.dictionaries(hostile_text, hostile_text, max_size=2))))
        if res is not None:
            t.call(s.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid,
                                                                                          node_id=node_id))
    elif op == "unpublish":
        t.call(s.ControllerUnpublishVolume, csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=data.draw(hostile_text)))
    elif op == "validate":
        t.call(s.ValidateVolumeCapabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vid, volume_capabilities=data.draw(st.lists(caps(), max_size=2)),
            parameters=data.draw(params)))
    elif op == "expand":
        t.call(s.ControllerExpandVolume, csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=data.draw(ranges())))
    elif op == "get":
        t.call(s.ControllerGetVolume, csi_pb2.ControllerGetVolumeRequest(volume_id=vid))
    elif op == "modify":
        t.call(s.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vid, mutable_parameters=data.draw(params)))
    elif op == "snap":
        t.call(s.CreateSnapshot, csi_pb2.CreateSnapshotRequest(
            source_volume_id=vid, name=data.draw(hostile_text), parameters=data.draw(params)))
    elif op == "delsnap":
        sid = data.draw(st.one_of(hostile_text, st.builds(lambda x: ctl.good_volume + "@" + x, hostile_text)))
        t.call(s.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=sid))
    elif op == "listsnap":
        t.call(s.ListSnapshots, csi_pb2.ListSnapshotsRequest(
            max_entries=data.draw(st.integers(-(1 << 31), (1 << 31) - 1)), starting_token=data.draw(hostile_text),
            source_volume_id=vid, snapshot_id=data.draw(hostile_text)))
    elif op == "list":
        t.call(s.ListVolumes, csi_pb2.ListVolumesRequest(
            max_entries=data.draw(st.integers(-(1 << 31), (1 << 31) - 1)), starting_token=data.draw(hostile_text)))
    elif op == "capacity":
        t.call(s.GetCapacity, csi_pb2.GetCapacityRequest(volume_capabilities=data.draw(st.lists(caps(), max_size=1)),
                                                         parameters=data.draw(params)))


def test_zz_controller_state_is_intact(ctl: Ctl) -> None:
    got = ctl.stub.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=ctl.good_volume), timeout=10)
    assert got.volume.volume_id == ctl.good_volume and not got.status.volume_condition.abnormal
    outside = [n for n in ctl.node.zfs.ds if n != "tank" and not n.startswith("tank/zvolt")]
    assert outside == []
    assert ctl.tally.cases > EXAMPLES


# ---------------------------------------------------------------- node


@dataclass
class Node:
    stub: csi_pb2_grpc.NodeStub
    tally: Tally
    nvme: FakeNvmeHost
    mounter: FakeMounter
    root: str
    good_volume: str
    ctx: dict[str, str]


@pytest.fixture(scope="module")
def nde() -> Iterator[Node]:
    tmp = tempfile.mkdtemp(prefix="zvfzn", dir="/tmp")
    nvme = FakeNvmeHost()
    mounter = FakeMounter(nvme.device_size)
    good = "storage-0/" + id_for_name("fuzz-node")
    nqn = subsystem_nqn("storage-0", good.split("/")[1])
    nvme.add_subsystem(nqn, GiB)
    service = NodeService(HostIdentity(HOST, "11111111-1111-4111-8111-111111111111"), nvme, mounter, zone="default",
                          device_timeout=0.2, resize_timeout=0.1)
    server, target = build_server(Services(identity=IdentityService(False, lambda: True), node=service),
                                  parse_endpoint(f"unix://{tmp}/node.sock"))
    server.start()
    channel = grpc.insecure_channel(target)
    ctx = {"nqn": nqn, "transport": "tcp", "address": "10.42.0.1", "port": "4420"}
    tally = Tally()
    yield Node(csi_pb2_grpc.NodeStub(channel), tally, nvme, mounter, tmp, good, ctx)
    print(f"\nCSI node fuzz: {tally.cases} gRPC calls, codes {dict(sorted(tally.codes.items()))}")
    channel.close()
    server.stop(None)
    shutil.rmtree(tmp, ignore_errors=True)


def paths(root: str) -> st.SearchStrategy[str]:
    # Hostile characters inside one path segment under the scratch root; never a way out of it
    # (a real kubelet path is root-owned and trusted; this checks parsing, not containment).
    segment = hostile_text.map(lambda s: s.replace("/", "_").replace("..", "__")[:200] or "_")
    return st.one_of(st.builds(lambda a: f"{root}/p/{a}", segment), st.sampled_from(["", "relative", "./x", "~"]))


@FUZZ
@given(data=st.data(), op=st.sampled_from(["stage", "unstage", "publish", "unpublish", "stats", "expand"]))
def test_fuzz_node_calls(nde: Node, data: st.DataObject, op: str) -> None:
    s, t = nde.stub, nde.tally
    vid = data.draw(st.one_of(st.just(nde.good_volume), vol_ids(nde.good_volume)))
    p1, p2 = data.draw(paths(nde.root)), data.draw(paths(nde.root))
    keys = ["nqn", "transport", "address", "port", "dhchap"]
    ctx = data.draw(st.one_of(
        st.just(nde.ctx),
        st.dictionaries(st.sampled_from(keys), hostile_text, max_size=6),
        st.builds(lambda k, v: {**nde.ctx, k: v}, st.sampled_from(keys), hostile_text),
    ))
    if op == "stage":
        t.call(s.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, publish_context=ctx, staging_target_path=p1, volume_capability=data.draw(caps()),
            secrets=data.draw(st.one_of(st.dictionaries(hostile_text, hostile_text, max_size=2),
                                        st.dictionaries(st.sampled_from(["dhchapKey", "dhchapCtrlKey"]), hostile_text,
                                                        max_size=2)))))
        # Whatever reached mount(8) is one allow-listed option per entry: no comma lists, no "-o".
        for info in nde.mounter.mounts.values():
            for option in info.options:
                assert check_mount_flags([option]) == [option] and "," not in option and not option.startswith("-")
        # Whatever reached nvme connect is the node's own identity and a target that passed the
        # allow-list (a hostile but well-formed host name from the publish context may connect;
        # the context comes from the controller, and the target still checks our host NQN).
        for spec in nde.nvme.connects:
            assert spec.hostnqn == HOST and spec.transport == "tcp"
            argv = connect_argv(spec)  # validates again: raises if anything slipped past the node
            assert all(not value.startswith("-") for value in argv[3::2]), argv  # no option smuggled in a value
    elif op == "unstage":
        t.call(s.NodeUnstageVolume, csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=p1))
    elif op == "publish":
        t.call(s.NodePublishVolume, csi_pb2.NodePublishVolumeRequest(
            volume_id=vid, publish_context=ctx, staging_target_path=p1, target_path=p2,
            volume_capability=data.draw(caps()), readonly=data.draw(st.booleans())))
    elif op == "unpublish":
        t.call(s.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=p2))
    elif op == "stats":
        t.call(s.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=p1))
    else:
        rng = data.draw(ranges())
        t.call(s.NodeExpandVolume, csi_pb2.NodeExpandVolumeRequest(volume_id=vid, volume_path=p1,
                                                                   capacity_range=rng))


@pytest.mark.parametrize("flag", ["-o", "rw,dev", "nodev,suid", "exec", "suid", "dev", "remount",
                                  "context=system_u:object_r", "loop=/dev/loop0", "x-systemd.automount",
                                  "uid=0", "errors=remount-ro,suid", "data=journal\x00,suid", "ro -o rw",
                                  "--bind", "commit=5,dev"])
def test_hostile_mount_flags_are_refused(nde: Node, flag: str) -> None:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=[flag]),
                                   access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    before = dict(nde.mounter.mounts)
    assert nde.tally.call(nde.stub.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=nde.good_volume, publish_context=nde.ctx, staging_target_path=f"{nde.root}/flags",
        volume_capability=cap), allowed={grpc.StatusCode.INVALID_ARGUMENT}) is None
    assert nde.mounter.mounts == before or f"{nde.root}/flags" not in nde.mounter.mounts


@pytest.mark.parametrize("value", [v for v in HOSTILE if v][:40])
def test_hostile_paths_and_ids_on_the_node(nde: Node, value: str) -> None:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
                                   access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER))
    t, s = nde.tally, nde.stub
    if not value.startswith("/"):
        # Relative or empty paths never reach the filesystem.
        assert t.call(s.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
            volume_id=nde.good_volume, publish_context=nde.ctx, staging_target_path=value, volume_capability=cap),
            allowed={grpc.StatusCode.INVALID_ARGUMENT}) is None
        assert t.call(s.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=nde.good_volume, target_path=value), allowed={grpc.StatusCode.INVALID_ARGUMENT}) is None
    t.call(s.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=value, publish_context=nde.ctx, staging_target_path=f"{nde.root}/h", volume_capability=cap))
    t.call(s.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(volume_id=value, volume_path=f"{nde.root}/h"))
    # A publish_context for another volume's NQN is refused: a node never connects where it was not sent.
    bad = {**nde.ctx, "nqn": subsystem_nqn("storage-0", "vother")}
    assert t.call(s.NodeStageVolume, csi_pb2.NodeStageVolumeRequest(
        volume_id=nde.good_volume, publish_context=bad, staging_target_path=f"{nde.root}/h",
        volume_capability=cap), allowed={grpc.StatusCode.INVALID_ARGUMENT}) is None
