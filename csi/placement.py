"""Choosing the storage node for a new volume: capacity-aware, honouring topology.

Pure logic (no I/O) so every rule is unit-tested directly. Clones and restores never come
here: they must live on the node that holds their source (ZFS clones are node-local).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from csi import TOPOLOGY_ZONE_KEY
from zvolt import commitment
from zvolt.errors import exhausted, out_of_range


@dataclass(frozen=True)
class Candidate:
    name: str
    zone: str
    available_bytes: int  # free space above the node's growth reserve
    max_volume_bytes: int  # 0 = no limit reported
    total_bytes: int = 0
    committed_bytes: int = 0
    commitment_ratio: float = 0.0  # the node's limit; 0 = none reported (an older agent)
    cordoned: bool = False  # takes no new volumes (SetCordon; a drain starts with it)


def from_capacity(name: str, zone: str, cap: Any) -> Candidate:
    """A node as its agent's GetCapacity answer describes it."""
    return Candidate(name, zone, cap.available_bytes, cap.maximum_volume_size, total_bytes=cap.total_bytes,
                     committed_bytes=cap.committed_bytes, commitment_ratio=cap.commitment_limit_ratio,
                     cordoned=cap.cordoned)


def with_volume(c: Candidate, size: int, thick: bool) -> Candidate:
    """The node as it will be once a volume of `size` bytes lands on it (a planned move); a negative
    size: once it has left. Its size is promised; what it has written needs no counting, since room
    after promises is the same whether a promised byte is written or not. A thick volume takes its
    whole size from the free space."""
    return replace(c, committed_bytes=max(0, c.committed_bytes + size),
                   available_bytes=c.available_bytes - (size if thick else 0))


def room_after_promises(c: Candidate) -> int:
    """The spread rule: free space minus what the node's thin volumes may still write.

    A thin volume's size is a promise; the bytes it has written are already gone from the free
    space, the rest may arrive any time. So a node's room for the future is its free space less
    its unwritten commitment (committed - used, used = total - free). Between two equally free
    nodes the one that has promised more ranks lower; a node that reports no totals (an older
    agent) ranks by free space alone."""
    if c.total_bytes <= 0:
        return c.available_bytes
    used = max(0, c.total_bytes - c.available_bytes)
    return c.available_bytes - max(0, c.committed_bytes - used)


@dataclass(frozen=True)
class GroupSpread:
    """The other volumes of the new volume's group (csi/params.py: GROUP_SPREAD_KEY) and where
    they live. required: never on a node that holds one (refuse instead); preferred: the nodes
    holding the fewest go first, then the usual order."""

    group: str
    required: bool
    members: Mapping[str, int] = field(default_factory=dict)  # storage node -> volumes of the group on it


def admits(c: Candidate, class_ratio: float = 0.0) -> int | None:
    """Logical bytes the commitment limits still admit on this node: the node's own and the
    StorageClass's (commitmentRatio), the lower winning. None: neither sets a limit.

    The class limit is enforced here, from GetCapacity data, not in the agent: the agent API
    stays one node-wide policy, and GetCapacity (which CSIStorageCapacity is made of, per class)
    answers with the same rule. Two concurrent creates may both pass it on data a moment old;
    the node's own limit is the one admitted atomically, by the agent."""
    limits = [r for r in (c.commitment_ratio, class_ratio) if r > 0]
    if not limits:
        return None
    return commitment.headroom(c.committed_bytes, c.total_bytes, min(limits))


def refusal(c: Candidate, size: int, class_ratio: float) -> str:
    by_class = class_ratio > 0 and (c.commitment_ratio <= 0 or class_ratio < c.commitment_ratio)
    ratio = class_ratio if by_class else c.commitment_ratio
    who = f"the StorageClass (commitmentRatio) on storage node {c.name}" if by_class else f"storage node {c.name}"
    return commitment.refusal(who, f"a volume of {size} bytes", size, c.committed_bytes, c.total_bytes, ratio)


def move_in_refusal(c: Candidate, volume: str, size: int, used: int) -> str | None:
    """Why node `c` has no room for volume `volume` (`size` bytes promised, `used` bytes with its
    snapshots: about what its stream writes there), or None. Asked before a move starts, so a
    refused move changes nothing; a full target would otherwise fail at the end of a long stream."""
    if used > c.available_bytes:
        return (f"volume {volume} takes {used} bytes with its snapshots, and storage node {c.name} has "
                f"{c.available_bytes} bytes free above its growth reserve: free space there or choose another node")
    room = admits(c)
    if room is not None and size > room:
        return refusal(c, size, 0.0).replace(f"a volume of {size} bytes", f"volume {volume} ({size} bytes)", 1)
    return None


