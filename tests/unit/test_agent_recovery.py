"""Crash safety on fakes: die between intent and commit, restart, retry -> the same end state."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agent import main as agent_main
from agent.fakes import Crash, FakeNode, make_node
from agent.volumes import Volumes, VolumeSpec
from agent.zfs import READ_PROPS
from zvolt import names

GiB = 1 << 30
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "state"), str(tmp_path / "configfs")


def zvolt_objects(node: FakeNode) -> list[str]:
    return sorted(n for n, d in node.zfs.ds.items() if n.startswith("tank/zvolt/") and d.kind != "filesystem")


def assert_index_matches_zfs(node: FakeNode) -> None:
    """Every index row names a dataset that exists; every zvolt volume/visible snapshot is indexed."""
    vols, _ = node.volumes.list_volumes(0, "")
    snaps, _ = node.volumes.list_snapshots(0, "")
    for v in vols:
        assert node.zfs.exists(v.dataset), v
    for s in snaps:
        assert node.zfs.exists(s.dataset), s
    indexed = {v.dataset for v in vols} | {s.dataset for s in snaps} | {t.dataset for t in node.index.trash()}
    for name in zvolt_objects(node):
        d = node.zfs.ds[name]
        if d.kind == "snapshot" and (d.defer or name.partition("@")[2].startswith("h")):
            continue
        assert name in indexed, f"{name} is in ZFS but not in the index"
    assert node.index.intents() == []


def crash_then_retry(node: FakeNode, state: str, crash_at: tuple[str, str],
                     op: Callable[[Volumes], object]) -> FakeNode:
    node.zfs.crash_at = crash_at
    with pytest.raises(Crash):
        op(node.volumes)
    assert node.index.intents(), "the operation should have left its intent behind"
    node = node.restart(state)
    assert node.readiness.ready
    assert_index_matches_zfs(node)
    op(node.volumes)
    assert_index_matches_zfs(node)
    return node


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_during_create(paths: tuple[str, str], when: str) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    node = crash_then_retry(node, state, ("create_volume", when),
                            lambda v: v.create_volume(VolumeSpec(name="c", size=GiB)))
    assert zvolt_objects(node) == [f"tank/zvolt/v/{names.id_for_name('c')}"]


@pytest.mark.parametrize("crash_at", [("snapshot", "after"), ("clone", "before"), ("clone", "after"),
                                      ("set_props", "before")])
def test_crash_during_clone_from_volume(paths: tuple[str, str], crash_at: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    src = node.volumes.create_volume(VolumeSpec(name="src", size=GiB))
    node = crash_then_retry(node, state, crash_at,
                            lambda v: v.create_volume(VolumeSpec(name="br", size=2 * GiB, source_volume=src.id)))
    br = node.volumes.index.volume(names.id_for_name("br"))
    assert br is not None and br.size == 2 * GiB
    assert node.zfs.ds[br.dataset].props["volsize"] == str(2 * GiB)
    # Exactly one hidden snapshot, the clone's origin.
    hidden = [n for n in node.zfs.ds if n.startswith(src.dataset + "@h")]
    assert hidden == [node.zfs.ds[br.dataset].origin]


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_during_snapshot(paths: tuple[str, str], when: str) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    src = node.volumes.create_volume(VolumeSpec(name="src", size=GiB))
    node = crash_then_retry(node, state, ("snapshot", when), lambda v: v.create_snapshot("sn", src.id))
    assert len(node.volumes.list_snapshots(0, "")[0]) == 1


@pytest.mark.parametrize("crash_at", [("destroy", "before"), ("destroy", "after")])
def test_crash_during_delete_of_clone(paths: tuple[str, str], crash_at: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    src = node.volumes.create_volume(VolumeSpec(name="src", size=GiB))
    br = node.volumes.create_volume(VolumeSpec(name="br", size=GiB, source_volume=src.id))
    node.zfs.settle()  # no udev race in this test: the crash point is what matters
    node = crash_then_retry(node, state, crash_at, lambda v: v.delete_volume(br.id))
    # The branch and its hidden snapshot are gone; the source is untouched.
    assert zvolt_objects(node) == [src.dataset]


@pytest.mark.parametrize("when", ["before", "after"])
def test_crash_during_delete_to_trash(paths: tuple[str, str], when: str) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    src = node.volumes.create_volume(VolumeSpec(name="src", size=GiB))
    snap = node.volumes.create_snapshot("s", src.id)
    br = node.volumes.create_volume(VolumeSpec(name="br", size=GiB, source_snapshot=snap.id))
    node = crash_then_retry(node, state, ("rename", when), lambda v: v.delete_volume(src.id))
    assert node.volumes.index.volume(src.id) is None
    moved = node.volumes.index.snapshot(snap.id)
    assert moved is not None and node.zfs.exists(moved.dataset) and "/trash/" in moved.dataset
    live = node.volumes.index.volume(br.id)
    assert live is not None and live.origin == moved.dataset
    node.volumes.delete_snapshot(snap.id)
    node.volumes.delete_volume(br.id)
    assert zvolt_objects(node) == []
    assert node.index.trash() == []


@pytest.mark.parametrize("crash_at", [("set_props", "before"), ("set_props", "after")])
def test_crash_during_publish(paths: tuple[str, str], crash_at: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vol = node.volumes.create_volume(VolumeSpec(name="p", size=GiB))
    node = crash_then_retry(node, state, crash_at, lambda v: v.publish(vol.id, HOST))
    st = node.volumes.get_volume(vol.id)
    assert st.healthy and st.volume.hosts == [HOST]


@pytest.mark.parametrize("crash_at", [("set_props", "before"), ("set_props", "after")])
def test_crash_during_unpublish(paths: tuple[str, str], crash_at: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vol = node.volumes.create_volume(VolumeSpec(name="u", size=GiB))
    nqn = node.volumes.publish(vol.id, HOST)
    node = crash_then_retry(node, state, crash_at, lambda v: v.unpublish(vol.id, HOST))
    st = node.volumes.get_volume(vol.id)
    assert st.healthy and st.volume.hosts == []
    assert not node.root.subsystem(nqn).exists()
    assert list(node.root.hosts()) == []
    assert node.zfs.ds[vol.dataset].props["volmode"] == "none"


def test_crash_during_expand_finishes_the_grow(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vol = node.volumes.create_volume(VolumeSpec(name="e", size=GiB, thick=True))
    node = crash_then_retry(node, state, ("set_props", "after"), lambda v: v.expand_volume(vol.id, 2 * GiB))
    rec = node.volumes.index.volume(vol.id)
    assert rec is not None and rec.size == 2 * GiB
    assert node.zfs.ds[vol.dataset].props["refreservation"] == str(2 * GiB)


def _reboot_configfs(node: FakeNode) -> None:
    """What a reboot leaves: configfs empty (zvols whose volmode was dev come back as devices)."""
    for sub in list(node.root.subsystems()):
        sub.delete()
    for port in list(node.root.ports()):
        port.delete()
    for host in list(node.root.hosts()):
        host.delete()


def test_restart_after_reboot_restores_every_export_before_ready(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vols = [node.volumes.create_volume(VolumeSpec(name=f"r{i}", size=GiB)) for i in range(4)]
    for v in vols[:3]:
        node.volumes.publish(v.id, HOST)
    before = node.root.dump()
    _reboot_configfs(node)
    node = node.restart(state)
    assert node.readiness.ready
    assert node.root.dump() == before
    for v in vols:
        assert node.volumes.get_volume(v.id).healthy


def test_one_bad_volume_does_not_keep_the_others_offline(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vols = [node.volumes.create_volume(VolumeSpec(name=f"b{i}", size=GiB)) for i in range(4)]
    for v in vols:
        node.volumes.publish(v.id, HOST)
        node.zfs.ds[v.dataset].props["volmode"] = "none"  # after a reboot: device nodes made anew
    _reboot_configfs(node)
    bad = vols[1]
    node.zfs.fail_set[bad.dataset] = errno.EIO
    node = node.restart(state)
    assert node.readiness.ready
    port = node.root.find_port("10.42.0.1", "4420")
    assert port is not None
    assert sorted(port.subsystems()) == sorted(names.subsystem_nqn("storage-0", v.id) for v in vols if v != bad)
    for v in vols:
        state_of = node.volumes.get_volume(v.id)
        assert state_of.healthy == (v != bad), (v.id, state_of.message)
    assert "export not restored" in node.volumes.get_volume(bad.id).message
    assert node.recovery.retry_unrestored() == 1  # still broken: stays reported
    del node.zfs.fail_set[bad.dataset]
    assert node.recovery.retry_unrestored() == 0
    assert node.volumes.get_volume(bad.id).healthy
    assert names.subsystem_nqn("storage-0", bad.id) in port.subsystems()


def test_restore_work_grows_linearly_with_published_volumes(paths: tuple[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each export used to re-read every subsystem's allowed hosts: quadratic in exports."""
    from agent import nvmet

    reads = {"n": 0}
    real_listdir = nvmet._listdir

    def counting_listdir(path: str) -> list[str]:
        reads["n"] += 1
        return real_listdir(path)

    monkeypatch.setattr(nvmet, "_listdir", counting_listdir)
    state, cfs = paths
    node = make_node(state, cfs)
    cost = {}
    published = 0
    for n in (40, 80):
        for i in range(published, n):
            vol = node.volumes.create_volume(VolumeSpec(name=f"lin{i}", size=GiB))
            node.volumes.publish(vol.id, HOST)
        published = n
        _reboot_configfs(node)
        reads["n"] = 0
        node = node.restart(state)
        assert node.readiness.ready and not node.volumes.unrestored
        cost[n] = reads["n"]
    assert cost[80] <= 2.2 * cost[40], cost


