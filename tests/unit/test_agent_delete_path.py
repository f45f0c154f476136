"""DeleteVolume on fakes: one plan, one executor, one intent, one origin release.

The plan is decided under the volume lock: a leaf the index knows no snapshot or clone of is
one `zfs destroy` with no listing; anything else (or a busy leaf) lists its snapshots, drops the
idle ones and either destroys the volume or, when a snapshot must stay, renames it to the trash.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.fakes import Crash, FakeNode, make_node
from agent.index import Intent
from agent.recovery import trash_move
from agent.volumes import VolumeSpec

GiB = 1 << 30


@pytest.fixture
def paths(tmp_path: Path) -> tuple[str, str]:
    return str(tmp_path / "state"), str(tmp_path / "configfs")


@pytest.fixture
def node(paths: tuple[str, str]) -> FakeNode:
    return make_node(*paths)


def spy(monkeypatch: pytest.MonkeyPatch, obj: object, name: str,
        record: Callable[..., Any] | None = None, log: list[Any] | None = None) -> list[Any]:
    """Wrap obj.name so that each call is logged (as `record(*args)`, or the args) and then run."""
    log = [] if log is None else log
    inner = getattr(obj, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        log.append(record(*args) if record else args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)
    return log


def listings(monkeypatch: pytest.MonkeyPatch, node: FakeNode) -> list[Any]:
    """Every ZFS listing the agent makes: snapshots of a volume, clones of a snapshot."""
    log: list[Any] = []
    spy(monkeypatch, node.zfs, "snapshots_of", lambda ds: ("snapshots_of", ds), log)
    spy(monkeypatch, node.zfs, "clones_of", lambda snap: ("clones_of", snap), log)
    return log


def zvolt_objects(node: FakeNode) -> list[str]:
    return sorted(n for n, d in node.zfs.ds.items() if n.startswith("tank/zvolt/") and d.kind != "filesystem")


def branch_of_snapshot(node: FakeNode) -> tuple[str, str, str]:
    """src -> snapshot -> branch: deleting src must keep the snapshot (the branch's origin)."""
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=GiB))
    snap = v.create_snapshot("src-s", src.id)
    br = v.create_volume(VolumeSpec(name="br", size=GiB, source_snapshot=snap.id))
    node.zfs.settle()  # no udev race here: the plan is what is under test
    return src.id, snap.id, br.id


def assert_snapshot_lives_in_trash(node: FakeNode, src_dataset: str, sid: str, br_id: str) -> str:
    """The snapshot is indexed at its new place in the trash, and its branch follows it there."""
    rec = node.index.snapshot(sid)
    assert rec is not None
    holder = rec.dataset.partition("@")[0]
    assert node.volumes.layout.is_trash(holder) and holder != src_dataset
    assert node.zfs.exists(rec.dataset)
    assert node.index.trash_entry(holder) is not None
    br = node.index.volume(br_id)
    assert br is not None and br.origin == rec.dataset
    assert node.zfs.ds[br.dataset].origin == rec.dataset
    assert node.index.intents() == []
    return holder


def test_leaf_delete_is_one_destroy_and_no_listing(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="leaf", size=GiB))
    node.zfs.settle()
    listed = listings(monkeypatch, node)
    begun = spy(monkeypatch, node.index, "begin")
    node.zfs.calls.clear()
    node.volumes.delete_volume(vol.id)
    assert listed == []
    assert node.zfs.calls == [f"destroy {vol.dataset}"]
    assert begun == [("delete", [vol.dataset])]
    assert not node.zfs.exists(vol.dataset) and node.index.volume(vol.id) is None
    assert node.index.intents() == []


@pytest.mark.parametrize("why", ["unknown child", "udev"])
def test_busy_leaf_falls_back_to_listing(node: FakeNode, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="busy", size=GiB))
    leftover = f"{vol.dataset}@hleftover"
    if why == "unknown child":
        node.zfs.settle()
        # A hidden snapshot the index never heard of (e.g. left by a clone that failed).
        node.zfs.snapshot([leftover], {"zvolt:hidden": "1"})
    listed = listings(monkeypatch, node)
    begun = spy(monkeypatch, node.index, "begin")
    node.zfs.calls.clear()
    node.volumes.delete_volume(vol.id)
    assert ("snapshots_of", vol.dataset) in listed
    assert begun == [("delete", [vol.dataset]), ("delete", [vol.dataset])]
    destroys = [c for c in node.zfs.calls if c.startswith("destroy")]
    if why == "unknown child":
        assert destroys == [f"destroy {vol.dataset}", f"destroy_snap {leftover} defer=True", f"destroy {vol.dataset}"]
    else:
        assert destroys == [f"destroy {vol.dataset}"] * 2  # busy once (udev), then the listed plan's destroy
    assert zvolt_objects(node) == []
    assert node.index.volume(vol.id) is None and node.index.trash() == [] and node.index.intents() == []