@dataclass(frozen=True)
class ZoneRequirement:
    requisite: frozenset[str] | None  # None: anywhere
    preferred: tuple[str, ...]


def zone_requirement(requisite: Sequence[dict[str, str]], preferred: Sequence[dict[str, str]]) -> ZoneRequirement:
    """CSI TopologyRequirement (as segment dicts) -> the zones we may / prefer to use.

    A segment without our key places no constraint on the zone, so it allows every zone.
    """
    zones: set[str] | None = set()
    for segments in requisite:
        if TOPOLOGY_ZONE_KEY not in segments:
            zones = None
            break
        assert zones is not None
        zones.add(segments[TOPOLOGY_ZONE_KEY])
    if not requisite:
        zones = None
    ordered = tuple(dict.fromkeys(s[TOPOLOGY_ZONE_KEY] for s in preferred if TOPOLOGY_ZONE_KEY in s))
    return ZoneRequirement(requisite=frozenset(zones) if zones is not None else None, preferred=ordered)


def choose(candidates: Sequence[Candidate], size: int, thick: bool, req: ZoneRequirement,
           class_ratio: float = 0.0, group: GroupSpread | None = None) -> list[str]:
    """Storage nodes to try, best first. Raises when no node can hold the volume.

    Cordoned nodes take nothing. Thick volumes reserve their full size, so they need that much free space. Thin ones
    only need room to start; both need the commitment limits to admit their full size.
    Among those that fit: a group's spread first (see GroupSpread), then preferred zones,
    then the most room after promises (room_after_promises), then the most free space.
    """
    zoned = [c for c in candidates if req.requisite is None or c.zone in req.requisite]
    if not zoned:
        raise exhausted(f"no storage node is reachable in the requested topology ({sorted(req.requisite or [])})")
    allowed = [c for c in zoned if not c.cordoned]
    if not allowed:
        cordoned = ", ".join(sorted(c.name for c in zoned))
        raise exhausted(f"every storage node that could take it is cordoned ({cordoned}): "
                        "`kubectl zvolt uncordon-storage NODE` when one may take volumes again")
    sized = [c for c in allowed if c.max_volume_bytes == 0 or size <= c.max_volume_bytes]
    if not sized:
        biggest = max(c.max_volume_bytes for c in allowed)
        raise out_of_range(f"{size} bytes is larger than the biggest volume a storage node can hold ({biggest} bytes)")
    need = size if thick else 1
    roomy = [c for c in sized if c.available_bytes >= need]
    if not roomy:
        most = max(c.available_bytes for c in sized)
        raise exhausted(f"no storage node has {need} bytes free above its growth reserve (most free: {most} bytes)")
    fits = [c for c in roomy if (a := admits(c, class_ratio)) is None or a >= size]
    if not fits:
        closest = max(roomy, key=lambda c: admits(c, class_ratio) or 0)
        raise exhausted(refusal(closest, size, class_ratio))
    held = dict(group.members) if group is not None else {}
    if group is not None and group.required:
        apart = [c for c in fits if not held.get(c.name)]
        if not apart:
            nodes = ", ".join(sorted(n for n, count in held.items() if count))
            raise exhausted(f"volume group {group.group!r} keeps its volumes on different storage nodes "
                            f"(groupSpread=required); storage nodes holding one already: {nodes}; no other storage "
                            f"node can take a volume of {size} bytes: add a storage node or use groupSpread=preferred")
        fits = apart
    rank = {zone: i for i, zone in enumerate(req.preferred)}
    fits.sort(key=lambda c: (held.get(c.name, 0), rank.get(c.zone, len(rank)), -room_after_promises(c),
                             -c.available_bytes, c.name))
    return [c.name for c in fits]


def largest_volume(c: Candidate, thick: bool, class_ratio: float = 0.0) -> int:
    """The biggest volume this node would create now (GetCapacity's maximum_volume_size, which
    kube-scheduler prefers over the capacity). Thick needs the space; thin only needs the node
    to take volumes at all, so a thin branch of a volume bigger than the free space schedules
    as long as the commitment limits admit its size."""
    if c.cordoned:
        return 0
    bounds = [b for b in (c.max_volume_bytes or None, admits(c, class_ratio)) if b is not None]
    if thick:
        bounds.append(c.available_bytes)
    elif c.available_bytes <= 0:
        return 0
    return min(bounds) if bounds else c.available_bytes


def admissible(c: Candidate, thick: bool, class_ratio: float = 0.0) -> int:
    """What this node would still take in all (GetCapacity's available_capacity): logical bytes
    under the commitment limits; for thick volumes, no more than the free space either."""
    limit = admits(c, class_ratio)
    if c.available_bytes <= 0 or c.cordoned:
        return 0
    if limit is None:
        return c.available_bytes
    return min(limit, c.available_bytes) if thick else limit

