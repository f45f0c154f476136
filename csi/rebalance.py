"""Evening out committed space across storage nodes: which volumes to move where (pure, no I/O).

The rule. A node's load is its committed fraction f = committed / total (csi/placement.py: a
thin volume's size is a promise). The spread of a zone is S = sum of committed^2 / total over its
nodes: for a given total commitment it is smallest exactly when every node is equally committed
(as a fraction of its own size), whatever the sizes of the nodes. Repeatedly, within each zone:
take the most committed node M and the least committed node L (ties: by name); among M's movable
volumes that L admits (placement.choose: room, size limits, commitment limits), pick the one
whose move from M to L lowers S the most. Moving s bytes changes S by s * (s/T_M + s/T_L - 2 *
(f_M - f_L)), so a move lowers S exactly when it narrows the gap between M and L without
overshooting it; the best one brings the pair closest to equal.

The stop condition: no volume of M that L admits would lower S (every one would overshoot, or M
has none that can move), or M and L are equally committed. Every planned move lowers S and each
volume moves at most once, so the plan is finite. Volumes never leave their zone (a PV's node
affinity names it); cordoned nodes and nodes that report no totals (older agents) take no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from csi import placement
from csi.placement import Candidate, ZoneRequirement
from zvolt.errors import ZvoltError


@dataclass(frozen=True)
class Movable:
    volume_id: str  # CSI id
    node: str  # where it is now
    size: int
    thick: bool = False


@dataclass(frozen=True)
class Step:
    volume: Movable
    target: str


def committed_fraction(c: Candidate) -> float:
    return c.committed_bytes / c.total_bytes if c.total_bytes > 0 else 0.0


def spread(nodes: Sequence[Candidate]) -> float:
    """S of the module docstring (bytes): lower is more even."""
    return sum(c.committed_bytes ** 2 / c.total_bytes for c in nodes if c.total_bytes > 0)


def plan(candidates: Sequence[Candidate], volumes: Sequence[Movable]) -> tuple[list[Step], dict[str, Candidate]]:
    """The moves, in order, and every taking-part node as it will be after them."""
    taking = [c for c in candidates if not c.cordoned and c.total_bytes > 0]
    after: dict[str, Candidate] = {c.name: c for c in taking}
    steps: list[Step] = []
    for zone in sorted({c.zone for c in taking}):
        members = [c.name for c in taking if c.zone == zone]
        left = [v for v in volumes if v.node in members]
        steps += _even(after, members, left)
    return steps, after


def _even(nodes: dict[str, Candidate], members: list[str], volumes: list[Movable]) -> list[Step]:
    steps: list[Step] = []
    pending = sorted(volumes, key=lambda v: (v.node, v.volume_id))
    while len(members) > 1:
        ranked = sorted(members, key=lambda n: (-Fraction(nodes[n].committed_bytes, nodes[n].total_bytes), n))
        most, least = nodes[ranked[0]], nodes[ranked[-1]]
        # In integers (exact: no move may pass on a rounding error): the gap and each move's change
        # of S, both times total_M * total_L.
        gap = most.committed_bytes * least.total_bytes - least.committed_bytes * most.total_bytes
        if gap <= 0:
            break
        best: tuple[int, Movable] | None = None
        for v in pending:
            if v.node != most.name or not _admits(least, v):
                continue
            change = v.size * (v.size * (least.total_bytes + most.total_bytes) - 2 * gap)
            if change < 0 and (best is None or change < best[0]):
                best = (change, v)
        if best is None:
            break
        v = best[1]
        pending.remove(v)
        nodes[most.name] = placement.with_volume(most, -v.size, v.thick)
        nodes[least.name] = placement.with_volume(least, v.size, v.thick)
        steps.append(Step(v, least.name))
    return steps


def _admits(c: Candidate, v: Movable) -> bool:
    try:
        placement.choose([c], v.size, v.thick, ZoneRequirement(None, ()))
    except ZvoltError:
        return False
    return True
