"""Bounded overcommit in the agent, on fakes: the commitment limit, the growth reserve, what
each kind of dataset is charged, and what GetCapacity and the gauges report."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import grpc
import pytest

from agent import main as agent_main
from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer
from agent.volumes import VolumeSpec
from agent.zfs import ZfsError
from zvolt import names
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

GiB = 1 << 30
MiB = 1 << 20


def node_with(tmp_path: Path, ratio: float, pool: int = 10 * GiB) -> FakeNode:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"), pool_size=pool)
    node.volumes.cfg = dataclasses.replace(node.volumes.cfg, commitment_ratio=ratio)
    return node


def refused(fn: object, *args: object) -> str:
    with pytest.raises(ZvoltError) as err:
        fn(*args)  # type: ignore[operator]
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.message
    return err.value.message


def test_thin_creates_up_to_the_limit_then_refused_with_the_numbers(tmp_path: Path) -> None:
    node = node_with(tmp_path, 2.0)  # 10 GiB pool: 20 GiB may be promised
    v = node.volumes
    v.create_volume(VolumeSpec(name="a", size=12 * GiB))
    v.create_volume(VolumeSpec(name="b", size=8 * GiB))  # exactly at the limit
    msg = refused(v.create_volume, VolumeSpec(name="c", size=16 * MiB))
    assert "commitment limit of storage node storage-0" in msg
    assert f"{20 * GiB} bytes committed" in msg and f"limit of {20 * GiB} bytes" in msg
    assert f"pool size {10 * GiB} bytes" in msg and "2 x" in msg
    assert not node.zfs.exists(v.layout.volume(names.id_for_name("c")))
    # A repeat of a create that succeeded is not a new commitment.
    assert v.create_volume(VolumeSpec(name="b", size=8 * GiB)).size == 8 * GiB


def test_delete_gives_the_commitment_back(tmp_path: Path) -> None:
    node = node_with(tmp_path, 1.0)
    v = node.volumes
    a = v.create_volume(VolumeSpec(name="a", size=10 * GiB))
    refused(v.create_volume, VolumeSpec(name="b", size=GiB))
    v.delete_volume(a.id)
    assert v.create_volume(VolumeSpec(name="b", size=GiB)).size == GiB


def test_thick_and_thin_count_alike(tmp_path: Path) -> None:
    node = node_with(tmp_path, 1.0)
    v = node.volumes
    v.create_volume(VolumeSpec(name="thick", size=4 * GiB, thick=True))
    v.create_volume(VolumeSpec(name="thin", size=6 * GiB))
    assert v.capacity().committed == 10 * GiB
    assert "commitment limit" in refused(v.create_volume, VolumeSpec(name="more", size=GiB))


def test_clones_and_restores_are_charged_their_full_size(tmp_path: Path) -> None:
    node = node_with(tmp_path, 3.0)  # 30 GiB
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=12 * GiB))
    v.create_volume(VolumeSpec(name="branch", size=12 * GiB, source_volume=src.id))
    assert v.capacity().committed == 24 * GiB
    msg = refused(v.create_volume, VolumeSpec(name="branch-2", size=12 * GiB, source_volume=src.id))
    assert "clone 'branch-2'" in msg and "commitment limit" in msg
    v.delete_volume(names.id_for_name("branch"))
    snap = v.create_snapshot("s1", src.id)  # fakes report no `referenced`: charged the volume's size
    assert v.capacity().committed == 24 * GiB
    msg = refused(v.create_volume, VolumeSpec(name="restore", size=12 * GiB, source_snapshot=snap.id))
    assert "clone 'restore'" in msg and f"{24 * GiB} bytes committed" in msg
    v.delete_snapshot(snap.id)  # gives its charge back
    assert v.capacity().committed == 12 * GiB


def test_a_snapshot_is_charged_what_it_referenced_when_taken(tmp_path: Path) -> None:
    node = node_with(tmp_path, 3.0)
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=8 * GiB))
    real = node.zfs.get_props

    def with_referenced(name: str, props: tuple[str, ...] = ()) -> dict[str, str] | None:
        got = real(name, props)
        if got is not None and "@" in name and "referenced" in props:
            got["referenced"] = str(300 * MiB)
        return got

    node.zfs.get_props = with_referenced  # type: ignore[method-assign,assignment]
    snap = v.create_snapshot("s1", src.id)
    assert v.index.snapshot_charge(snap.id) == 300 * MiB
    assert v.capacity().committed == 8 * GiB + 300 * MiB
    # Snapshots are never refused (a backup must not fail on overcommit), only counted.
    v.create_volume(VolumeSpec(name="fill", size=30 * GiB - 8 * GiB - 300 * MiB))
    again = v.create_snapshot("s2", src.id)
    assert again.id != snap.id and v.capacity().commitment_available == 0


def test_an_unknown_snapshot_charge_counts_the_volume_size(tmp_path: Path) -> None:
    node = node_with(tmp_path, 3.0)
    v = node.volumes
    src = v.create_volume(VolumeSpec(name="src", size=GiB))
    snap = v.create_snapshot("s1", src.id)
    with v.index.tx() as tx:
        tx._c.execute("DELETE FROM snapshot_charges")  # as after a rebuild from ZFS, or an upgrade
    assert v.index.snapshot_charge(snap.id) is None
    assert v.index.committed_bytes() == 2 * GiB
    # The trigger keeps charges exactly as long as their snapshot; a repeat keeps the charge.
    s2 = v.create_snapshot("s2", src.id)
    assert v.index.snapshot_charge(s2.id) == GiB
    assert v.create_snapshot("s2", src.id) == s2 and v.index.snapshot_charge(s2.id) == GiB
    v.delete_snapshot(s2.id)
    assert v.index.snapshot_charge(s2.id) is None
    assert v.index.committed_bytes() == 2 * GiB


def test_expansion_past_the_limit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    node = node_with(tmp_path, 1.0)
    v = node.volumes
    vol = v.create_volume(VolumeSpec(name="a", size=6 * GiB))
    v.create_volume(VolumeSpec(name="b", size=2 * GiB))
    assert v.expand_volume(vol.id, 8 * GiB).size == 8 * GiB  # exactly to the limit
    msg = refused(v.expand_volume, vol.id, 9 * GiB)
    assert f"growing volume {vol.id} from {8 * GiB} to {9 * GiB} bytes adds {GiB} bytes" in msg
    assert node.zfs.ds[vol.dataset].props["volsize"] == str(8 * GiB)
    assert v.index.volume(vol.id).size == 8 * GiB  # type: ignore[union-attr]


def test_the_growth_reserve_refuses_new_volumes_and_says_so(tmp_path: Path) -> None:
    node = node_with(tmp_path, 10.0)
    v = node.volumes
    # 10% of a 10 GiB pool kept for growth: a thick volume may take only what lies above it.
    v.cfg = dataclasses.replace(v.cfg, reserve_fraction=0.1)
    msg = refused(v.create_volume, VolumeSpec(name="t", size=9 * GiB + 512 * MiB, thick=True))
    assert "above the growth reserve of" in msg and str(GiB) in msg
    v.create_volume(VolumeSpec(name="t", size=9 * GiB - 32 * MiB, thick=True))
    v.refresh_space()
    msg = refused(v.create_volume, VolumeSpec(name="thin", size=GiB))
    assert "growth reserve of storage node storage-0 reached" in msg
    cap = v.capacity()
    assert cap.reserve == GiB and cap.available < 64 * MiB


def test_in_flight_creates_count_against_the_limit(tmp_path: Path) -> None:
    """Two creates at once must not both fit: the charge of one still in ZFS is held."""
    node = node_with(tmp_path, 1.0)
    v = node.volumes
    entered, release = threading.Event(), threading.Event()
    real = node.zfs.create_volume

    def slow_create(*args: object, **kw: object) -> None:
        entered.set()
        release.wait(10)
        real(*args, **kw)  # type: ignore[arg-type]

    node.zfs.create_volume = slow_create  # type: ignore[method-assign,assignment]
    first = threading.Thread(target=v.create_volume, args=(VolumeSpec(name="a", size=6 * GiB),))
    first.start()
    assert entered.wait(10)
    assert v.capacity().committed == 6 * GiB  # pending, not in the index yet
    node.zfs.create_volume = real  # type: ignore[method-assign]
    assert "commitment limit" in refused(v.create_volume, VolumeSpec(name="b", size=6 * GiB))
    release.set()
    first.join(10)
    assert v.admissions.pending() == 0 and v.capacity().committed == 6 * GiB
    v.create_volume(VolumeSpec(name="b", size=4 * GiB))


def test_a_failed_create_releases_its_charge(tmp_path: Path) -> None:
    node = node_with(tmp_path, 1.0)
    v = node.volumes
    real = node.zfs.create_volume

    def failing(*args: object, **kw: object) -> None:
        raise ZfsError(5, "I/O error")

    node.zfs.create_volume = failing  # type: ignore[method-assign,assignment]
    with pytest.raises(ZvoltError):
        v.create_volume(VolumeSpec(name="a", size=10 * GiB))
    node.zfs.create_volume = real  # type: ignore[method-assign]
    assert v.admissions.pending() == 0
    v.create_volume(VolumeSpec(name="a", size=10 * GiB))


def test_get_capacity_and_gauges_report_the_commitment(tmp_path: Path) -> None:
    node = node_with(tmp_path, 2.5)
    metrics = Metrics()
    servicer = AgentServicer(node.volumes, node.readiness, metrics)
    node.volumes.create_volume(VolumeSpec(name="a", size=5 * GiB))
    cap = servicer.GetCapacity(pb.GetCapacityRequest(), None)
    assert cap.total_bytes == 10 * GiB and cap.committed_bytes == 5 * GiB
    assert cap.commitment_limit_ratio == 2.5 and cap.commitment_available_bytes == 20 * GiB
    assert cap.reserve_bytes == 512 * MiB  # 5% of the pool by default
    node.volumes.create_volume(VolumeSpec(name="b", size=GiB))
    servicer.refresh_metrics()
    value = metrics.registry.get_sample_value
    assert value("zvolt_agent_pool_committed_bytes") == 6 * GiB
    assert value("zvolt_agent_pool_commitment_ratio") == pytest.approx(0.6)
    assert value("zvolt_agent_pool_commitment_limit_ratio") == 2.5


def test_the_commitment_sum_reads_an_index_not_the_volume_rows(tmp_path: Path) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    plan = " ".join(str(r) for r in node.index._db.execute(
        "EXPLAIN QUERY PLAN SELECT coalesce(sum(size), 0) FROM volumes").fetchall())
    assert "COVERING INDEX volumes_size" in plan, plan


@pytest.mark.parametrize(("argv", "error"), [
    (["--commitment-ratio", "0"], "--commitment-ratio must be above 0"),
    (["--commitment-ratio", "lots"], "is not a number"),
    (["--commitment-ratio", "nan"], "--commitment-ratio must be above 0"),
    (["--growth-reserve", "1"], "--growth-reserve must be a fraction"),
])
def test_agent_flags_refuse_bad_limits(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--node-name", "n1", "--pool", "tank", "--nvme-listen", "127.0.0.1:4420", "--insecure"]
    with pytest.raises(SystemExit):
        agent_main.parse_settings([*base, *argv], env={})
    assert error in capsys.readouterr().err


def test_agent_flags_set_the_limits() -> None:
    base = ["--node-name", "n1", "--pool", "tank", "--nvme-listen", "127.0.0.1:4420", "--insecure"]
    default = agent_main.parse_settings(base, env={})
    assert (default.commitment_ratio, default.growth_reserve) == (3.0, 0.05)
    s = agent_main.parse_settings([*base, "--commitment-ratio", "1.5"], env={"ZVOLT_GROWTH_RESERVE": "0.1"})
    assert (s.commitment_ratio, s.growth_reserve) == (1.5, 0.1)