def test_trash_keeps_the_snapshot_and_its_branch_readable(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    v = node.volumes
    # src is itself a branch of a volume (a hidden origin): moving it to the trash must not release that.
    base = v.create_volume(VolumeSpec(name="base", size=GiB))
    src = v.create_volume(VolumeSpec(name="src", size=GiB, source_volume=base.id))
    snap = v.create_snapshot("src-s", src.id)
    br = v.create_volume(VolumeSpec(name="br", size=GiB, source_snapshot=snap.id))
    node.zfs.settle()
    begun = spy(monkeypatch, node.index, "begin")
    released = spy(monkeypatch, v.gc, "release_origin")
    v.delete_volume(src.id)
    assert v.index.volume(src.id) is None and not node.zfs.exists(src.dataset)
    holder = assert_snapshot_lives_in_trash(node, src.dataset, snap.id, br.id)
    assert begun == [("delete", [src.dataset, holder, src.origin])]
    assert released == []
    assert node.zfs.exists(src.origin)  # the trash volume is still a clone of it
    # Still a source: listed, and a new branch can be made from it.
    assert [s.id for s in v.list_snapshots(0, "", snapshot_id=snap.id)[0]] == [snap.id]
    again = v.create_volume(VolumeSpec(name="br2", size=GiB, source_snapshot=snap.id))
    assert node.zfs.ds[again.dataset].origin == v.index.snapshot(snap.id).dataset  # type: ignore[union-attr]
    # Delete in any order: everything goes once the last dependent does.
    for vid in (again.id, br.id):
        v.delete_volume(vid)
    v.delete_snapshot(snap.id)
    v.delete_volume(base.id)
    assert zvolt_objects(node) == [] and node.index.trash() == []


def test_crash_after_rename_to_trash_is_settled_by_recovery(node: FakeNode, paths: tuple[str, str]) -> None:
    src_id, sid, br_id = branch_of_snapshot(node)
    src = node.index.volume(src_id)
    assert src is not None
    node.zfs.crash_at = ("rename", "after")
    with pytest.raises(Crash):
        node.volumes.delete_volume(src_id)
    (intent,) = node.index.intents()
    assert intent.op == "delete" and intent.datasets[0] == src.dataset
    assert len(intent.datasets) == 2 and node.volumes.layout.is_trash(intent.datasets[1])
    assert node.zfs.exists(intent.datasets[1])  # renamed in ZFS, not yet in the index
    node = node.restart(paths[0])
    assert node.readiness.ready
    assert node.index.volume(src_id) is None
    assert assert_snapshot_lives_in_trash(node, src.dataset, sid, br_id) == intent.datasets[1]


def test_old_trash_intent_from_an_older_agent_still_settles(node: FakeNode, paths: tuple[str, str]) -> None:
    src_id, sid, br_id = branch_of_snapshot(node)
    src = node.index.volume(src_id)
    assert src is not None
    # What an older agent did before it died: its own "trash" intent, then the rename, no commit.
    target = node.volumes.layout.trash(src_id, 1)
    node.index.begin("trash", [src.dataset, target])
    node.zfs.rename(src.dataset, target)
    node = node.restart(paths[0])
    assert node.readiness.ready
    assert node.index.volume(src_id) is None
    assert assert_snapshot_lives_in_trash(node, src.dataset, sid, br_id) == target


def test_a_trash_origin_is_not_taken_for_the_trash_target(node: FakeNode) -> None:
    layout = node.volumes.layout
    vol, target, origin = layout.volume("va"), layout.trash("va", 7), f"{layout.trash('vb', 3)}@s1"
    assert trash_move(layout, Intent(1, "delete", [vol, origin], 0.0)) is None
    assert trash_move(layout, Intent(2, "delete", [vol, target, origin], 0.0)) == (vol, target)
    assert trash_move(layout, Intent(3, "delete", [vol], 0.0)) is None
    assert trash_move(layout, Intent(4, "trash", [vol, target], 0.0)) == (vol, target)


def test_origin_released_once_outside_the_lock_after_destroying_a_clone(
        node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=GiB))
    br = v.create_volume(VolumeSpec(name="br", size=GiB, source_volume=src.id))
    node.zfs.settle()
    hidden = br.origin
    assert hidden.startswith(src.dataset + "@h") and node.zfs.exists(hidden)
    begun = spy(monkeypatch, node.index, "begin")
    released = spy(monkeypatch, v.gc, "release_origin", lambda origin: (origin, v.locks.busy()))
    v.delete_volume(br.id)
    assert begun == [("delete", [br.dataset, hidden])]
    assert released == [(hidden, 0)]  # once, and no volume lock held meanwhile
    assert not node.zfs.exists(hidden)
    assert zvolt_objects(node) == [src.dataset]
    assert v.index.volume(src.id) is not None and node.index.intents() == []
    v.delete_volume(br.id)  # idempotent: unknown volume, nothing released again
    assert len(released) == 1
