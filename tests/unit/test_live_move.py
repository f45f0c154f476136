"""A live move on fakes: a published volume's path moves with it (agent/moves.py, agent/exports.py,
csi/moves.py, csi/livepath.py). Each side has its own emulated configfs, as two machines do; the
kernel's half (hosts holding I/O, the second path) is in tests/lab/test_live_move_lab.py."""

from __future__ import annotations

import json
import shutil
from typing import Any

import grpc
import pytest

from agent import nvmet
from csi import livepath
from csi import moves as orchestrator
from csi.fakes import FakeMounter, FakeNvmeHost
from csi.host_identity import HostIdentity
from csi.node import NodeService
from csi.pathrelay import RelayedPaths
from tests.unit.test_moves import HOST, Side, pair, volume_with_snapshots  # noqa: F401 - the fixture
from zvolt import names
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

HOSTID = "00000000-0000-4000-8000-000000000001"


def sub_of(side: Side, vid: str) -> nvmet.Subsystem:
    return side.node.volumes.exports.root.subsystem(names.subsystem_nqn("storage-a", vid))


def port_of(side: Side) -> nvmet.Port:
    cfg = side.node.volumes.exports.cfg
    port = side.node.volumes.exports.root.find_port(cfg.address, cfg.port)
    assert port is not None
    return port


class Switch:
    """A PathSwitch that records what the orchestrator asked, and what both nodes showed then."""

    def __init__(self, a: Side, b: Side, vid: str, fail: ZvoltError | None = None) -> None:
        self.a, self.b, self.vid, self.fail = a, b, vid, fail
        self.added: list[pb.PublishVolumeResponse] = []
        self.dropped: list[str] = []
        self.seen: dict[str, Any] = {}

    def hosts(self) -> list[pb.PublishVolumeRequest]:
        return [pb.PublishVolumeRequest(volume_id=self.vid, host_nqn=HOST)]

    def add(self, paths: list[pb.PublishVolumeResponse]) -> None:
        src, dst = sub_of(self.a, self.vid), sub_of(self.b, self.vid)
        group = src.namespace(1).ana_group
        self.seen = {"group": group, "state": port_of(self.a).ana_state(group), "target_ns": dst.namespaces(),
                     "target_hosts": dst.allowed_hosts(), "target_cntlid": dst.cntlid_range(),
                     "target_linked": port_of(self.b).links(dst.nqn)}
        if self.fail is not None:
            raise self.fail
        self.added = paths

    def drop(self, source: str) -> None:
        self.dropped.append(source)


class Fenced:
    """The source's client: notes the source's ANA state and readonly right after the final SendMove."""

    def __init__(self, side: Side, vid: str) -> None:
        self.side, self.vid, self.name = side, vid, side.client.name
        self.after_final: tuple[str, str] | None = None

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        got = self.side.client.call(method, request, timeout)
        if method == "SendMove" and request.final:
            group = sub_of(self.side, self.vid).namespace(1).ana_group
            ds = self.side.node.volumes.layout.volume(self.vid)
            self.after_final = (port_of(self.side).ana_state(group), self.side.node.zfs.ds[ds].props["readonly"])
        return got


def published(a: Side) -> str:
    vid, _ = volume_with_snapshots(a)
    a.node.volumes.publish(vid, HOST)
    return vid


