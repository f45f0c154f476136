"""Choosing the storage node for a new volume: capacity-aware, honouring topology.

Pure logic (no I/O) so every rule is unit-tested directly. Clones and restores never come
here: they must live on the node that holds their source (ZFS clones are node-local).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from csi import TOPOLOGY_ZONE_KEY
from zvolt.errors import exhausted, out_of_range


@dataclass(frozen=True)
class Candidate:
    name: str
    zone: str
    available_bytes: int
    max_volume_bytes: int  # 0 = no limit reported


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


def choose(candidates: Sequence[Candidate], size: int, thick: bool, req: ZoneRequirement) -> list[str]:
    """Storage nodes to try, best first. Raises when no node can hold the volume.

    Thick volumes reserve their full size, so they need that much free space. Thin ones
    only need room to start; among those that fit, the emptiest preferred node wins.
    """
    allowed = [c for c in candidates if req.requisite is None or c.zone in req.requisite]
    if not allowed:
        raise exhausted(f"no storage node is reachable in the requested topology ({sorted(req.requisite or [])})")
    sized = [c for c in allowed if c.max_volume_bytes == 0 or size <= c.max_volume_bytes]
    if not sized:
        biggest = max(c.max_volume_bytes for c in allowed)
        raise out_of_range(f"{size} bytes is larger than the biggest volume a storage node can hold ({biggest} bytes)")
    need = size if thick else 1
    fits = [c for c in sized if c.available_bytes >= need]
    if not fits:
        most = max(c.available_bytes for c in sized)
        raise exhausted(f"no storage node has {need} bytes free (most free: {most} bytes)")
    rank = {zone: i for i, zone in enumerate(req.preferred)}
    fits.sort(key=lambda c: (rank.get(c.zone, len(rank)), -c.available_bytes, c.name))
    return [c.name for c in fits]


def largest_volume(c: Candidate, thick: bool) -> int:
    """The biggest volume this node would create now (GetCapacity's maximum_volume_size, which
    kube-scheduler prefers over the capacity). Thick needs the space; thin only needs the node
    to take volumes at all, so a thin branch of a volume bigger than the free space schedules."""
    if thick:
        return min(c.available_bytes, c.max_volume_bytes) if c.max_volume_bytes else c.available_bytes
    if c.available_bytes <= 0:
        return 0
    return c.max_volume_bytes or c.available_bytes

