"""Group snapshots in the agent, on fakes: one ZFS call, idempotency, delete, crash recovery, cost."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agent.fakes import Crash, FakeNode, make_node
from agent.group_snapshots import GroupSnapshots, group_id_for
from agent.index import SnapshotRec
from agent.recovery import rebuild_index
from agent.volumes import VolumeSpec
from zvolt.errors import ZvoltError

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "state"), str(tmp_path / "configfs")


@pytest.fixture
def node(paths: tuple[str, str]) -> FakeNode:
    return make_node(*paths)


def volumes(node: FakeNode, *names: str) -> list[str]:
    return [node.volumes.create_volume(VolumeSpec(name=n, size=GiB)).id for n in names]


def code_of(fn: object, *args: object) -> grpc.StatusCode:
    with pytest.raises(ZvoltError) as err:
        fn(*args)  # type: ignore[operator]
    return err.value.code


def test_members_are_taken_in_one_zfs_call(node: FakeNode) -> None:
    data, wal, other = volumes(node, "data", "wal", "other")
    groups = GroupSnapshots(node.volumes)
    group = groups.create("backup-1", [data, wal], {"groupsnapshot-name": "nightly"})
    gid = group_id_for("backup-1")
    assert group.id == gid and group.name == "backup-1"
    assert sorted(m.id for m in group.members) == sorted([f"{data}@{gid}", f"{wal}@{gid}"])
    # Exactly one snapshot() call, naming every member and nothing else: one transaction group.
    assert node.zfs.snapshot_batches == [(f"tank/zvolt/v/{data}@{gid}", f"tank/zvolt/v/{wal}@{gid}")] or \
        node.zfs.snapshot_batches == [(f"tank/zvolt/v/{wal}@{gid}", f"tank/zvolt/v/{data}@{gid}")]
    props = node.zfs.ds[f"tank/zvolt/v/{data}@{gid}"].props
    assert props["zvolt:group"] == gid and props["zvolt:name"] == "backup-1"
    assert props["zvolt:label:groupsnapshot-name"] == "nightly"
    # Each member is an ordinary snapshot: listed, and restorable on its own.
    listed = {s.id for s in node.volumes.list_snapshots(0, "")[0]}
    assert {f"{data}@{gid}", f"{wal}@{gid}"} <= listed
    restored = node.volumes.create_volume(VolumeSpec(name="restore-wal", size=GiB, source_snapshot=f"{wal}@{gid}"))
    assert node.zfs.ds[restored.dataset].origin == f"tank/zvolt/v/{wal}@{gid}"
    assert other not in {m.volume_id for m in groups.get(gid).members}


def test_same_name_same_volumes_is_the_same_group(node: FakeNode) -> None:
    a, b = volumes(node, "a", "b")
    groups = GroupSnapshots(node.volumes)
    first = groups.create("g", [a, b])
    again = groups.create("g", [b, a])
    assert again == first
    assert len(node.zfs.snapshot_batches) == 1


def test_same_name_other_volumes_is_already_exists(node: FakeNode) -> None:
    a, b, c = volumes(node, "a", "b", "c")
    groups = GroupSnapshots(node.volumes)
    groups.create("g", [a, b])
    with pytest.raises(ZvoltError) as err:
        groups.create("g", [a, c])
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert a in err.value.message and b in err.value.message and c in err.value.message
    assert len(node.zfs.snapshot_batches) == 1


def test_bad_requests(node: FakeNode) -> None:
    (a,) = volumes(node, "a")
    groups = GroupSnapshots(node.volumes)
    assert code_of(groups.create, "g", []) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(groups.create, "g", [a, a]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(groups.create, "", [a]) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(groups.create, "g", [a, "vmissing"]) == grpc.StatusCode.NOT_FOUND
    assert node.zfs.snapshot_batches == []  # nothing half-made
    assert code_of(groups.get, "gnothere") == grpc.StatusCode.NOT_FOUND
    assert code_of(groups.get, "vnotagroup") == grpc.StatusCode.INVALID_ARGUMENT


def test_delete_listed_members_then_all_idempotently(node: FakeNode) -> None:
    a, b, c = volumes(node, "a", "b", "c")
    groups = GroupSnapshots(node.volumes)
    gid = groups.create("g", [a, b, c]).id
    assert code_of(groups.delete, gid, [f"{a}@sother"]) == grpc.StatusCode.INVALID_ARGUMENT
    groups.delete(gid, [f"{a}@{gid}"])
    assert not node.zfs.exists(f"tank/zvolt/v/{a}@{gid}")
    assert sorted(m.volume_id for m in groups.get(gid).members) == sorted([b, c])
    # A member deleted alone (CSI DeleteSnapshot) leaves the group too.
    node.volumes.delete_snapshot(f"{b}@{gid}")
    assert [m.volume_id for m in groups.get(gid).members] == [c]
    groups.delete(gid, [])  # every member left
    groups.delete(gid, [])
    assert code_of(groups.get, gid) == grpc.StatusCode.NOT_FOUND
    assert not [n for n in node.zfs.ds if n.endswith("@" + gid)]


def test_members_are_charged_as_single_snapshots(node: FakeNode) -> None:
    a, b = volumes(node, "a", "b")
    real = node.zfs.get_props

    def with_referenced(name: str, props: tuple[str, ...] = ()) -> dict[str, str] | None:
        got = real(name, props)
        if got is not None and "@" in name and "referenced" in props:
            got["referenced"] = str(300 * MiB)
        return got

    node.zfs.get_props = with_referenced  # type: ignore[method-assign,assignment]
    before = node.volumes.capacity().committed
    group = GroupSnapshots(node.volumes).create("g", [a, b])
    assert [node.index.snapshot_charge(m.id) for m in group.members] == [300 * MiB, 300 * MiB]
    assert node.volumes.capacity().committed == before + 600 * MiB
    GroupSnapshots(node.volumes).delete(group.id)
    assert node.volumes.capacity().committed == before


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_between_zfs_and_index_settles_at_start(paths: tuple[str, str], when: str) -> None:
    state, _ = paths
    node = make_node(*paths)
    a, b = volumes(node, "a", "b")
    node.zfs.crash_at = ("snapshot", when)
    with pytest.raises(Crash):
        GroupSnapshots(node.volumes).create("g", [a, b])
    assert [i.op for i in node.index.intents()] == ["group-snapshot"]
    node = node.restart(state)
    assert node.index.intents() == []
    gid = group_id_for("g")
    # Taken (after): the group is back from ZFS properties alone; not taken (before): nothing.
    assert len(node.index.group_members(gid)) == (2 if when == "after" else 0)
    group = GroupSnapshots(node.volumes).create("g", [a, b])
    assert sorted(m.volume_id for m in group.members) == sorted([a, b])
    assert len(node.zfs.snapshot_batches) == (1 if when == "after" else 2)


def test_rebuilt_index_knows_the_groups(node: FakeNode) -> None:
    a, b = volumes(node, "a", "b")
    gid = GroupSnapshots(node.volumes).create("g", [a, b]).id
    rebuild_index(node.zfs, node.index, node.volumes.layout, lambda _line: None)
    assert sorted(m.volume_id for m in node.index.group_members(gid)) == sorted([a, b])


def test_finding_a_group_does_not_read_every_snapshot(node: FakeNode) -> None:
    """The lookup's SQLite work must not grow with the snapshots of other volumes."""
    a, b = volumes(node, "a", "b")
    gid = GroupSnapshots(node.volumes).create("g", [a, b]).id
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    def cost() -> int:
        steps[0] = 0
        node.index._db.set_progress_handler(count, 1)
        try:
            assert len(node.index.group_members(gid)) == 2
        finally:
            node.index._db.set_progress_handler(None, 1)
        return steps[0]

    few = cost()
    with node.index.tx() as tx:
        for i in range(5000):
            tx.put_snapshot(SnapshotRec(id=f"v{i:05d}@s1", name=f"n{i}", volume_id=f"v{i:05d}",
                                        dataset=f"tank/zvolt/v/v{i:05d}@s1", size=GiB, created=0))
    many = cost()
    assert many <= few * 1.5, f"group lookup took {few} SQLite steps with 2 snapshots, {many} with 5002"
