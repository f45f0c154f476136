"""Periodic fstrim of the filesystems this node has staged, one volume at a time.

Why periodic and not the `discard` mount option: docs in csi/README.md ("Reclaim"). The
schedule is pure (time and randomness are passed in); the Trimmer ties it to the mount table,
the node plugin's per-volume locks, fstrim and metrics.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter

from csi.locks import KeyLocks
from csi.mounter import MountInfo
from zvolt.errors import ZvoltError
from zvolt.names import subsystem_nqn

_log = logging.getLogger("zvolt.csi.trim")

# An NVMe namespace block device as the kernel names it (head node or per-controller path).
_NVME_DEVICE = re.compile(r"^/dev/nvme[0-9]+(c[0-9]+)?n[0-9]+$")
# At most this long between looks at the mount table, so a newly staged volume joins soon.
_MAX_SLEEP = 60.0


@dataclass
class TrimSchedule:
    """When each volume is next due. A volume seen for the first time is due at a random point
    of the first interval, so a node that (re)starts with many volumes spreads their trims over
    the interval instead of trimming them all at once; after a trim the next is due one interval
    later, give or take `jitter` (a fraction of the interval)."""

    interval: float
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    due: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError("trim interval must be positive")
        if not 0 <= self.jitter < 1:
            raise ValueError("trim jitter must be in [0, 1)")

    def next(self, now: float, volumes: Iterable[str]) -> str | None:
        """The most overdue of `volumes` that is due at `now`, or None. Volumes no longer listed
        (unstaged) are forgotten."""
        present = set(volumes)
        for gone in set(self.due) - present:
            del self.due[gone]
        for new in sorted(present - set(self.due)):
            self.due[new] = now + self.rng.uniform(0, self.interval)
        ready = [(at, vol) for vol, at in self.due.items() if at <= now]
        return min(ready)[1] if ready else None

    def done(self, volume: str, now: float) -> None:
        spread = self.interval * self.jitter
        self.due[volume] = now + self.interval + self.rng.uniform(-spread, spread)

    def retry(self, volume: str, now: float) -> None:
        """The volume was busy (stage, unstage, expand in progress): look again soon."""
        self.due[volume] = now + min(self.interval, _MAX_SLEEP)

    def wait(self, now: float) -> float:
        """Seconds until the next volume is due (capped, so new volumes are noticed)."""
        if not self.due:
            return _MAX_SLEEP
        return max(0.0, min(_MAX_SLEEP, min(self.due.values()) - now))


def volume_of_nqn(nqn: str) -> str | None:
    """The CSI volume id whose subsystem NQN this is, or None for a subsystem zvolt did not make.
    Checked by rebuilding the NQN with the one rule that makes it (zvolt/names.py)."""
    parts = nqn.split(":")
    if len(parts) != 3:
        return None
    try:
        if subsystem_nqn(parts[1], parts[2]) != nqn:
            return None
    except ZvoltError:
        return None
    return f"{parts[1]}/{parts[2]}"


@dataclass(frozen=True)
class Staged:
    volume_id: str
    mountpoint: str
    device: str


def staged_filesystems(mounts: Iterable[MountInfo], nqn_of: Callable[[str], str | None]) -> dict[str, Staged]:
    """zvolt volumes mounted read-write without online discard, one mountpoint each (the staging
    mount and its bind mounts share one filesystem: trimming one trims it)."""
    found: dict[str, Staged] = {}
    for m in mounts:
        if not _NVME_DEVICE.fullmatch(m.source) or "ro" in m.options or "discard" in m.options:
            continue
        nqn = nqn_of(m.source)
        volume = volume_of_nqn(nqn) if nqn else None
        if volume is not None and volume not in found:
            found[volume] = Staged(volume, m.target, m.source)
    return found


class TrimHost(Protocol):
    """The parts of the mount adapter (csi/mounter.py SystemMounter) the trim needs."""

    def filesystems(self) -> list[MountInfo]: ...
    def mount_info(self, target: str) -> MountInfo | None: ...
    def fstrim(self, mountpoint: str) -> int: ...


class TrimMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.trims = Counter(
            "zvolt_csi_node_trims", "Periodic fstrim runs by result (ok, error)", ["result"], registry=registry
        )
        self.trimmed = Counter(
            "zvolt_csi_node_trimmed_bytes", "Bytes fstrim reported discarded on zvolt volumes", registry=registry
        )


class Trimmer:
    """Runs the schedule: one fstrim at a time, under the volume's lock so it never overlaps a
    stage, unstage or expand of the same volume (a busy volume is retried within a minute; an
    unstage that finds the trim running gets ABORTED and the CO retries it)."""

    def __init__(
        self,
        schedule: TrimSchedule,
        mounter: TrimHost,
        nqn_of: Callable[[str], str | None],
        locks: KeyLocks,
        metrics: TrimMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schedule = schedule
        self.mounter = mounter
        self.nqn_of = nqn_of
        self.locks = locks
        self.metrics = metrics
        self.clock = clock

    def step(self) -> float:
        """Trim the most overdue volume, if any; returns seconds to wait before the next step."""
        staged = staged_filesystems(self.mounter.filesystems(), self.nqn_of)
        now = self.clock()
        volume = self.schedule.next(now, staged)
        if volume is None:
            return self.schedule.wait(now)
        vol = staged[volume]
        fields: dict[str, object] = {"volume_id": volume, "mountpoint": vol.mountpoint}
        start = self.clock()
        try:
            with self.locks.hold(volume):
                mounted = self.mounter.mount_info(vol.mountpoint)
                if mounted is None or mounted.source != vol.device:
                    # Unstaged between the look at the mount table and the lock.
                    self.schedule.done(volume, self.clock())
                    return 0.0
                trimmed = self.mounter.fstrim(vol.mountpoint)
        except ZvoltError as err:
            if err.code == grpc.StatusCode.ABORTED:
                self.schedule.retry(volume, self.clock())
                return 0.0
            self.metrics.trims.labels("error").inc()
            self.schedule.done(volume, self.clock())  # not in a tight loop: again next interval
            _log.warning("fstrim", extra={"fields": {**fields, "error": err.message}})
            return 0.0
        self.schedule.done(volume, self.clock())
        self.metrics.trims.labels("ok").inc()
        self.metrics.trimmed.inc(trimmed)
        fields.update(trimmed_bytes=trimmed, seconds=round(self.clock() - start, 3))
        _log.info("fstrim", extra={"fields": fields})
        return 0.0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                pause = self.step()
            except Exception:  # the trim loop must outlive a bad mount table read
                _log.exception("trim round failed")
                pause = _MAX_SLEEP
            stop.wait(pause)
