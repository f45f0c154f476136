"""Space per volume, to bill and alert on: the index plus one scoped `zfs get` of the volumes asked for.

What each figure means (checked on ZFS 2.3.2 in the lab, tests/lab/test_usage_lab.py):
- logical: volsize, what the user was given (from the index).
- referenced: ZFS `referenced`, the data the volume reads, blocks shared with its origin included.
- unique: ZFS `used` minus `usedbyrefreservation`: its own blocks plus those only its snapshots
  hold. A branch shares its origin's blocks, which stay with the origin's snapshot, so a fresh
  branch costs ~0 here and its origin keeps counting what it wrote.
- written: ZFS `written`, since the volume's latest snapshot (for a clone without one: since
  its origin).
- compress_ratio: ZFS `compressratio` of what it references.

Per-namespace totals for Prometheus come from a rolling sweep (`tick()`, called by the agent's
main loop, off the request path): at most one page of volumes per tick, so no single read grows
with the pool, and paced so that a full cycle takes at least MIN_CYCLE. Unpaced, a node with up
to a page of volumes read all of them every tick: in the lab (TCG) that `zfs get` of 600 idle
volumes took ~25 s of a vCPU every 15 s, and a drain of the node ran at half its speed. A volume counts under the
namespace of its `pvc-namespace` label (external-provisioner --extra-create-metadata, which the
chart sets); a volume created without it counts under namespace "".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.index import VolumeRec
from agent.metrics import Metrics
from agent.volumes import Volumes, page_size
from agent.zfs import get_props_many
from agent.zpool import PoolReader
from zvolt import names
from zvolt.errors import invalid

# Label keys csi/params.py gives the agent (stored as zvolt:label:<key> on the zvol).
NAMESPACE_PROP = "zvolt:label:pvc-namespace"
PVC_PROP = "zvolt:label:pvc-name"
PROPS = ("referenced", "used", "usedbyrefreservation", "written", "compressratio", NAMESPACE_PROP, PVC_PROP)
SWEEP_PAGE = 1000
MIN_CYCLE = 300.0  # seconds: billing and alerts need the sums minutes fresh, not seconds


@dataclass(frozen=True)
class VolumeUsage:
    volume_id: str
    name: str
    namespace: str
    pvc: str
    logical: int
    referenced: int
    unique: int
    written: int
    compress_ratio: float


@dataclass(frozen=True)
class PoolUsage:
    total: int
    used: int
    available: int
    fragmentation: int | None


@dataclass
class _Totals:
    volumes: int = 0
    logical: int = 0
    referenced: int = 0
    unique: int = 0

    def add(self, u: VolumeUsage, sign: int) -> None:
        self.volumes += sign
        self.logical += sign * u.logical
        self.referenced += sign * u.referenced
        self.unique += sign * u.unique


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def _label(value: str | None) -> str:
    return "" if value in (None, "-") else str(value)


def _ratio(value: str | None) -> float:
    try:
        return float((value or "").rstrip("x"))
    except ValueError:
        return 1.0


def volume_usage(vol: VolumeRec, props: dict[str, str]) -> VolumeUsage:
    return VolumeUsage(
        volume_id=vol.id, name=vol.name, namespace=_label(props.get(NAMESPACE_PROP)),
        pvc=_label(props.get(PVC_PROP)), logical=vol.size, referenced=_int(props.get("referenced")),
        unique=max(_int(props.get("used")) - _int(props.get("usedbyrefreservation")), 0),
        written=_int(props.get("written")), compress_ratio=_ratio(props.get("compressratio")),
    )


class Usage:
    def __init__(self, volumes: Volumes, zpool: PoolReader | None = None, metrics: Metrics | None = None,
                 per_volume: bool = False, sweep_page: int = SWEEP_PAGE, min_cycle: float = MIN_CYCLE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.v = volumes
        self.zpool = zpool
        self.metrics = metrics
        self.per_volume = per_volume
        self.sweep_page = sweep_page
        self.min_cycle = min_cycle
        self._clock = clock
        self._next_step = float("-inf")
        self._mu = threading.Lock()
        self._fragmentation: int | None = None
        self._latest: dict[str, VolumeUsage] = {}  # volume id -> last swept usage
        self._totals: dict[str, _Totals] = {}  # namespace -> sums of _latest
        self._cursor = ""
        self._cycle: set[str] = set()
        self._cycle_start = time.monotonic()
        self._cycle_seconds = 0.0
        if metrics is not None:
            metrics.registry.register(_Collector(self))

    # -- the RPC ---------------------------------------------------------------------------

    def read(self, vols: Sequence[VolumeRec]) -> list[VolumeUsage]:
        """Usage of these volumes from one `zfs get`; a volume gone from ZFS meanwhile is left out."""
        props = get_props_many(self.v.zfs, [v.dataset for v in vols], PROPS)
        return [volume_usage(v, props[v.dataset]) for v in vols if v.dataset in props]

    def of(self, ids: Sequence[str]) -> tuple[list[VolumeUsage], list[str]]:
        """(usage of the volumes this node holds, the ids it does not)."""
        wanted = list(dict.fromkeys(names.check_id(i) for i in ids))
        most = page_size(len(wanted))
        if len(wanted) > most:
            raise invalid(f"{len(wanted)} volume ids in one call: ask for at most {most}, or page through all")
        recs = [rec for rec in (self.v.index.volume(i) for i in wanted) if rec is not None]
        rows = self.read(recs)
        found = {u.volume_id for u in rows}
        return rows, [i for i in wanted if i not in found]

    def page(self, max_entries: int, token: str) -> tuple[list[VolumeUsage], str]:
        recs, next_token = self.v.list_volumes(max_entries, token)
        return self.read(recs), next_token

    def pool(self) -> PoolUsage:
        cap = self.v.capacity()
        with self._mu:
            frag = self._fragmentation
        return PoolUsage(total=cap.total, used=cap.used, available=cap.available, fragmentation=frag)

    # -- periodic, off the request path ----------------------------------------------------

    def tick(self) -> None:
        """One step of the sweep, the pool's fragmentation, the abnormal-volume count."""
        self.sweep_step()
        if self.zpool is not None:
            frag = self.zpool.fragmentation(self.v.cfg.pool)
            with self._mu:
                self._fragmentation = frag
            if self.metrics is not None and frag is not None:
                self.metrics.pool_fragmentation.set(frag)
        if self.metrics is not None:
            self.metrics.abnormal.set(abnormal_published(self.v))

    def sweep_step(self) -> None:
        """The next page, once the last one's share of MIN_CYCLE has passed (a page of the whole
        node's N volumes waits min_cycle * page / N)."""
        now = self._clock()
        if now < self._next_step:
            return
        rows, next_token = self.page(self.sweep_page, self._cursor)
        total = max(self.v.index.volume_count(), 1)
        self._next_step = now + self.min_cycle * len(rows) / total
        with self._mu:
            for u in rows:
                old = self._latest.get(u.volume_id)
                if old is not None:
                    self._totals[old.namespace].add(old, -1)
                self._totals.setdefault(u.namespace, _Totals()).add(u, 1)
                self._latest[u.volume_id] = u
                self._cycle.add(u.volume_id)
            self._cursor = next_token
            if next_token:
                return
            # A full cycle: volumes not seen in it were deleted.
            for vid in [vid for vid in self._latest if vid not in self._cycle]:
                old = self._latest.pop(vid)
                self._totals[old.namespace].add(old, -1)
            self._totals = {ns: t for ns, t in self._totals.items() if t.volumes > 0}
            self._cycle = set()
            now = time.monotonic()
            self._cycle_seconds, self._cycle_start = now - self._cycle_start, now

    def totals(self) -> dict[str, _Totals]:
        with self._mu:
            return {ns: _Totals(t.volumes, t.logical, t.referenced, t.unique) for ns, t in self._totals.items()}

    def latest(self) -> list[VolumeUsage]:
        with self._mu:
            return list(self._latest.values())

    def cycle_seconds(self) -> float:
        with self._mu:
            return self._cycle_seconds


