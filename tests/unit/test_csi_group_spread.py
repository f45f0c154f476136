"""Placement by free and committed space, and the groupSpread StorageClass parameter: the pure
rules (csi/placement.py, csi/params.py) and the controller's create path on fake agents."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from csi import params, placement
from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService
from csi.fakes import FakeAgent, serve_fake_agent
from csi.placement import Candidate, GroupSpread, ZoneRequirement
from csi.placements import GroupRecords, group_label
from tests.unit.memrecords import MemoryGroupRecords
from zvolt.errors import ZvoltError
from zvolt.pb import csi_pb2

GiB = 1 << 30
ANY = ZoneRequirement(requisite=None, preferred=())


def cand(name: str, free: int = 10 * GiB, total: int = 10 * GiB, committed: int = 0, zone: str = "z") -> Candidate:
    return Candidate(name, zone, free, 0, total_bytes=total, committed_bytes=committed)


def refused(call: object) -> ZvoltError:
    with pytest.raises(ZvoltError) as err:
        call()  # type: ignore[operator]
    return err.value


# ------------------------------------------------------------------ free and committed space


def test_equally_free_nodes_rank_by_unwritten_commitment() -> None:
    heavy, light = cand("a", committed=8 * GiB), cand("b", committed=2 * GiB)  # the name order would say a
    assert placement.choose([heavy, light], GiB, False, ANY) == ["b", "a"]
    assert placement.choose([light, heavy], GiB, False, ANY) == ["b", "a"]


def test_written_bytes_count_once() -> None:
    # b has 6 GiB written (free 4 of 10) and committed exactly that: nothing more is promised,
    # so it keeps 4 GiB of room; a has all 10 free but 7 GiB promised and unwritten: 3 GiB.
    a = cand("a", free=10 * GiB, committed=7 * GiB)
    b = cand("b", free=4 * GiB, committed=6 * GiB)
    assert placement.room_after_promises(a) == 3 * GiB
    assert placement.room_after_promises(b) == 4 * GiB
    assert placement.choose([a, b], GiB, False, ANY) == ["b", "a"]


def test_an_agent_without_totals_ranks_by_free_space() -> None:
    old = Candidate("old", "z", 5 * GiB, 0)
    assert placement.room_after_promises(old) == 5 * GiB
    assert placement.choose([cand("new", free=4 * GiB, total=4 * GiB), old], GiB, False, ANY) == ["old", "new"]


def test_zone_preference_still_comes_before_space() -> None:
    pref = ZoneRequirement(requisite=None, preferred=("z2",))
    busy = cand("busy", committed=9 * GiB, zone="z2")
    assert placement.choose([cand("idle"), busy], GiB, False, pref) == ["busy", "idle"]


# ------------------------------------------------------------------ the group rule and parameter


def test_group_is_the_pvc_name_without_its_ordinal() -> None:
    assert params.group_of("data-pg-0") == "data-pg"
    assert params.group_of("data-pg-12") == "data-pg"
    assert params.group_of("pgdata") == "pgdata"
    assert params.group_of("pg-1-2") == "pg-1"  # only one trailing ordinal
    assert params.group_of("v2") == "v2"


def test_group_spread_parameter() -> None:
    meta = {"csi.storage.k8s.io/pvc/name": "data-pg-1", "csi.storage.k8s.io/pvc/namespace": "team-a"}
    assert params.parse({}).group() is None
    assert params.parse({"groupSpread": "off", **meta}).group() is None
    assert params.parse({"groupSpread": "required", **meta}).group() == ("team-a", "data-pg")
    assert params.parse({"groupSpread": "preferred", **meta}).group_spread == "preferred"
    err = refused(lambda: params.parse({"groupSpread": "yes"}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "off, preferred, required" in err.message
    err = refused(lambda: params.parse({"groupSpread": "required"}).group())
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "--extra-create-metadata" in err.message
    err = refused(lambda: params.parse_mutable({"groupSpread": "off"}))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and "placement" in err.message


def test_group_label_is_a_valid_label_value() -> None:
    assert group_label("data-pg") == "data-pg"
    long = "x" * 100
    assert group_label(long).startswith("g-") and len(group_label(long)) <= 63
    assert group_label("a-") != "a-" and group_label("a-") != group_label("a")


def test_required_keeps_members_apart_and_names_the_nodes_when_it_cannot() -> None:
    nodes = [cand("a"), cand("b", committed=5 * GiB), cand("c", committed=9 * GiB)]
    spread = GroupSpread("team-a/data-pg", required=True, members={"a": 1})
    assert placement.choose(nodes, GiB, False, ANY, group=spread) == ["b", "c"]
    full = GroupSpread("team-a/data-pg", required=True, members={"a": 1, "b": 1, "c": 2})
    err = refused(lambda: placement.choose(nodes, GiB, False, ANY, group=full))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "holding one already: a, b, c;" in err.message and "team-a/data-pg" in err.message
    # A node without members that cannot take the volume does not help either.
    small = [cand("a"), cand("b", free=0)]
    err = refused(lambda: placement.choose(small, GiB, True, ANY, group=GroupSpread("g", True, {"a": 1})))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "holding one already: a;" in err.message


def test_preferred_puts_the_fewest_members_first_and_never_refuses() -> None:
    nodes = [cand("a"), cand("b", committed=5 * GiB), cand("c", committed=9 * GiB)]
    spread = GroupSpread("g", required=False, members={"a": 2, "b": 1})
    assert placement.choose(nodes, GiB, False, ANY, group=spread) == ["c", "b", "a"]
    everywhere = GroupSpread("g", required=False, members={"a": 1, "b": 1, "c": 1})
    assert placement.choose(nodes, GiB, False, ANY, group=everywhere) == ["a", "b", "c"]


# ------------------------------------------------------------------ the controller's create path


def cap() -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER)
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=mode)


def create(name: str, pvc: str, spread: str = "required", ns: str = "team-a") -> csi_pb2.CreateVolumeRequest:
    par = {"csi.storage.k8s.io/pvc/name": pvc, "csi.storage.k8s.io/pvc/namespace": ns}
    if spread:
        par["groupSpread"] = spread
    return csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap()], parameters=par,
                                       capacity_range=csi_pb2.CapacityRange(required_bytes=GiB))


Cluster = tuple[list[FakeAgent], ControllerService, MemoryGroupRecords]


@pytest.fixture
def cluster(sockdir: str) -> Iterator[Cluster]:
    agents = [FakeAgent(f"storage-{i}") for i in range(2)]
    servers = [serve_fake_agent(a, f"{sockdir}/s{i}.sock") for i, a in enumerate(agents)]
    pool = AgentPool(lambda: parse_static(",".join(f"storage-{i}=unix://{sockdir}/s{i}.sock" for i in range(2))),
                     tls=None, timeout=5)
    records = MemoryGroupRecords()
    assert isinstance(records, GroupRecords)
    yield agents, ControllerService(pool, records=records), records
    pool.close()
    for s in servers:
        s.stop(None)


def node_of(ctrl: ControllerService, req: csi_pb2.CreateVolumeRequest) -> str:
    volume_id: str = ctrl.CreateVolume(req, None).volume.volume_id
    return volume_id.split("/")[0]


def test_a_group_lands_on_distinct_nodes_and_a_third_member_is_refused(cluster: Cluster) -> None:
    agents, ctrl, records = cluster
    first = node_of(ctrl, create("pvc-a", "data-pg-0"))
    second = node_of(ctrl, create("pvc-b", "data-pg-1"))
    assert {first, second} == {"storage-0", "storage-1"}
    err = refused(lambda: ctrl.CreateVolume(create("pvc-c", "data-pg-2"), None))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "holding one already: storage-0, storage-1;" in err.message
    assert sum(len(a.state.volumes) for a in agents) == 2
    # Retried creates land where their records say, the group rule notwithstanding.
    assert node_of(ctrl, create("pvc-b", "data-pg-1")) == second
    # Only the group's own records are read, once per grouped create.
    assert set(records.group_reads) == {("team-a", "data-pg")}


def test_the_group_is_scoped_to_the_namespace_and_ungrouped_volumes_do_not_care(cluster: Cluster) -> None:
    _, ctrl, records = cluster
    first = node_of(ctrl, create("pvc-a", "data-pg-0"))
    second = node_of(ctrl, create("pvc-b", "data-pg-1"))
    assert first != second
    # Both nodes hold a member of team-a/data-pg: team-b's claim of the same name is another group.
    assert node_of(ctrl, create("pvc-c", "data-pg-0", ns="team-b")) in {first, second}
    # A class without groupSpread neither asks where the group lives nor is refused.
    reads = len(records.group_reads)
    assert node_of(ctrl, create("pvc-d", "data-pg-2", spread="")) in {first, second}
    assert len(records.group_reads) == reads
    assert records.group_reads == [("team-a", "data-pg"), ("team-a", "data-pg"), ("team-b", "data-pg")]


def test_preferred_shares_a_node_when_it_must(cluster: Cluster) -> None:
    _, ctrl, _ = cluster
    nodes = [node_of(ctrl, create(f"pvc-{i}", f"data-pg-{i}", spread="preferred")) for i in range(3)]
    assert set(nodes[:2]) == {"storage-0", "storage-1"} and nodes[2] in nodes[:2]


def test_required_without_group_records_is_refused(sockdir: str) -> None:
    agent = FakeAgent("storage-0")
    server = serve_fake_agent(agent, f"{sockdir}/s0.sock")
    pool = AgentPool(lambda: parse_static(f"storage-0=unix://{sockdir}/s0.sock"), tls=None, timeout=5)
    try:
        ctrl = ControllerService(pool)
        err = refused(lambda: ctrl.CreateVolume(create("pvc-a", "data-pg-0"), None))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION and "--agents-from-kubernetes" in err.message
        assert not agent.state.volumes
        assert node_of(ctrl, create("pvc-a", "data-pg-0", spread="preferred")) == "storage-0"
    finally:
        pool.close()
        server.stop(None)
