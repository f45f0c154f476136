"""The pure planners of a drain and a rebalance (csi/drain.py plan_drain, csi/rebalance.py), and
placement's cordon (csi/placement.py)."""

from __future__ import annotations

import random

import pytest

from csi import placement, rebalance
from csi.drain import Blocked, Volume, plan_drain
from csi.placement import Candidate, ZoneRequirement
from zvolt.errors import ZvoltError

GiB = 1 << 30
ANY = ZoneRequirement(None, ())


def node(name: str, committed: int = 0, total: int = 1000 * GiB, free: int | None = None, zone: str = "z1",
         cordoned: bool = False) -> Candidate:
    # free = total - committed: every promised byte written, so room after promises = free
    return Candidate(name, zone, total - committed if free is None else free, 0, total_bytes=total,
                     committed_bytes=committed, commitment_ratio=3.0, cordoned=cordoned)


# -- placement never picks a cordoned node ----------------------------------------------------


def test_a_cordoned_node_is_never_chosen_even_with_the_most_room() -> None:
    nodes = [node("big", free=900 * GiB, cordoned=True), node("small", free=10 * GiB)]
    assert placement.choose(nodes, GiB, False, ANY) == ["small"]
    assert placement.admissible(nodes[0], False) == 0 and placement.largest_volume(nodes[0], False) == 0


def test_every_node_cordoned_refuses_and_says_how_to_undo_it() -> None:
    with pytest.raises(ZvoltError, match=r"every storage node that could take it is cordoned \(a, b\).*uncordon"):
        placement.choose([node("a", cordoned=True), node("b", cordoned=True)], GiB, False, ANY)


def test_random_views_never_place_on_a_cordoned_node() -> None:
    rng = random.Random(17)
    for _ in range(500):
        nodes = [node(f"n{i}", committed=rng.randrange(0, 900) * GiB, cordoned=rng.random() < 0.4) for i in range(5)]
        try:
            order = placement.choose(nodes, rng.randrange(1, 50) * GiB, rng.random() < 0.5, ANY)
        except ZvoltError:
            # Every node has room and admits it: only a cordon can refuse.
            assert all(c.cordoned for c in nodes)
            continue
        cordoned = {c.name for c in nodes if c.cordoned}
        assert order and not cordoned & set(order)


# -- the drain plan ---------------------------------------------------------------------------


def vol(vid: str, size_gib: int, moving_to: str = "", thick: bool = False) -> Volume:
    return Volume(f"s0/{vid}", vid, "s0", size_gib * GiB, thick, moving_to)


def test_smaller_first_and_planned_moves_count_on_their_targets() -> None:
    # Equal nodes: each planned volume lowers its target's room after promises, so the next one goes
    # to the other node. Without counting them in, all three would land on s1 (name order).
    others = [node("s1", committed=100 * GiB), node("s2", committed=100 * GiB)]
    plan = plan_drain([vol("c", 30), vol("a", 10), vol("b", 20)], [], "z1", others)
    assert [(m.volume.local, m.target) for m in plan.moves] == [("a", "s1"), ("b", "s2"), ("c", "s1")]


def test_a_move_under_way_goes_on_to_its_target_first() -> None:
    others = [node("s1", committed=500 * GiB), node("s2")]
    plan = plan_drain([vol("a", 1), vol("b", 5, moving_to="s1")], [], "z1", others)
    assert [(m.volume.local, m.target) for m in plan.moves] == [("b", "s1"), ("a", "s2")]


def test_what_fits_nowhere_is_blocked_with_placements_reason_and_blocked_ones_stay_listed() -> None:
    others = [node("s1", total=10 * GiB, free=1 * GiB)]
    already = Blocked("s0/p", "attached (published to h): in use: move it live")
    plan = plan_drain([vol("small", 1), vol("thick", 5, thick=True)], [already], "z1", others)
    assert [m.volume.local for m in plan.moves] == ["small"]
    assert plan.blocked[0] == already
    assert plan.blocked[1].volume_id == "s0/thick" and "no storage node can take it" in plan.blocked[1].reason


