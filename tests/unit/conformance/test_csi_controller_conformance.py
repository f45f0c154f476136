"""CSI spec v1.12.0 conformance of the Controller service (real gRPC, fake agents)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest

from csi import TOPOLOGY_ZONE_KEY
from csi.controller import PageToken, alpha_capabilities
from csi.fakes import FakeAgent, GiB
from zvolt.errors import ZvoltError
from zvolt.pb import csi_pb2, csi_pb2_grpc

from .support import (
    NODE_A,
    NODE_B,
    ControllerEnv,
    block_cap,
    code_of,
    mount_cap,
    start_controller,
    stop_controller,
)

Mode = csi_pb2.VolumeCapability.AccessMode
RPC = csi_pb2.ControllerServiceCapability.RPC
C = grpc.StatusCode


def create(env: ControllerEnv, name: str, size: int = GiB, **kw: object) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(
        name=name,
        capacity_range=csi_pb2.CapacityRange(required_bytes=size),
        volume_capabilities=kw.pop("caps", [mount_cap()]),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )
    vol: csi_pb2.Volume = env.controller.CreateVolume(req).volume
    return vol


# ------------------------------------------------------------------ capabilities


def test_controller_capabilities_are_exactly_the_implemented_ones(ctl: ControllerEnv) -> None:
    caps = {
        c.rpc.type
        for c in ctl.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
    }
    # GET_SNAPSHOT is alpha in CSI 1.12: off unless --alpha-capabilities asks for it.
    assert caps == {
        RPC.CREATE_DELETE_VOLUME, RPC.PUBLISH_UNPUBLISH_VOLUME, RPC.LIST_VOLUMES, RPC.LIST_VOLUMES_PUBLISHED_NODES,
        RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME,
        RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.VOLUME_CONDITION, RPC.SINGLE_NODE_MULTI_WRITER,
        RPC.MODIFY_VOLUME,
    }  # fmt: skip


def test_alpha_capabilities_are_opt_in() -> None:
    assert alpha_capabilities("") == ()
    assert alpha_capabilities("GET_SNAPSHOT") == (RPC.GET_SNAPSHOT,)
    with pytest.raises(ZvoltError) as err:
        alpha_capabilities("GET_SNAPSHOT,MODIFY_EVERYTHING")
    assert err.value.code == C.INVALID_ARGUMENT and "MODIFY_EVERYTHING" in err.value.message


def test_identity_in_controller_mode(ctl: ControllerEnv) -> None:
    info = ctl.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.zvolt.io" and info.vendor_version
    caps = ctl.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    S = csi_pb2.PluginCapability.Service
    assert services == {S.CONTROLLER_SERVICE, S.VOLUME_ACCESSIBILITY_CONSTRAINTS, S.GROUP_CONTROLLER_SERVICE}
    assert [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")] == [
        csi_pb2.PluginCapability.VolumeExpansion.ONLINE
    ]
    # Liveness is the process: a storage outage must not make livenessprobe restart the controller.
    assert ctl.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    for agent in ctl.agents.values():
        agent.ready = False
    assert ctl.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


# ------------------------------------------------------------------ CreateVolume


def test_create_volume_success_and_idempotent_repeat(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-1", size=GiB + 1)
    node, _, local = vol.volume_id.partition("/")
    assert node in ctl.agents and local
    assert vol.capacity_bytes == GiB + 16384  # rounded up to the 16K default volblocksize
    assert vol.volume_context["zvolt.io/storage-node"] == node
    assert [dict(t.segments) for t in vol.accessible_topology] == [{TOPOLOGY_ZONE_KEY: "default"}]
    again = create(ctl, "pvc-1", size=GiB + 1)
    assert again == vol
    assert sum(len(a.state.volumes) for a in ctl.agents.values()) == 1


def test_create_volume_default_size_and_parameters(ctl: ControllerEnv) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-params",
        volume_capabilities=[mount_cap(fs="xfs")],
        parameters={"volblocksize": "8K", "compression": "zstd", "thin": "false", "csi.storage.k8s.io/fstype": "xfs"},
    )
    vol = ctl.controller.CreateVolume(req).volume
    assert vol.capacity_bytes == GiB
    node, _, local = vol.volume_id.partition("/")
    stored = ctl.agents[node].state.volumes[local]
    assert (stored.volblocksize, stored.compression, stored.thick) == (8192, "zstd", True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: r.ClearField("name"),
        lambda r: r.ClearField("volume_capabilities"),
        lambda r: r.volume_capabilities[0].ClearField("access_mode"),
        lambda r: r.volume_capabilities[0].ClearField("mount"),
        lambda r: r.parameters.update({"bogus": "1"}),
        lambda r: r.parameters.update({"volblocksize": "3K"}),
        lambda r: r.parameters.update({"compression": "brotli"}),
        lambda r: r.volume_capabilities[0].mount.mount_flags.append("exec,dev"),
        lambda r: r.volume_capabilities[0].mount.mount_flags.append("x-mount.mkdir=/etc"),
        lambda r: setattr(r.volume_capabilities[0].mount, "fs_type", "btrfs"),
        lambda r: setattr(r.capacity_range, "required_bytes", -1),
    ],
)
def test_create_volume_invalid_argument(ctl: ControllerEnv, mutate: object) -> None:
    req = csi_pb2.CreateVolumeRequest(name="pvc-bad", volume_capabilities=[mount_cap()])
    mutate(req)  # type: ignore[operator]
    assert code_of(ctl.controller.CreateVolume, req) == C.INVALID_ARGUMENT


def test_multi_node_writers_refused_for_filesystems_with_clear_message(ctl: ControllerEnv) -> None:
    for mode in (Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_SINGLE_WRITER):
        req = csi_pb2.CreateVolumeRequest(name="pvc-rwx", volume_capabilities=[mount_cap(mode)])
        with pytest.raises(grpc.RpcError) as err:
            ctl.controller.CreateVolume(req)
        assert err.value.code() == C.INVALID_ARGUMENT
        assert "filesystem" in err.value.details() and "raw block" in err.value.details()
    # Raw block volumes may be shared by several nodes.
    assert create(ctl, "pvc-rwx-block", caps=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)]).volume_id


def test_create_volume_name_reuse_with_other_size_is_already_exists(ctl: ControllerEnv) -> None:
    create(ctl, "pvc-2", size=GiB)
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-2", capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB), volume_capabilities=[mount_cap()]
    )
    assert code_of(ctl.controller.CreateVolume, req) == C.ALREADY_EXISTS
    req = csi_pb2.CreateVolumeRequest(name="pvc-2", volume_capabilities=[mount_cap()], parameters={"thin": "false"})
    assert code_of(ctl.controller.CreateVolume, req) == C.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("required", "limit"), [(2 * GiB, GiB), (0, 1000), (GiB + 1, GiB + 2)]
)  # limit < required; limit below one block; no block multiple in range
def test_create_volume_unsatisfiable_range_is_out_of_range(ctl: ControllerEnv, required: int, limit: int) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-range",
        capacity_range=csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit),
        volume_capabilities=[mount_cap()],
    )
    assert code_of(ctl.controller.CreateVolume, req) == C.OUT_OF_RANGE


def test_create_volume_limit_only_and_exact(ctl: ControllerEnv) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-limit",
        capacity_range=csi_pb2.CapacityRange(limit_bytes=256 * 1024**2),
        volume_capabilities=[mount_cap()],
    )
    assert ctl.controller.CreateVolume(req).volume.capacity_bytes == 256 * 1024**2
    exact = 3 * GiB
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-exact", capacity_range=csi_pb2.CapacityRange(required_bytes=exact, limit_bytes=exact),
        volume_capabilities=[mount_cap()],
    )  # fmt: skip
    assert ctl.controller.CreateVolume(req).volume.capacity_bytes == exact


def test_thick_volume_without_space_is_resource_exhausted(ctl: ControllerEnv) -> None:
    for agent in ctl.agents.values():
        agent.total = 2 * GiB
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-huge", capacity_range=csi_pb2.CapacityRange(required_bytes=5 * GiB),
        volume_capabilities=[mount_cap()], parameters={"thin": "false"},
    )  # fmt: skip
    assert code_of(ctl.controller.CreateVolume, req) == C.RESOURCE_EXHAUSTED
    # Thin volumes overcommit on purpose.
    req.parameters["thin"] = "true"
    req.name = "pvc-huge-thin"
    assert ctl.controller.CreateVolume(req).volume.capacity_bytes == 5 * GiB


def test_placement_prefers_the_emptiest_node(ctl: ControllerEnv) -> None:
    ctl.agents["storage-0"].total = 10 * GiB
    ctl.agents["storage-1"].total = 50 * GiB
    assert create(ctl, "pvc-place").volume_id.startswith("storage-1/")


def test_placement_honours_topology(sockdir: str) -> None:
    agents = {"s-a": FakeAgent("s-a", total_bytes=100 * GiB), "s-b": FakeAgent("s-b", total_bytes=10 * GiB)}
    server, agent_servers, channel, pool, _ = start_controller(sockdir, agents, zones={"s-a": "z1", "s-b": "z2"})
    try:
        stub = csi_pb2_grpc.ControllerStub(channel)

        def req(name: str, zones: list[str]) -> csi_pb2.CreateVolumeRequest:
            topo = [csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: z}) for z in zones]
            return csi_pb2.CreateVolumeRequest(
                name=name, volume_capabilities=[mount_cap()],
                accessibility_requirements=csi_pb2.TopologyRequirement(requisite=topo, preferred=topo),
            )  # fmt: skip

        vol = stub.CreateVolume(req("pvc-z2", ["z2"])).volume
        assert vol.volume_id.startswith("s-b/")
        assert dict(vol.accessible_topology[0].segments) == {TOPOLOGY_ZONE_KEY: "z2"}
        assert code_of(stub.CreateVolume, req("pvc-z9", ["z9"])) == C.RESOURCE_EXHAUSTED
        cap = stub.GetCapacity(
            csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_ZONE_KEY: "z2"}))
        )
        assert cap.available_capacity == 10 * GiB
    finally:
        stop_controller(server, agent_servers, channel, pool)


def test_concurrent_create_of_one_name_is_aborted(ctl: ControllerEnv) -> None:
    gate = threading.Event()
    for agent in ctl.agents.values():
        agent.create_gate = gate
    with futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(create, ctl, "pvc-race")
        assert any(a.create_entered.wait(5) for a in ctl.agents.values())
        req = csi_pb2.CreateVolumeRequest(name="pvc-race", volume_capabilities=[mount_cap()])
        assert code_of(ctl.controller.CreateVolume, req) == C.ABORTED
        gate.set()
        assert first.result(10).volume_id


# ----------------------------------------------------------- snapshots, clones


def test_snapshot_lifecycle_restore_and_clone_on_source_node(ctl: ControllerEnv) -> None:
    src = create(ctl, "pvc-src", size=2 * GiB)
    node = src.volume_id.split("/")[0]
    req = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=src.volume_id)
    snap = ctl.controller.CreateSnapshot(req).snapshot
    assert snap.snapshot_id.startswith(f"{node}/") and snap.source_volume_id == src.volume_id
    assert snap.size_bytes == 2 * GiB and snap.ready_to_use and snap.creation_time.seconds > 0
    assert ctl.controller.CreateSnapshot(req).snapshot == snap
    # Same snapshot name, other source: ALREADY_EXISTS.
    other = create(ctl, "pvc-other")
    if other.volume_id.split("/")[0] == node:
        bad = csi_pb2.CreateSnapshotRequest(name="snap-1", source_volume_id=other.volume_id)
        assert code_of(ctl.controller.CreateSnapshot, bad) == C.ALREADY_EXISTS
    # Restore: lands on the snapshot's node, at least the restore size.
    restore = csi_pb2.CreateVolumeRequest(
        name="pvc-restore", volume_capabilities=[mount_cap()],
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snap.snapshot_id)
        ),
    )  # fmt: skip
    vol = ctl.controller.CreateVolume(restore).volume
    assert vol.volume_id.startswith(f"{node}/") and vol.capacity_bytes == 2 * GiB
    assert vol.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert ctl.controller.CreateVolume(restore).volume == vol
    small = csi_pb2.CreateVolumeRequest()
    small.CopyFrom(restore)
    small.name = "pvc-restore-small"
    small.capacity_range.limit_bytes = GiB
    assert code_of(ctl.controller.CreateVolume, small) == C.OUT_OF_RANGE
    # Clone of a volume.
    clone = csi_pb2.CreateVolumeRequest(
        name="pvc-clone", volume_capabilities=[mount_cap()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=3 * GiB),
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=src.volume_id)
        ),
    )  # fmt: skip
    cvol = ctl.controller.CreateVolume(clone).volume
    assert cvol.volume_id.startswith(f"{node}/") and cvol.capacity_bytes == 3 * GiB
    assert cvol.content_source.volume.volume_id == src.volume_id
    # Delete in any order, twice.
    for _ in range(2):
        ctl.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    gone = csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)
    assert code_of(ctl.controller.GetSnapshot, gone) == C.NOT_FOUND


def restore_request(name: str, snapshot_id: str) -> csi_pb2.CreateVolumeRequest:
    return csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[mount_cap()],
        volume_content_source=csi_pb2.VolumeContentSource(
            snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id=snapshot_id)
        ),
    )  # fmt: skip


@pytest.mark.parametrize("source", ["storage-0/vnope@snope", "garbage"])
def test_restore_from_unknown_snapshot_is_not_found(ctl: ControllerEnv, source: str) -> None:
    assert code_of(ctl.controller.CreateVolume, restore_request("pvc-nosnap", source)) == C.NOT_FOUND


def test_restore_from_a_storage_node_not_discovered_yet_is_retried(ctl: ControllerEnv) -> None:
    """NOT_FOUND is final for external-provisioner: a node that may just not be discovered yet
    is UNAVAILABLE, so the PVC is retried instead of failing for good."""
    assert code_of(ctl.controller.CreateVolume, restore_request("pvc-later", "nowhere-9/vx@sy")) == C.UNAVAILABLE


def test_create_retry_after_its_source_snapshot_was_deleted_returns_the_volume(ctl: ControllerEnv) -> None:
    src = create(ctl, "pvc-src-gone")
    snap = ctl.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap-gone", source_volume_id=src.volume_id))
    req = restore_request("pvc-from-gone", snap.snapshot.snapshot_id)
    first = ctl.controller.CreateVolume(req).volume
    ctl.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot.snapshot_id))
    again = ctl.controller.CreateVolume(req).volume  # the provisioner retried (e.g. its first answer was lost)
    assert again.volume_id == first.volume_id


def test_snapshot_of_a_volume_on_a_node_not_discovered_yet_is_retried(ctl: ControllerEnv) -> None:
    req = csi_pb2.CreateSnapshotRequest(name="snap-later", source_volume_id="storage-9/vabc")
    assert code_of(ctl.controller.CreateSnapshot, req) == C.UNAVAILABLE


def test_create_volume_waits_while_a_storage_node_cannot_answer(sockdir: str) -> None:
    """A name lookup that skipped an unreachable agent could create a second copy of a volume
    that lives there: UNAVAILABLE until every agent can answer."""
    agents = {"storage-0": FakeAgent("storage-0"), "storage-1": FakeAgent("storage-1", address="10.0.0.2")}
    server, agent_servers, channel, pool, _ = start_controller(sockdir, agents)
    stub = csi_pb2_grpc.ControllerStub(channel)
    try:
        req = csi_pb2.CreateVolumeRequest(name="pvc-twice", volume_capabilities=[mount_cap()])
        agent_servers[1].stop(None)
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateVolume(req, timeout=30)
        assert err.value.code() == C.UNAVAILABLE and "storage-1" in (err.value.details() or "")
        assert not agents["storage-0"].state.volumes
    finally:
        stop_controller(server, agent_servers, channel, pool)


def test_clone_from_unknown_volume_is_not_found(ctl: ControllerEnv) -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-noclone", volume_capabilities=[mount_cap()],
        volume_content_source=csi_pb2.VolumeContentSource(
            volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="storage-0/vmissing")
        ),
    )  # fmt: skip
    assert code_of(ctl.controller.CreateVolume, req) == C.NOT_FOUND


def test_create_snapshot_errors(ctl: ControllerEnv) -> None:
    src = create(ctl, "pvc-snaperr")
    cs = ctl.controller.CreateSnapshot
    assert code_of(cs, csi_pb2.CreateSnapshotRequest(source_volume_id=src.volume_id)) == C.INVALID_ARGUMENT
    assert code_of(cs, csi_pb2.CreateSnapshotRequest(name="s")) == C.INVALID_ARGUMENT
    assert code_of(cs, csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="storage-0/vnone")) == C.NOT_FOUND
    assert code_of(cs, csi_pb2.CreateSnapshotRequest(name="s", source_volume_id="junk")) == C.NOT_FOUND
    assert code_of(ctl.controller.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest()) == C.INVALID_ARGUMENT
    for unknown in ("storage-0/vnone@snone", "junk"):
        ctl.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=unknown))
    assert code_of(ctl.controller.GetSnapshot, csi_pb2.GetSnapshotRequest()) == C.INVALID_ARGUMENT


def test_create_snapshot_takes_the_snapshotters_extra_metadata(ctl: ControllerEnv) -> None:
    """csi-snapshotter --extra-create-metadata (the chart sets it) adds these to every call."""
    src = create(ctl, "pvc-snapmeta")
    meta = {
        "csi.storage.k8s.io/volumesnapshot/name": "nightly",
        "csi.storage.k8s.io/volumesnapshot/namespace": "team-a",
        "csi.storage.k8s.io/volumesnapshotcontent/name": "snapcontent-1234",
    }
    req = csi_pb2.CreateSnapshotRequest(name="snapshot-1234", source_volume_id=src.volume_id, parameters=meta)
    snap = ctl.controller.CreateSnapshot(req).snapshot
    node, _, local = snap.snapshot_id.partition("/")
    assert ctl.agents[node].state.snapshot_labels[local] == {
        "snapshot-name": "nightly", "snapshot-namespace": "team-a", "snapshotcontent-name": "snapcontent-1234"
    }
    bad = csi_pb2.CreateSnapshotRequest(name="snapshot-2", source_volume_id=src.volume_id, parameters={"x": "1"})
    with pytest.raises(grpc.RpcError) as err:
        ctl.controller.CreateSnapshot(bad)
    assert err.value.code() == C.INVALID_ARGUMENT and "'x'" in (err.value.details() or "")


def test_probe_answers_while_every_worker_waits_on_agents(ctl: ControllerEnv) -> None:
    """livenessprobe gives Probe 1 s: 20 CreateVolume calls stuck on a slow agent must not starve it."""
    gate = threading.Event()
    for agent in ctl.agents.values():
        agent.create_gate = gate
    with futures.ThreadPoolExecutor(max_workers=20) as pool:
        pending = [
            pool.submit(ctl.controller.CreateVolume, csi_pb2.CreateVolumeRequest(
                name=f"pvc-load-{i}", volume_capabilities=[mount_cap()]), timeout=60)
            for i in range(20)
        ]
        try:
            deadline = time.monotonic() + 10
            while not any(a.create_entered.is_set() for a in ctl.agents.values()):
                assert time.monotonic() < deadline, "no CreateVolume reached an agent"
                time.sleep(0.05)
            time.sleep(0.5)  # let the rest reach the agents
            for _ in range(5):
                assert ctl.identity.Probe(csi_pb2.ProbeRequest(), timeout=1).ready.value is True
        finally:
            gate.set()
        for call in pending:
            call.result()


def test_list_snapshots_filters_and_pagination(ctl: ControllerEnv) -> None:
    ids = set()
    vols = [create(ctl, f"pvc-ls-{i}") for i in range(3)]
    for i, vol in enumerate(vols):
        for j in range(2):
            req = csi_pb2.CreateSnapshotRequest(name=f"snap-{i}-{j}", source_volume_id=vol.volume_id)
            ids.add(ctl.controller.CreateSnapshot(req).snapshot.snapshot_id)
    seen, token, pages = [], "", 0
    while True:
        resp = ctl.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(max_entries=4, starting_token=token))
        assert len(resp.entries) <= 4
        seen += [e.snapshot.snapshot_id for e in resp.entries]
        pages += 1
        token = resp.next_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and pages >= 2
    one = sorted(ids)[0]
    got = ctl.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=one)).entries
    assert [e.snapshot.snapshot_id for e in got] == [one]
    assert ctl.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=one)).snapshot.snapshot_id == one
    by_src = ctl.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vols[1].volume_id)).entries
    assert {e.snapshot.source_volume_id for e in by_src} == {vols[1].volume_id} and len(by_src) == 2
    for bogus in ("storage-0/vnone@snone", "junk"):
        assert not ctl.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=bogus)).entries
    assert not ctl.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id="junk")).entries
    bad = csi_pb2.ListSnapshotsRequest(starting_token="not-a-token!")
    assert code_of(ctl.controller.ListSnapshots, bad) == C.ABORTED


# ------------------------------------------------------------------ DeleteVolume


def test_delete_volume_is_idempotent_and_tolerates_unknown_ids(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-del")
    for _ in range(2):
        ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert all(not a.state.volumes for a in ctl.agents.values())
    for unknown in ("storage-0/vnothere", "not-a-zvolt-id"):
        ctl.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=unknown))
    assert code_of(ctl.controller.DeleteVolume, csi_pb2.DeleteVolumeRequest()) == C.INVALID_ARGUMENT
    # A storage node nobody knows: retry later rather than claim success.
    req = csi_pb2.DeleteVolumeRequest(volume_id="storage-9/vabc")
    assert code_of(ctl.controller.DeleteVolume, req) == C.UNAVAILABLE


def test_delete_published_volume_is_failed_precondition(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-inuse")
    pub = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_A, volume_capability=mount_cap())
    ctl.controller.ControllerPublishVolume(pub)
    req = csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id)
    assert code_of(ctl.controller.DeleteVolume, req) == C.FAILED_PRECONDITION


# ------------------------------------------------------------ publish/unpublish


def test_publish_unpublish_lifecycle(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-pub")
    node, local = vol.volume_id.split("/")
    pub = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_A, volume_capability=mount_cap())
    ctx = dict(ctl.controller.ControllerPublishVolume(pub).publish_context)
    assert ctx == {
        "nqn": f"nqn.2026-11.io.zvolt:{node}:{local}",
        "transport": "tcp",
        "address": ctl.agents[node].address,
        "port": "4420",
    }
    assert dict(ctl.controller.ControllerPublishVolume(pub).publish_context) == ctx
    assert list(ctl.agents[node].state.volumes[local].published_hosts) == [NODE_A]
    # Single-node mode: another node may not attach while the first one holds it.
    other = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id=NODE_B, volume_capability=mount_cap()
    )
    assert code_of(ctl.controller.ControllerPublishVolume, other) == C.FAILED_PRECONDITION
    got = ctl.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert list(got.status.published_node_ids) == [NODE_A] and not got.status.volume_condition.abnormal
    unpub = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_A)
    for _ in range(2):
        ctl.controller.ControllerUnpublishVolume(unpub)
    assert not ctl.agents[node].state.volumes[local].published_hosts
    ctl.controller.ControllerPublishVolume(other)  # free again


def test_multi_node_reader_and_block_multi_writer_publish_to_many(ctl: ControllerEnv) -> None:
    for name, cap in (
        ("pvc-rox", mount_cap(Mode.MULTI_NODE_READER_ONLY)),
        ("pvc-rwxb", block_cap(Mode.MULTI_NODE_MULTI_WRITER)),
    ):
        vol = create(ctl, name, caps=[cap])
        for node_id in (NODE_A, NODE_B):
            req = csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol.volume_id, node_id=node_id, volume_capability=cap, readonly=True
            )
            ctl.controller.ControllerPublishVolume(req)
        # Unpublish without node_id means: from every node.
        ctl.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id))
        got = ctl.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert not got.status.published_node_ids


def test_publish_errors(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-puberr")
    P = csi_pb2.ControllerPublishVolumeRequest
    call = ctl.controller.ControllerPublishVolume
    assert code_of(call, P(node_id=NODE_A, volume_capability=mount_cap())) == C.INVALID_ARGUMENT
    assert code_of(call, P(volume_id=vol.volume_id, volume_capability=mount_cap())) == C.INVALID_ARGUMENT
    assert code_of(call, P(volume_id=vol.volume_id, node_id=NODE_A)) == C.INVALID_ARGUMENT
    rwx = mount_cap(Mode.MULTI_NODE_MULTI_WRITER)
    assert code_of(call, P(volume_id=vol.volume_id, node_id=NODE_A, volume_capability=rwx)) == C.INVALID_ARGUMENT
    assert code_of(call, P(volume_id="storage-0/vnone", node_id=NODE_A, volume_capability=mount_cap())) == C.NOT_FOUND
    assert code_of(call, P(volume_id=vol.volume_id, node_id="worker-0", volume_capability=mount_cap())) == C.NOT_FOUND
    U = csi_pb2.ControllerUnpublishVolumeRequest
    assert code_of(ctl.controller.ControllerUnpublishVolume, U(node_id=NODE_A)) == C.INVALID_ARGUMENT
    for unknown in ("storage-0/vnone", "junk"):
        ctl.controller.ControllerUnpublishVolume(U(volume_id=unknown, node_id=NODE_A))
    ctl.controller.ControllerUnpublishVolume(U(volume_id=vol.volume_id, node_id="not-an-nqn"))


# ----------------------------------------------------- validate, list, capacity


def test_validate_volume_capabilities(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-val")
    V = csi_pb2.ValidateVolumeCapabilitiesRequest
    ok = ctl.controller.ValidateVolumeCapabilities(
        V(volume_id=vol.volume_id, volume_capabilities=[mount_cap(), block_cap()])
    )
    assert ok.HasField("confirmed") and len(ok.confirmed.volume_capabilities) == 2
    no = ctl.controller.ValidateVolumeCapabilities(
        V(volume_id=vol.volume_id, volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)])
    )
    assert not no.HasField("confirmed") and "filesystem" in no.message
    call = ctl.controller.ValidateVolumeCapabilities
    assert code_of(call, V(volume_id="storage-0/vnone", volume_capabilities=[mount_cap()])) == C.NOT_FOUND
    assert code_of(call, V(volume_id=vol.volume_id)) == C.INVALID_ARGUMENT
    assert code_of(call, V(volume_capabilities=[mount_cap()])) == C.INVALID_ARGUMENT


def test_list_volumes_pages_across_agents(ctl: ControllerEnv) -> None:
    # Thick volumes use up free space, so capacity-aware placement alternates between nodes.
    ids = {create(ctl, f"pvc-list-{i}", parameters={"thin": "false"}).volume_id for i in range(7)}
    assert {i.split("/")[0] for i in ids} == set(ctl.agents)  # spread over both nodes
    pub = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=sorted(ids)[0], node_id=NODE_A, volume_capability=mount_cap()
    )
    ctl.controller.ControllerPublishVolume(pub)
    seen: dict[str, list[str]] = {}
    token = ""
    for _ in range(20):
        resp = ctl.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=3, starting_token=token))
        assert len(resp.entries) <= 3
        seen.update({e.volume.volume_id: list(e.status.published_node_ids) for e in resp.entries})
        token = resp.next_token
        if not token:
            break
    assert set(seen) == ids and seen[sorted(ids)[0]] == [NODE_A]
    everything = ctl.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert {e.volume.volume_id for e in everything.entries} == ids and not everything.next_token
    call = ctl.controller.ListVolumes
    assert code_of(call, csi_pb2.ListVolumesRequest(starting_token="@@@")) == C.ABORTED
    forged = PageToken("storage-0", "999").encode()  # agent rejects its own token part
    assert code_of(call, csi_pb2.ListVolumesRequest(starting_token=forged)) == C.ABORTED
    assert code_of(call, csi_pb2.ListVolumesRequest(max_entries=-1)) == C.INVALID_ARGUMENT


def test_get_capacity(ctl: ControllerEnv) -> None:
    ctl.agents["storage-0"].total = 10 * GiB
    ctl.agents["storage-1"].total = 30 * GiB
    cap = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap()]))
    assert cap.available_capacity == 40 * GiB and cap.maximum_volume_size.value == 30 * GiB
    # Thin volumes need no space up front: the largest thin volume is the agent's limit, so the
    # scheduler places a thin branch of a volume bigger than the free space.
    ctl.agents["storage-1"].max_volume = 64 * GiB
    thin = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"thin": "true"}))
    assert thin.available_capacity == 40 * GiB and thin.maximum_volume_size.value == 64 * GiB
    thick = ctl.controller.GetCapacity(csi_pb2.GetCapacityRequest(parameters={"thin": "false"}))
    assert thick.maximum_volume_size.value == 30 * GiB
    rwx = csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap(Mode.MULTI_NODE_MULTI_WRITER)])
    assert ctl.controller.GetCapacity(rwx).available_capacity == 0
    # An unusable class still gets its capacity, so that CSIStorageCapacity exists and the pod
    # schedules; CreateVolume then names the bad parameter (an event on the PVC).
    bad = csi_pb2.GetCapacityRequest(parameters={"nope": "1"})
    assert ctl.controller.GetCapacity(bad).available_capacity == 40 * GiB
    req = csi_pb2.CreateVolumeRequest(name="pvc-bad-class", volume_capabilities=[mount_cap()], parameters={"nope": "1"})
    with pytest.raises(grpc.RpcError) as err:
        ctl.controller.CreateVolume(req)
    assert err.value.code() == C.INVALID_ARGUMENT and "'nope'" in (err.value.details() or "")


# ------------------------------------------------------------------ expansion


def test_controller_expand_volume(ctl: ControllerEnv) -> None:
    vol = create(ctl, "pvc-grow")
    E = csi_pb2.ControllerExpandVolumeRequest
    resp = ctl.controller.ControllerExpandVolume(
        E(
            volume_id=vol.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB),
            volume_capability=mount_cap(),
        )
    )
    assert resp.capacity_bytes == 2 * GiB and resp.node_expansion_required
    again = ctl.controller.ControllerExpandVolume(
        E(
            volume_id=vol.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
            volume_capability=block_cap(),
        )
    )
    assert again.capacity_bytes == 2 * GiB and not again.node_expansion_required
    call = ctl.controller.ControllerExpandVolume
    assert code_of(call, E(volume_id=vol.volume_id)) == C.INVALID_ARGUMENT
    assert code_of(call, E(capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))) == C.INVALID_ARGUMENT
    unknown = E(volume_id="storage-0/vnone", capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))
    assert code_of(call, unknown) == C.NOT_FOUND
    shrink = E(volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=GiB, limit_bytes=GiB))
    assert code_of(call, shrink) == C.OUT_OF_RANGE


def test_controller_get_volume_errors(ctl: ControllerEnv) -> None:
    call = ctl.controller.ControllerGetVolume
    assert code_of(call, csi_pb2.ControllerGetVolumeRequest()) == C.INVALID_ARGUMENT
    assert code_of(call, csi_pb2.ControllerGetVolumeRequest(volume_id="storage-0/vnone")) == C.NOT_FOUND
    assert code_of(call, csi_pb2.ControllerGetVolumeRequest(volume_id="junk")) == C.NOT_FOUND


def test_storage_readiness_is_a_metric_not_liveness(ctl: ControllerEnv) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from csi.health import StorageHealth

    health = StorageHealth(ctl.pool, timeout=2)
    registry = CollectorRegistry()
    registry.register(health)
    ctl.agents["storage-1"].ready = False
    assert health.refresh() == {"storage-0": True, "storage-1": False}
    text = generate_latest(registry).decode()
    assert 'zvolt_csi_storage_node_ready{node="storage-0"} 1.0' in text
    assert 'zvolt_csi_storage_node_ready{node="storage-1"} 0.0' in text


def test_a_reimaged_worker_with_a_new_host_nqn_is_not_locked_out(ctl: ControllerEnv) -> None:
    """worker-0 came back with a wiped state directory, so a new host NQN: its old NQN must not
    block the volume for ever, and unpublish with the new NQN removes the old one too."""
    vol = create(ctl, "pvc-reimaged")
    node, _, local = vol.volume_id.partition("/")
    old_id, new_id = NODE_A, NODE_A.rsplit(":", 1)[0] + ":99999999-9999-4999-8999-999999999999"
    pub = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=old_id, volume_capability=mount_cap())
    ctl.controller.ControllerPublishVolume(pub)
    # Kubernetes detaches from worker-0 (new identity), then attaches elsewhere: both must work.
    ctl.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vol.volume_id, node_id=new_id))
    assert list(ctl.agents[node].state.volumes[local].published_hosts) == []
    ctl.controller.ControllerPublishVolume(pub)
    # Or it attaches to worker-0 again under its new identity: the old one is revoked.
    pub_new = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=new_id,
                                                     volume_capability=mount_cap())
    ctl.controller.ControllerPublishVolume(pub_new)
    assert list(ctl.agents[node].state.volumes[local].published_hosts) == [new_id]
    # Another node is still refused while worker-0 holds the single-node volume.
    pub_b = csi_pb2.ControllerPublishVolumeRequest(volume_id=vol.volume_id, node_id=NODE_B,
                                                   volume_capability=mount_cap())
    assert code_of(ctl.controller.ControllerPublishVolume, pub_b) == C.FAILED_PRECONDITION


def test_host_nqn_names_its_node_only_in_zvolts_own_form() -> None:
    from zvolt.names import node_of_host_nqn

    assert node_of_host_nqn(NODE_A) == "worker-0"
    assert node_of_host_nqn("nqn.2026-11.io.zvolt:host:11111111-1111-4111-8111-111111111111") is None
    assert node_of_host_nqn("nqn.2014-08.org.nvmexpress:uuid:11111111-1111-4111-8111-111111111111") is None
    assert node_of_host_nqn("nqn.2026-11.io.zvolt:host:worker-0:not-a-uuid") is None