def abnormal_published(volumes: Volumes) -> int:
    """Published volumes whose export does not match what was published (GetVolume's condition).

    O(published volumes), each a few configfs reads: only active volumes have exports."""
    count = 0
    for vol in volumes.index.published():
        healthy, _ = volumes.exports.condition(vol.id, vol.dataset, vol.hosts)
        if not healthy or vol.id in volumes.unrestored:
            count += 1
    return count


class _Collector(Collector):
    """Per-namespace sums (and per-volume series only when asked: 100,000 volumes would be
    100,000 series per metric)."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = self.usage.totals()
        families = (
            ("volumes", "zvolt_agent_namespace_volumes", "Volumes per PVC namespace"),
            ("logical", "zvolt_agent_namespace_logical_bytes", "Sum of volume sizes per PVC namespace"),
            ("referenced", "zvolt_agent_namespace_referenced_bytes",
             "Sum of data the volumes read (shared blocks included)"),
            ("unique", "zvolt_agent_namespace_unique_bytes",
             "Sum of bytes only the namespace's volumes hold (billable)"),
        )
        for attr, name, doc in families:
            gauge = GaugeMetricFamily(name, doc, labels=["namespace"])
            for ns, t in sorted(totals.items()):
                gauge.add_metric([ns], float(getattr(t, attr)))
            yield gauge
        yield GaugeMetricFamily("zvolt_agent_usage_sweep_seconds",
                                "Seconds the last full usage sweep took (age bound of the namespace sums)",
                                value=self.usage.cycle_seconds())
        if not self.usage.per_volume:
            return
        rows = self.usage.latest()
        for field, doc in (("logical", "Volume size"), ("referenced", "Data the volume reads"),
                           ("unique", "Bytes only this volume holds")):
            gauge = GaugeMetricFamily(f"zvolt_agent_volume_{field}_bytes", doc,
                                      labels=["volume", "namespace", "pvc"])
            for u in rows:
                gauge.add_metric([u.volume_id, u.namespace, u.pvc], float(getattr(u, field)))
            yield gauge