def test_volumes_stay_in_their_zone_and_skip_cordoned_nodes() -> None:
    others = [node("far", zone="z2"), node("near-cordoned", cordoned=True), node("near", committed=900 * GiB)]
    plan = plan_drain([vol("a", 1)], [], "z1", others)
    assert [m.target for m in plan.moves] == ["near"]
    lonely = plan_drain([vol("a", 1)], [], "z3", others)
    assert not lonely.moves and "topology" in lonely.blocked[0].reason


# -- rebalance --------------------------------------------------------------------------------


def mv(vid: str, where: str, size_gib: int) -> rebalance.Movable:
    return rebalance.Movable(f"{where}/{vid}", where, size_gib * GiB)


def test_rebalance_evens_committed_fractions_and_stops_when_no_move_narrows_the_gap() -> None:
    nodes = [node("a", committed=600 * GiB), node("b", committed=100 * GiB), node("c", committed=200 * GiB)]
    vols = [mv(f"v{i}", "a", 50) for i in range(12)]
    steps, after = rebalance.plan(nodes, vols)
    fractions = {n: rebalance.committed_fraction(c) for n, c in after.items()}
    assert fractions == {"a": 0.3, "b": 0.3, "c": 0.3}, fractions
    assert len(steps) == 6 and all(s.volume.node == "a" for s in steps)
    assert rebalance.spread(list(after.values())) < rebalance.spread(nodes)
    # Planning again from where the plan leaves the nodes finds nothing left to do.
    rest = [v for v in vols if v.volume_id not in {s.volume.volume_id for s in steps}]
    assert rebalance.plan(list(after.values()), rest)[0] == []


def test_rebalance_never_overshoots() -> None:
    # One 300 GiB volume would turn 400/100 into 100/400: the gap does not narrow, no move.
    steps, _ = rebalance.plan([node("a", committed=400 * GiB), node("b", committed=100 * GiB)], [mv("v", "a", 300)])
    assert steps == []
    # Of several, the one that brings the pair closest to equal (150 GiB) is chosen.
    steps, _ = rebalance.plan([node("a", committed=400 * GiB), node("b", committed=100 * GiB)],
                              [mv("x", "a", 40), mv("y", "a", 150), mv("z", "a", 250)])
    assert [s.volume.volume_id for s in steps] == ["a/y"]


def test_rebalance_weighs_nodes_by_their_size() -> None:
    # 200 of 1000 GiB (0.2) and 100 of 100 GiB (1.0): the small node is the more committed one. 60 GiB
    # across makes 0.26 / 0.4, then 20 GiB more 0.28 / 0.2 (the gap still narrows: 0.14 -> 0.08).
    nodes = [node("big", committed=200 * GiB), node("small", committed=100 * GiB, total=100 * GiB)]
    steps, after = rebalance.plan(nodes, [mv("v1", "small", 60), mv("v2", "small", 20)])
    assert [s.volume.volume_id for s in steps] == ["small/v1", "small/v2"]
    assert rebalance.committed_fraction(after["small"]) == pytest.approx(0.2)
    assert rebalance.committed_fraction(after["big"]) == pytest.approx(0.28)


def test_rebalance_leaves_cordoned_nodes_and_other_zones_alone() -> None:
    nodes = [node("a", committed=800 * GiB), node("b", cordoned=True), node("c", zone="z2")]
    steps, after = rebalance.plan(nodes, [mv("v", "a", 100)])
    assert steps == [] and set(after) == {"a", "c"}


def test_rebalance_random_plans_only_lower_the_spread_and_move_each_volume_once() -> None:
    rng = random.Random(4)
    for _ in range(200):
        nodes = [node(f"n{i}", committed=0, total=rng.choice([500, 1000, 2000]) * GiB) for i in range(4)]
        vols = [mv(f"v{j}", rng.choice(nodes).name, rng.randrange(1, 120)) for j in range(30)]
        loads = {c.name: sum(v.size for v in vols if v.node == c.name) for c in nodes}
        nodes = [node(c.name, committed=loads[c.name], total=c.total_bytes, free=c.total_bytes) for c in nodes]
        steps, after = rebalance.plan(nodes, vols)
        assert len({s.volume.volume_id for s in steps}) == len(steps)
        assert rebalance.spread(list(after.values())) <= rebalance.spread(nodes)
        assert sum(c.committed_bytes for c in after.values()) == sum(loads.values())