def test_a_published_volume_moves_live_with_its_path(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    uuid, nguid = (sub_of(a, vid).namespace(1).attr(k) for k in ("device_uuid", "device_nguid"))
    switch, source = Switch(a, b, vid), Fenced(a, vid)
    result = orchestrator.move(source, b.client, vid, live=switch)
    # Before the cutover: the source path had a group of its own, still serving; the target had the
    # subsystem for the same host with no namespace, on the other half of the controller ids.
    assert switch.seen["group"] >= 2 and switch.seen["state"] == nvmet.ANA_OPTIMIZED
    assert switch.seen["target_ns"] == [] and switch.seen["target_hosts"] == [HOST] and switch.seen["target_linked"]
    assert switch.seen["target_cntlid"] == (nvmet.CNTLID_HALF, nvmet.CNTLID_MAX)
    assert [(p.nqn, p.host_nqn, p.address) for p in switch.added] == [
        (names.subsystem_nqn("storage-a", vid), HOST, b.node.volumes.exports.cfg.address)]
    # The fence came before the freeze; the target serves the same namespace ids; the source let go.
    assert source.after_final == (nvmet.ANA_INACCESSIBLE, "on")
    ns = sub_of(b, vid).namespace(1)
    assert ns.enabled and (ns.attr("device_uuid"), ns.attr("device_nguid")) == (uuid, nguid)
    held = b.client.call("GetVolume", pb.GetVolumeRequest(volume_id=vid))
    assert held.placement == pb.PLACEMENT_HELD and list(held.volume.published_hosts) == [HOST]
    assert not sub_of(a, vid).exists() and port_of(a).ana_groups() == []
    assert switch.dropped == ["storage-a"] and result.pause_seconds > 0 and result.streams >= 2


def test_a_published_volume_without_a_path_switch_is_refused(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "move it live" in err.value.message
    assert a.client.call("GetVolume", pb.GetVolumeRequest(volume_id=vid)).placement == pb.PLACEMENT_HELD


def _node(nvme: FakeNvmeHost) -> NodeService:
    return NodeService(HostIdentity(HOST, HOSTID), nvme, FakeMounter(nvme.device_size), zone="z")


def _relayed(vid: str, node: NodeService) -> RelayedPaths:
    """The controller's PathSwitch, its relay handing each request to this one node's step."""

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        failed = {}
        for host, ctx in request["nodes"].items():
            said = livepath.run(node, json.dumps({"op": request["op"], "volume_id": request["volume_id"],
                                                  "publish_context": ctx}))
            if not said["ok"]:
                failed[host] = said["error"]
        return {"ok": not failed, "failed": failed}

    return RelayedPaths(f"storage-a/{vid}", "pvc-move", [HOST], {}, None, ask)


def test_a_host_without_multipath_undoes_the_move_before_the_fence(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    nvme = FakeNvmeHost()
    nvme.native_multipath = False
    with pytest.raises(ZvoltError) as err:
        orchestrator.move(a.client, b.client, vid, live=_relayed(vid, _node(nvme)))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "multipath" in err.value.message and "offline" in err.value.message
    assert nvme.connects == []
    # The source serves as before: group 1, writable, no move; the target holds nothing.
    assert sub_of(a, vid).namespace(1).ana_group == 1 and port_of(a).ana_groups() == []
    ds = a.node.volumes.layout.volume(vid)
    assert a.node.zfs.ds[ds].props["readonly"] == "off"
    assert a.client.call("GetVolume", pb.GetVolumeRequest(volume_id=vid)).placement == pb.PLACEMENT_HELD
    assert not sub_of(b, vid).exists() and not [n for n in b.node.zfs.ds if vid in n]


def test_an_abort_after_the_fence_lets_the_hosts_resume_on_the_source(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b", live=True))
    a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b", final=True, live=True))
    group = sub_of(a, vid).namespace(1).ana_group
    assert port_of(a).ana_state(group) == nvmet.ANA_INACCESSIBLE
    orchestrator.abort(a.client, b.client, vid)
    assert sub_of(a, vid).namespace(1).ana_group == 1 and port_of(a).ana_groups() == []
    assert a.node.zfs.ds[a.node.volumes.layout.volume(vid)].props["readonly"] == "off"
    assert a.node.volumes.exports.condition(vid, a.node.volumes.layout.volume(vid), [HOST])[0]


def test_prepare_wants_exactly_the_hosts_the_volume_is_published_to(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    plan = a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b", live=True))
    b.client.call("ReceiveMove", pb.ReceiveMoveRequest(
        volume_id=vid, home_node=plan.home_node, source_node="storage-a", address=plan.address, token=plan.token,
        snapshot=plan.snapshot))
    other = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000009"
    with pytest.raises(ZvoltError) as err:
        b.client.call("PrepareMove", pb.PrepareMoveRequest(
            volume_id=vid, source_node="storage-a", hosts=[pb.PublishVolumeRequest(host_nqn=other)]))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "must be the same" in err.value.message
    assert not sub_of(b, vid).exists()


def test_the_node_adds_one_path_per_target_and_drops_the_others() -> None:
    nqn = names.subsystem_nqn("storage-a", "vol1")
    nvme = FakeNvmeHost()
    nvme.add_subsystem(nqn, 1 << 30)
    node = _node(nvme)
    node.reconnect_delay = 2
    nvme.connect(_spec(nqn, "10.0.0.1"))  # the path NodeStageVolume made, to the source
    path = {"nqn": nqn, "transport": "tcp", "address": "10.0.0.2", "port": "4420"}
    assert livepath.add(node, "storage-a/vol1", path, {}) is True
    assert livepath.add(node, "storage-a/vol1", path, {}) is False  # a repeat connects nothing more
    assert [(c.address, c.hostid) for c in nvme.connects[1:]] == [("10.0.0.2", HOSTID)]
    assert nvme.connects[1].reconnect_delay == 2
    assert livepath.drop(node, "storage-a/vol1", path) == ["nvme0"]
    assert [livepath.address_of(c) for c in nvme.controllers(nqn)] == [("10.0.0.2", "4420")]


def _spec(nqn: str, address: str) -> Any:
    from csi.nvme_host import ConnectSpec

    return ConnectSpec(nqn=nqn, transport="tcp", address=address, port="4420", hostnqn=HOST, hostid=HOSTID,
                       ctrl_loss_tmo=600, reconnect_delay=10)


def test_a_new_ana_group_is_set_optimized_and_cntlid_ranges_change_in_a_safe_order(tmp_path: Any) -> None:
    root = nvmet.Root(str(tmp_path), emulate=True)
    root.init_tree()
    port = root.find_or_create_port("10.0.0.1", "4420")
    port.add_ana_group(2)  # the kernel (and the emulation) start it inaccessible
    port.add_ana_group(3, nvmet.ANA_INACCESSIBLE)
    assert (port.ana_state(2), port.ana_state(3)) == (nvmet.ANA_OPTIMIZED, nvmet.ANA_INACCESSIBLE)
    with pytest.raises(nvmet.NvmetError):
        port.add_ana_group(1)
    sub = root.subsystem(names.subsystem_nqn("storage-a", "vol1"))
    sub.create()
    sub.set_cntlid_range(1, nvmet.CNTLID_HALF - 1)
    sub.set_cntlid_range(nvmet.CNTLID_HALF, nvmet.CNTLID_MAX)
    assert sub.cntlid_range() == (nvmet.CNTLID_HALF, nvmet.CNTLID_MAX)
    with pytest.raises(nvmet.NvmetError):
        sub.set_cntlid_range(5, 4)


@pytest.mark.parametrize("then", ["retry", "abort"])
def test_a_reboot_after_the_fence_brings_the_source_back_fenced(pair: tuple[Side, Side], then: str) -> None:  # noqa: F811
    a, b = pair
    vid = published(a)
    a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b", live=True))
    a.client.call("SendMove", pb.SendMoveRequest(volume_id=vid, target_node="storage-b", final=True, live=True))
    # The node goes down: configfs (the ANA group with it) is gone, ZFS and the index are not.
    shutil.rmtree(a.node.root.path)
    a.restart()
    sub = sub_of(a, vid)
    group = sub.namespace(1).ana_group
    # Back fenced, before any host could reconnect to a path that would fail its writes.
    assert group != 1 and port_of(a).ana_state(group) == nvmet.ANA_INACCESSIBLE and port_of(a).links(sub.nqn)
    assert a.node.zfs.ds[a.node.volumes.layout.volume(vid)].props["readonly"] == "on"
    if then == "retry":
        orchestrator.move(a.client, b.client, vid, live=Switch(a, b, vid))
        held = b.client.call("GetVolume", pb.GetVolumeRequest(volume_id=vid))
        assert held.placement == pb.PLACEMENT_HELD and sub_of(b, vid).namespace(1).enabled
        assert not sub_of(a, vid).exists() and port_of(a).ana_groups() == []
    else:
        orchestrator.abort(a.client, b.client, vid)
        assert sub_of(a, vid).namespace(1).ana_group == 1 and port_of(a).ana_groups() == []
        assert a.node.zfs.ds[a.node.volumes.layout.volume(vid)].props["readonly"] == "off"