def test_restart_tears_down_unknown_exports(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    vol = node.volumes.create_volume(VolumeSpec(name="stale", size=GiB))
    node.volumes.publish(vol.id, HOST)
    # Simulate an index that says "unpublished" (e.g. the unpublish committed, configfs write lost).
    rec = node.index.volume(vol.id)
    assert rec is not None
    rec.hosts = []
    with node.index.tx() as tx:
        tx.put_volume(rec)
    node = node.restart(state)
    assert list(node.root.subsystems()) == []
    assert node.zfs.ds[vol.dataset].props["volmode"] == "none"


def test_start_up_reads_only_intent_datasets(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    for i in range(20):
        node.volumes.create_volume(VolumeSpec(name=f"n{i}", size=GiB))
    calls: list[str] = []
    real_get, real_walk = node.zfs.get_props, node.zfs.walk

    def get_props(name: str, props: Sequence[str] = READ_PROPS) -> dict[str, str] | None:
        calls.append(name)
        return real_get(name, props)

    def walk(parent: str) -> Iterator[dict[str, str]]:
        calls.append("WALK")
        return real_walk(parent)

    node.zfs.get_props = get_props  # type: ignore[method-assign]
    node.zfs.walk = walk  # type: ignore[method-assign]
    node = node.restart(state)
    assert "WALK" not in calls and calls == []


def _snapshot_of_state(node: FakeNode) -> tuple[object, ...]:
    vols, _ = node.volumes.list_volumes(0, "")
    snaps, _ = node.volumes.list_snapshots(0, "")
    return (sorted((v.id, v.name, v.size, v.dataset, v.origin, tuple(v.hosts), v.thick, v.source_snapshot,
                    v.source_volume) for v in vols),
            sorted((s.id, s.name, s.dataset, s.size) for s in snaps),
            sorted((t.dataset, t.origin) for t in node.index.trash()))


def _populate(node: FakeNode) -> None:
    v = node.volumes
    a = v.create_volume(VolumeSpec(name="a", size=GiB, thick=True))
    s = v.create_snapshot("a-s", a.id)
    b = v.create_volume(VolumeSpec(name="b", size=2 * GiB, source_snapshot=s.id))
    v.create_volume(VolumeSpec(name="c", size=2 * GiB, source_volume=b.id))
    v.publish(b.id, HOST)
    v.delete_volume(a.id)  # -> trash, its snapshot still listed


def test_lost_index_is_rebuilt_from_zfs(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    _populate(node)
    want = _snapshot_of_state(node)
    node.index.close()
    for suffix in ("", "-wal", "-shm"):
        path = os.path.join(state, "index.sqlite" + suffix)
        if os.path.exists(path):
            os.unlink(path)
    node = make_node(state, cfs, zfs=node.zfs)
    assert _snapshot_of_state(node) == want
    assert node.readiness.ready


def test_corrupt_index_is_moved_aside_and_rebuilt(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    _populate(node)
    want = _snapshot_of_state(node)
    node.index.close()
    for suffix in ("-wal", "-shm"):
        if os.path.exists(os.path.join(state, "index.sqlite" + suffix)):
            os.unlink(os.path.join(state, "index.sqlite" + suffix))
    with open(os.path.join(state, "index.sqlite"), "wb") as f:
        f.write(b"this is not a database" * 100)
    index, corrupt = agent_main.open_index(state)
    assert corrupt
    assert any(n.startswith("index.sqlite.corrupt-") for n in os.listdir(state))
    index.close()
    lines: list[str] = []
    node = make_node(state, cfs, zfs=node.zfs, recover=False)
    node.recovery.progress = lines.append
    node.recovery.run(rebuild=True)
    assert _snapshot_of_state(node) == want
    assert any(line.startswith("rebuild done") for line in lines)


def test_gc_sweep_collects_trash_whose_last_clone_vanished(paths: tuple[str, str]) -> None:
    state, cfs = paths
    node = make_node(state, cfs)
    v = node.volumes
    base = v.create_volume(VolumeSpec(name="gc-base", size=GiB))
    snap = v.create_snapshot("gc-s", base.id)
    clone = v.create_volume(VolumeSpec(name="gc-c", size=GiB, source_snapshot=snap.id))
    v.delete_volume(base.id)
    v.delete_snapshot(snap.id)  # deferred: the clone still needs it
    (trash,) = node.index.trash()
    assert node.zfs.exists(trash.dataset)
    assert v.gc.sweep() == 0  # still needed
    # The clone goes without the agent's normal path (e.g. it crashed right after the destroy).
    node.zfs.settle()
    node.zfs.destroy(f"tank/zvolt/v/{clone.id}")
    assert v.gc.sweep() == 1
    assert node.index.trash() == [] and not node.zfs.exists(trash.dataset)


def test_an_older_index_is_migrated_in_place_without_a_rebuild(paths: tuple[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer agent on an older index: its migrations run in place; the pool is never listed."""
    from agent import index as index_mod

    state, cfs = paths
    node = make_node(state, cfs)
    _populate(node)
    want = _snapshot_of_state(node)
    node.index.close()
    monkeypatch.setattr(index_mod, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(index_mod, "MIGRATIONS", {1: (
        "CREATE TABLE moves(volume_id TEXT PRIMARY KEY, target TEXT NOT NULL) WITHOUT ROWID",
        "CREATE INDEX volumes_name ON volumes(name)",
    )})
    walks: list[str] = []
    real_walk = node.zfs.walk

    def counting_walk(parent: str) -> Iterator[dict[str, str]]:
        walks.append(parent)
        return real_walk(parent)

    node.zfs.walk = counting_walk  # type: ignore[method-assign]
    index, rebuilt = agent_main.open_index(state)
    assert not rebuilt and index.get_meta("schema") == "2"
    with index.tx() as tx:
        tx._c.execute("INSERT INTO moves VALUES('v1', 'storage-1')")  # the new table is there
    index.close()
    node = make_node(state, cfs, zfs=node.zfs)
    assert node.readiness.ready and walks == []
    assert _snapshot_of_state(node) == want


def test_an_index_from_a_newer_agent_is_refused_not_rebuilt(paths: tuple[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import index as index_mod

    state, cfs = paths
    node = make_node(state, cfs)
    node.index.close()
    monkeypatch.setattr(index_mod, "SCHEMA_VERSION", 0)
    with pytest.raises(SystemExit) as stop:
        agent_main.open_index(state)
    assert "newer than this agent" in str(stop.value) and "--rebuild-index" in str(stop.value)
    assert os.listdir(state).count("index.sqlite") == 1  # left where it is
    index, rebuilt = agent_main.open_index(state, rebuild=True)  # the operator asked for it
    assert rebuilt
    index.close()
