"""Agent operations on fakes: every operation, idempotent repeats and each error code."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from agent.fakes import FakeNode, make_node
from agent.volumes import VolumeSpec
from zvolt import names
from zvolt.errors import ZvoltError

GiB = 1 << 30
MiB = 1 << 20
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:bbbbbbbb-0000-0000-0000-000000000002"


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return make_node(str(tmp_path / "state"), str(tmp_path / "configfs"))


def code_of(fn: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(ZvoltError) as err:
        fn(*args, **kwargs)  # type: ignore[operator]
    return err.value.code


def test_layout_created_at_start(node: FakeNode) -> None:
    for ds in ("tank/zvolt", "tank/zvolt/v", "tank/zvolt/trash"):
        assert node.zfs.exists(ds)
    assert node.readiness.ready


def test_create_volume_is_sparse_inactive_and_idempotent(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="pvc-1", size=GiB, labels={"pvc": "db-0"}))
    assert vol.id == names.id_for_name("pvc-1")
    props = node.zfs.ds[vol.dataset].props
    assert props["volmode"] == "none"
    assert props["refreservation"] == "0"
    assert props["volsize"] == str(GiB)
    assert props["zvolt:name"] == "pvc-1"
    assert props["zvolt:label:pvc"] == "db-0"
    assert props["compression"] == "lz4" and props["volblocksize"] == "16384"
    creates = [c for c in node.zfs.calls if c.startswith("create")]
    again = v.create_volume(VolumeSpec(name="pvc-1", size=GiB, labels={"pvc": "db-0"}))
    assert again == vol
    assert [c for c in node.zfs.calls if c.startswith("create")] == creates  # no second ZFS call


def test_create_thick_8k_zstd(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="pvc-t", size=100 * MiB + 1, volblocksize=8192,
                                                compression="zstd", thick=True))
    assert vol.size % 8192 == 0 and vol.size >= 100 * MiB + 1
    props = node.zfs.ds[vol.dataset].props
    assert props["refreservation"] == str(vol.size)
    assert props["volblocksize"] == "8192" and props["compression"] == "zstd"


def test_same_name_different_size_or_source_is_already_exists(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="pvc-2", size=GiB))
    assert code_of(v.create_volume, VolumeSpec(name="pvc-2", size=2 * GiB)) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(v.create_volume, VolumeSpec(name="pvc-2", size=GiB, thick=True)) == grpc.StatusCode.ALREADY_EXISTS
    snap = v.create_snapshot("snap-2", vol.id)
    assert code_of(v.create_volume, VolumeSpec(name="pvc-2", size=GiB, source_snapshot=snap.id)) \
        == grpc.StatusCode.ALREADY_EXISTS
    other = v.create_volume(VolumeSpec(name="pvc-2b", size=GiB))
    assert code_of(v.create_volume, VolumeSpec(name="pvc-2", size=GiB, source_volume=other.id)) \
        == grpc.StatusCode.ALREADY_EXISTS


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        (VolumeSpec(name="", size=GiB), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="x\n", size=GiB), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=0), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, volblocksize=3000), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, compression="brotli"), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, encryption_key=b"k" * 31), grpc.StatusCode.INVALID_ARGUMENT),
        # A node without a key wrapping file could not bring the volume back after a reboot.
        (VolumeSpec(name="ok", size=GiB, encryption_key=b"k" * 32), grpc.StatusCode.FAILED_PRECONDITION),
        (VolumeSpec(name="ok", size=GiB, labels={"../x": "y"}), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=1 << 60), grpc.StatusCode.OUT_OF_RANGE),
        (VolumeSpec(name="ok", size=GiB, source_volume="../etc"), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, source_snapshot="vabc"), grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, source_snapshot="va@sb", source_volume="va"),
         grpc.StatusCode.INVALID_ARGUMENT),
        (VolumeSpec(name="ok", size=GiB, source_volume="vmissing"), grpc.StatusCode.NOT_FOUND),
        (VolumeSpec(name="ok", size=GiB, source_snapshot="vmissing@smissing"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_create_errors(node: FakeNode, spec: VolumeSpec, code: grpc.StatusCode) -> None:
    before = dict(node.zfs.ds)
    assert code_of(node.volumes.create_volume, spec) == code
    assert node.zfs.ds.keys() == before.keys()


def test_encryption_needs_a_key_wrapping_file(node: FakeNode) -> None:
    with pytest.raises(ZvoltError, match="no key wrapping file"):
        node.volumes.create_volume(VolumeSpec(name="enc", size=GiB, encryption_key=b"x" * 32))


def test_capacity_and_resource_exhausted(tmp_path: Path) -> None:
    small = make_node(str(tmp_path / "s"), str(tmp_path / "c"), pool_size=10 * GiB)
    cap = small.volumes.capacity()
    assert cap.total == 10 * GiB and 0 < cap.available < 10 * GiB
    # Thin volumes may overcommit (up to the commitment limit, 3x by default); thick ones must fit.
    small.volumes.create_volume(VolumeSpec(name="thin-big", size=20 * GiB))
    code = code_of(small.volumes.create_volume, VolumeSpec(name="thick-big", size=20 * GiB, thick=True))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    small.volumes.create_volume(VolumeSpec(name="thick-ok", size=8 * GiB, thick=True))
    # The pool is now nearly full: even thin creates are refused.
    small.volumes.refresh_space()  # what the periodic refresher does
    assert small.volumes.capacity().available < 2 * GiB
    rest = small.volumes.capacity().available // 16384 * 16384
    small.volumes.create_volume(VolumeSpec(name="thick-2", size=rest, thick=True))
    small.volumes.refresh_space()  # what the periodic refresher does
    assert code_of(small.volumes.create_volume, VolumeSpec(name="thin-2", size=GiB)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED


def test_snapshot_and_clones(node: FakeNode) -> None:
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=GiB, volblocksize=8192, compression="zle"))
    snap = v.create_snapshot("snap-1", src.id)
    assert snap.id == f"{src.id}@{names.id_for_name('snap-1', prefix='s')}"
    assert snap.size == GiB and snap.volume_id == src.id
    assert v.create_snapshot("snap-1", src.id) == snap
    other = v.create_volume(VolumeSpec(name="other", size=GiB))
    assert code_of(v.create_snapshot, "snap-1", other.id) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(v.create_snapshot, "snap-x", "vnope") == grpc.StatusCode.NOT_FOUND
    assert code_of(v.create_snapshot, "", src.id) == grpc.StatusCode.INVALID_ARGUMENT
    # Clone from a snapshot: grown, inherits the origin's volblocksize, inactive.
    c1 = v.create_volume(VolumeSpec(name="c1", size=2 * GiB, source_snapshot=snap.id))
    assert node.zfs.ds[c1.dataset].origin == snap.dataset
    assert node.zfs.ds[c1.dataset].props["volsize"] == str(2 * GiB)
    assert node.zfs.ds[c1.dataset].props["volmode"] == "none"
    assert c1.volblocksize == 8192 and c1.compression == "zle" and c1.source_snapshot == snap.id
    assert v.create_volume(VolumeSpec(name="c1", size=2 * GiB, source_snapshot=snap.id)) == c1
    # A restore smaller than the snapshot is refused.
    assert code_of(v.create_volume, VolumeSpec(name="c-small", size=GiB // 2, source_snapshot=snap.id)) == \
        grpc.StatusCode.OUT_OF_RANGE
    # Clone from a volume: an implicit hidden snapshot, not listed.
    c2 = v.create_volume(VolumeSpec(name="c2", size=GiB, source_volume=src.id))
    hidden = node.zfs.ds[c2.dataset].origin
    assert hidden.startswith(src.dataset + "@h")
    listed, _ = v.list_snapshots(0, "")
    assert [s.id for s in listed] == [snap.id]


def test_expand_never_shrinks(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="grow", size=GiB))
    assert v.expand_volume(vol.id, 2 * GiB + 1).size == 2 * GiB + 16384
    assert node.zfs.ds[vol.dataset].props["volsize"] == str(2 * GiB + 16384)
    assert v.expand_volume(vol.id, GiB).size == 2 * GiB + 16384
    assert node.zfs.ds[vol.dataset].props["volsize"] == str(2 * GiB + 16384)
    assert code_of(v.expand_volume, "vnope", GiB) == grpc.StatusCode.NOT_FOUND
    assert code_of(v.expand_volume, vol.id, 0) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.expand_volume, vol.id, 1 << 60) == grpc.StatusCode.OUT_OF_RANGE


def test_expand_thick_moves_refreservation(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="thick-grow", size=GiB, thick=True))
    node.volumes.expand_volume(vol.id, 3 * GiB)
    assert node.zfs.ds[vol.dataset].props["refreservation"] == str(3 * GiB)


def test_publish_unpublish_lifecycle(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="pub", size=GiB))
    nqn = v.publish(vol.id, HOST_A)
    assert nqn == names.subsystem_nqn("storage-0", vol.id)
    props = node.zfs.ds[vol.dataset].props
    assert props["volmode"] == "dev" and props["zvolt:hosts"] == HOST_A
    sub = node.root.subsystem(nqn)
    assert sub.attr("allow_any_host") == "0"
    ns = sub.namespace(1)
    assert ns.enabled and ns.attr("device_path") == f"/dev/zvol/{vol.dataset}"
    assert sub.allowed_hosts() == [HOST_A]
    port = node.root.find_port("10.42.0.1", "4420")
    assert port is not None and port.subsystems() == [nqn]
    assert v.get_volume(vol.id).healthy
    calls = len(node.zfs.calls)
    assert v.publish(vol.id, HOST_A) == nqn  # idempotent, nothing changed
    assert len(node.zfs.calls) == calls
    v.publish(vol.id, HOST_B)
    assert sub.allowed_hosts() == sorted([HOST_A, HOST_B])
    assert code_of(v.delete_volume, vol.id) == grpc.StatusCode.FAILED_PRECONDITION
    v.unpublish(vol.id, HOST_A)
    assert sub.allowed_hosts() == [HOST_B] and sub.exists()
    assert [h.nqn for h in node.root.hosts()] == [HOST_B]
    v.unpublish(vol.id, HOST_A)  # repeat: no-op
    v.unpublish(vol.id, HOST_B)
    assert not sub.exists()
    assert list(node.root.hosts()) == []
    assert port.subsystems() == []
    assert node.zfs.ds[vol.dataset].props["volmode"] == "none"
    assert node.zfs.ds[vol.dataset].props["zvolt:hosts"] == "-"
    assert v.get_volume(vol.id).healthy
    v.unpublish("vgone", HOST_A)  # unknown volume: already unpublished
    assert code_of(v.publish, "vgone", HOST_A) == grpc.StatusCode.NOT_FOUND
    assert code_of(v.publish, vol.id, "not-an-nqn") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.publish, vol.id, "nqn.2014-08.org.x:../../etc") == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_waits_for_device_with_deadline(node: FakeNode, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="slowdev", size=GiB))
    monkeypatch.setattr(node.zfs, "device_ready", lambda name: False)
    assert code_of(node.volumes.publish, vol.id, HOST_A) == grpc.StatusCode.INTERNAL
    # The failure was settled: ZFS says published, so a retry with a working device converges.
    monkeypatch.undo()
    node.volumes.publish(vol.id, HOST_A)
    assert node.volumes.get_volume(vol.id).healthy


def test_expand_of_exported_volume_revalidates(node: FakeNode) -> None:
    vol = node.volumes.create_volume(VolumeSpec(name="grow-pub", size=GiB))
    nqn = node.volumes.publish(vol.id, HOST_A)
    node.volumes.expand_volume(vol.id, 2 * GiB)
    assert node.root.subsystem(nqn).namespace(1).attr("revalidate_size") == "1"


def test_get_volume_condition_reports_drift(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="drift", size=GiB))
    st = v.get_volume(vol.id)
    assert st.healthy and st.used_bytes > 0
    nqn = v.publish(vol.id, HOST_A)
    node.root.subsystem(nqn).namespace(1).set_attr("enable", "0")
    st = v.get_volume(vol.id)
    assert not st.healthy and "disabled" in st.message
    node.root.subsystem(nqn).delete()
    assert "missing" in v.get_volume(vol.id).message
    assert code_of(v.get_volume, "vnope") == grpc.StatusCode.NOT_FOUND


def test_delete_volume_and_snapshot_idempotent(node: FakeNode) -> None:
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="del", size=GiB))
    snap = v.create_snapshot("del-s", vol.id)
    v.delete_snapshot(snap.id)
    v.delete_snapshot(snap.id)
    assert not node.zfs.exists(snap.dataset)
    v.delete_volume(vol.id)  # the fake reports EBUSY once (udev): retried on the careful path
    assert node.zfs.calls.count(f"destroy {vol.dataset}") == 2
    v.delete_volume(vol.id)
    assert not node.zfs.exists(vol.dataset)
    assert code_of(v.delete_volume, "../x") == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(v.delete_snapshot, "nosep") == grpc.StatusCode.INVALID_ARGUMENT


def _all_gone(node: FakeNode) -> None:
    leftovers = [n for n in node.zfs.ds if n.startswith("tank/zvolt/") and node.zfs.ds[n].kind != "filesystem"]
    assert leftovers == []
    assert node.index.trash() == []
    assert node.index.counts() == (0, 0, 0)


def _chain(node: FakeNode) -> dict[str, str]:
    """base -> s1 -> b1 -> s2 -> b2, plus b3 cloned from base directly (hidden snapshot)."""
    v = node.volumes
    ids: dict[str, str] = {}
    ids["base"] = v.create_volume(VolumeSpec(name="base", size=GiB)).id
    ids["s1"] = v.create_snapshot("s1", ids["base"]).id
    ids["b1"] = v.create_volume(VolumeSpec(name="b1", size=GiB, source_snapshot=ids["s1"])).id
    ids["s2"] = v.create_snapshot("s2", ids["b1"]).id
    ids["b2"] = v.create_volume(VolumeSpec(name="b2", size=GiB, source_snapshot=ids["s2"])).id
    ids["b3"] = v.create_volume(VolumeSpec(name="b3", size=GiB, source_volume=ids["base"])).id
    return ids


ORDERS = [
    ["base", "s1", "b1", "s2", "b2", "b3"],
    ["b3", "b2", "s2", "b1", "s1", "base"],
    ["s1", "s2", "base", "b1", "b3", "b2"],
    ["b1", "base", "b2", "s1", "b3", "s2"],
    ["base", "b1", "b2", "b3", "s2", "s1"],
]


@pytest.mark.parametrize("order", ORDERS)
def test_delete_in_any_order_over_a_branch_chain(node: FakeNode, order: list[str]) -> None:
    v = node.volumes
    ids = _chain(node)
    for step, key in enumerate(order):
        if key.startswith("s"):
            v.delete_snapshot(ids[key])
            assert v.index.snapshot(ids[key]) is None
        else:
            v.delete_volume(ids[key])
            assert v.index.volume(ids[key]) is None
        # Everything not yet deleted is still reachable with its data lineage intact.
        for later in order[step + 1:]:
            if later.startswith("s"):
                rec = v.index.snapshot(ids[later])
                assert rec is not None and node.zfs.exists(rec.dataset)
            else:
                rec_v = v.index.volume(ids[later])
                assert rec_v is not None and node.zfs.exists(rec_v.dataset)
                if rec_v.origin:
                    assert node.zfs.exists(rec_v.origin)
    _all_gone(node)


def test_deleted_name_can_be_reused_while_branches_live(node: FakeNode) -> None:
    v = node.volumes
    base = v.create_volume(VolumeSpec(name="reuse", size=GiB))
    snap = v.create_snapshot("reuse-s", base.id)
    branch = v.create_volume(VolumeSpec(name="reuse-b", size=GiB, source_snapshot=snap.id))
    v.delete_volume(base.id)
    assert len(node.index.trash()) == 1
    again = v.create_volume(VolumeSpec(name="reuse", size=2 * GiB))
    assert again.id == base.id and again.size == 2 * GiB
    # The old snapshot still serves the branch and can still be cloned.
    v.create_volume(VolumeSpec(name="reuse-b2", size=GiB, source_snapshot=snap.id))
    v.delete_snapshot(snap.id)
    v.delete_volume(branch.id)
    assert len(node.index.trash()) == 1  # reuse-b2 still needs it
    v.delete_volume(names.id_for_name("reuse-b2"))
    assert node.index.trash() == []
    v.delete_volume(again.id)
    _all_gone(node)


def test_list_volumes_pagination(node: FakeNode) -> None:
    v = node.volumes
    made = sorted(v.create_volume(VolumeSpec(name=f"pvc-{i}", size=GiB)).id for i in range(25))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        rows, token = v.list_volumes(10, token)
        seen += [r.id for r in rows]
        pages += 1
        if not token:
            break
    assert seen == made and pages == 3
    assert code_of(v.list_volumes, 10, "!!garbage") == grpc.StatusCode.ABORTED
    assert code_of(v.list_volumes, -1, "") == grpc.StatusCode.INVALID_ARGUMENT
    assert len(v.list_volumes(0, "")[0]) == 25
    # Published only (the controller's attachment reconcile), paged the same way.
    host = "nqn.2014-08.org.nvmexpress:uuid:5a5a5a5a-0000-4000-8000-000000000001"
    published = sorted(made[i] for i in (3, 7, 11, 19))
    for vid in published:
        v.publish(vid, host)
    rows, token = v.list_volumes(3, "", published_only=True)
    rest, end = v.list_volumes(3, token, published_only=True)
    assert [r.id for r in rows + rest] == published and not end


def test_list_snapshots_filters_and_pages(node: FakeNode) -> None:
    v = node.volumes
    a = v.create_volume(VolumeSpec(name="la", size=GiB))
    b = v.create_volume(VolumeSpec(name="lb", size=GiB))
    sa = [v.create_snapshot(f"la-{i}", a.id).id for i in range(5)]
    sb = [v.create_snapshot(f"lb-{i}", b.id).id for i in range(3)]
    rows, token = v.list_snapshots(3, "", source_volume=a.id)
    rows2, token2 = v.list_snapshots(3, token, source_volume=a.id)
    assert sorted(r.id for r in rows + rows2) == sorted(sa) and token2 == ""
    assert [r.id for r in v.list_snapshots(0, "", snapshot_id=sb[0])[0]] == [sb[0]]
    assert v.list_snapshots(0, "", snapshot_id=sb[0], source_volume=a.id)[0] == []
    assert v.list_snapshots(0, "", snapshot_id="garbage")[0] == []
    assert v.list_snapshots(0, "", snapshot_id=f"{a.id}@snope")[0] == []
    assert len(v.list_snapshots(0, "")[0]) == 8


def test_restore_after_source_volume_was_deleted(node: FakeNode) -> None:
    """Delete in any order: a snapshot outlives its volume (kept in the trash) and still restores,
    with the volume's own volblocksize (ZFS reports "-" for a snapshot's)."""
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="pvc-src", size=GiB, volblocksize=8192))
    snap = v.create_snapshot("snap-1", src.id)
    v.delete_volume(src.id)
    assert v.layout.is_trash(v.index.snapshot(snap.id).dataset.partition("@")[0])  # type: ignore[union-attr]
    restored = v.create_volume(VolumeSpec(name="pvc-restore", size=GiB, source_snapshot=snap.id))
    assert restored.volblocksize == 8192
    assert node.zfs.ds[restored.dataset].origin.endswith("@" + snap.id.partition("@")[2])


def test_restore_from_a_vanished_snapshot_is_not_found_without_bytes_repr(node: FakeNode) -> None:
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="pvc-src", size=GiB))
    snap = v.create_snapshot("snap-1", src.id)
    # The snapshot disappears behind the index's back (as when its trash entry was collected).
    del node.zfs.ds[snap.dataset]
    with pytest.raises(ZvoltError) as err:
        v.create_volume(VolumeSpec(name="pvc-restore", size=GiB, source_snapshot=snap.id))
    assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value.message
    assert "b'" not in err.value.message
