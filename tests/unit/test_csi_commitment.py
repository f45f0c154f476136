"""Commitment limits on the controller side, pure logic: StorageClass parameter, placement,
and what GetCapacity derives from the agents' figures."""

from __future__ import annotations

import grpc
import pytest

from csi import params, placement
from csi.placement import Candidate, ZoneRequirement
from zvolt.errors import ZvoltError

GiB = 1 << 30
ANY = ZoneRequirement(requisite=None, preferred=())


def node(name: str, free: int = 10 * GiB, total: int = 10 * GiB, committed: int = 0, ratio: float = 3.0,
         max_volume: int = 0) -> Candidate:
    return Candidate(name, "z", free, max_volume, total_bytes=total, committed_bytes=committed,
                     commitment_ratio=ratio)


def refusal(*args: object) -> str:
    with pytest.raises(ZvoltError) as err:
        placement.choose(*args)  # type: ignore[arg-type]
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return err.value.message


def test_storage_class_commitment_ratio_is_parsed_and_checked() -> None:
    assert params.parse({}).commitment_ratio == 0.0
    assert params.parse({"commitmentRatio": "1.5"}).commitment_ratio == 1.5
    for bad in ("0", "-1", "x", "inf", "1001"):
        with pytest.raises(ZvoltError, match="commitmentRatio") as err:
            params.parse({"commitmentRatio": bad})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_placement_skips_nodes_whose_limit_does_not_admit_the_size() -> None:
    full = node("full", committed=29 * GiB)  # admits 1 GiB
    roomy = node("roomy", free=GiB, committed=0)  # emptier in committed, fuller on disk
    assert placement.choose([full, roomy], 2 * GiB, False, ANY) == ["roomy"]
    # Most room after promises first (free less unwritten commitment): full has 29 GiB unwritten in 10 free.
    assert placement.choose([full, roomy], GiB, False, ANY) == ["roomy", "full"]


def test_placement_refusal_names_the_node_limit_with_numbers() -> None:
    msg = refusal([node("a", committed=29 * GiB), node("b", committed=30 * GiB)], 2 * GiB, False, ANY)
    assert "commitment limit of storage node a" in msg and f"{29 * GiB} bytes committed" in msg
    assert f"limit of {30 * GiB} bytes (3 x pool size {10 * GiB} bytes)" in msg


def test_the_class_limit_is_the_lower_one_and_is_named() -> None:
    n = node("a", committed=12 * GiB)
    assert placement.choose([n], 5 * GiB, False, ANY, 2.0) == ["a"]  # 20 GiB: 8 left
    msg = refusal([n], 9 * GiB, False, ANY, 2.0)
    assert "the StorageClass (commitmentRatio) on storage node a" in msg and "2 x pool size" in msg
    # A class more generous than the node changes nothing: the node's limit holds.
    assert "commitment limit of storage node a" in refusal([n], 19 * GiB, False, ANY, 5.0)


def test_an_agent_without_a_limit_is_not_limited_unless_the_class_says_so() -> None:
    old = node("old", committed=100 * GiB, ratio=0.0)
    assert placement.admits(old) is None
    assert placement.choose([old], 50 * GiB, False, ANY) == ["old"]
    assert placement.admits(old, 20.0) == 100 * GiB


def test_physical_space_is_checked_before_commitment() -> None:
    msg = refusal([node("a", free=0)], GiB, False, ANY)
    assert "growth reserve" in msg and "commitment" not in msg


def test_largest_volume_a_thin_branch_bigger_than_free_space_schedules_within_the_limit() -> None:
    n = node("a", free=2 * GiB, committed=5 * GiB)  # admits 25 GiB
    assert placement.largest_volume(n, thick=False) == 25 * GiB
    assert placement.largest_volume(n, thick=True) == 2 * GiB
    assert placement.largest_volume(n, thick=False, class_ratio=1.0) == 5 * GiB
    assert placement.largest_volume(node("b", committed=30 * GiB), thick=False) == 0
    assert placement.largest_volume(node("c", max_volume=GiB), thick=False) == GiB
    assert placement.admissible(n, thick=False) == 25 * GiB and placement.admissible(n, thick=True) == 2 * GiB
    assert placement.admissible(node("d", free=0), thick=False) == 0
