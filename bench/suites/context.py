"""What every suite gets: config, guest access, CSI client, progress, the bench agent and the pool fill."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.config import BenchConfig
from bench.csiclient import Csi
from bench.guest import Guest
from bench.progress import Progress
from bench.results import SuiteResult
from bench.suites.agentctl import BenchAgent

FILL_CHUNK = 250  # volumes per guest call: keeps each call well inside the guest command timeout


@dataclass
class FillState:
    """How many filler volumes (each with `snaps` snapshots) the pool holds, and what filling cost."""

    snaps: int = 1
    volumes: int = 0
    seconds: float = 0.0
    created_volumes: int = 0
    created_snapshots: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)

    @property
    def objects(self) -> int:
        return self.volumes * (1 + self.snaps)

    def volumes_for(self, objects: int) -> int:
        return math.ceil(objects / (1 + self.snaps))


@dataclass
class Context:
    cfg: BenchConfig
    guest: Guest
    progress: Progress
    run_id: str
    csi: Csi | None = None
    fill: FillState = field(default_factory=FillState)
    agent: BenchAgent | None = None
    # Saves a suite's figures so far (the runner rewrites the JSON): a run of hours keeps what it measured.
    checkpoint: Callable[[SuiteResult], None] | None = None

    def __post_init__(self) -> None:
        self.fill.snaps = self.cfg.snaps_per_volume
        if self.agent is None:
            self.agent = BenchAgent(self.guest, self.progress, f"{self.pool}/{self.cfg.fill_parent}",
                                    reconnect=self.csi.wait_agents if self.csi is not None else None)

    @property
    def pool(self) -> str:
        return str(self.guest.lab.pool)

    @property
    def fill_parent(self) -> str:
        """Filler volumes live where the bench agent keeps its volumes, with the agent's properties."""
        return f"{self.pool}/{self.cfg.fill_parent}/v"

    def fill_to(self, objects: int) -> dict[str, Any]:
        """Grow the filler to `objects` volumes+snapshots (never shrinks) and let the agent index them."""
        target = self.fill.volumes_for(objects)
        step: dict[str, Any] = {"objects": objects, "seconds": 0.0, "created_volumes": 0, "created_snapshots": 0}
        if target <= self.fill.volumes:
            return step
        agent_ok = self.agent is not None and self.agent.ensure()
        self.guest.call("ensure-parent", {"dataset": self.fill_parent})
        t0 = time.perf_counter()
        while self.fill.volumes < target:
            count = min(FILL_CHUNK, target - self.fill.volumes)
            with self.progress.ticking(f"fill: {count} volumes from #{self.fill.volumes:,}"):
                out = self.guest.call(
                    "fill",
                    {"parent": self.fill_parent, "start": self.fill.volumes, "count": count, "snaps": self.fill.snaps,
                     "agent_props": True},
                    timeout=max(600.0, count * 5.0),
                )
            self.fill.volumes += count
            step["created_volumes"] += int(out["created_volumes"])
            step["created_snapshots"] += int(out["created_snapshots"])
            self.progress.say(
                f"fill: {self.fill.objects:,}/{target * (1 + self.fill.snaps):,} objects "
                f"({time.perf_counter() - t0:.0f} s)"
            )
        step["seconds"] = time.perf_counter() - t0
        self.fill.seconds += step["seconds"]
        self.fill.created_volumes += step["created_volumes"]
        self.fill.created_snapshots += step["created_snapshots"]
        if agent_ok and self.agent is not None:
            self.progress.say("fill: agent index rebuild from ZFS (the slow, explicit path) and restart")
            step["agent"] = self.agent.reindex()
        self.fill.steps.append(step)
        return step

    def save_partial(self, partial: SuiteResult) -> None:
        if self.checkpoint is not None:
            self.checkpoint(partial)
