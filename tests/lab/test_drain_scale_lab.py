"""Draining a storage node that holds many idle volumes (csi/drain.py on two storage guests):
the time per volume and in all, with every volume on the other node at the end.

N thin volumes (64 MiB, or ZVOLT_DRAIN_SIZE_MIB), never attached and never written (a fleet's idle databases cost their
metadata, not their data), are created on storage-0; `drain` (what `kubectl zvolt
drain-storage` runs) cordons it and moves them all to storage-1, two at a time. N comes from
ZVOLT_DRAIN_VOLUMES (default 20), how many at once from ZVOLT_DRAIN_PARALLEL (default 2).

Run: ZVOLT_LAB_NAME=live ZVOLT_DRAIN_VOLUMES=1000 ZVOLT_DRAIN_SIZE_MIB=32 pytest tests/lab/test_drain_scale_lab.py -s
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import time

import pytest

from csi import drain
from csi.agents import AgentPool, parse_static
from lab import cluster
from tests.lab.test_move_cluster_lab import members, spec  # noqa: F401 - the fixture
from tests.lab.test_multinode_lab import storage_cluster  # noqa: F401 - the fixture, booted here too
from zvolt.pb import agent_pb2 as pb

pytestmark = [pytest.mark.lab, pytest.mark.slow]

N = int(os.environ.get("ZVOLT_DRAIN_VOLUMES", "20"))
# Never written, a thin volume costs its metadata whatever its size; 1,000 of 64 MiB would pass the
# lab pool's commitment limit (3x 15.5 GiB), so a big run takes smaller ones.
SIZE = int(os.environ.get("ZVOLT_DRAIN_SIZE_MIB", "64")) << 20
T = 300.0
SOURCE, TARGET = "storage-0", "storage-1"
EVERY = 25.0  # seconds between progress lines while creating
PARALLEL = int(os.environ.get("ZVOLT_DRAIN_PARALLEL", "2"))
STEP = re.compile(r"^  \S+: (\S+): (.+) \((\d+\.\d)s")


def step_medians(lines: list[str]) -> str:
    """Where a move's time goes: the median of each step's progress-line time, per node role."""
    times: dict[str, list[float]] = {}
    for line in lines:
        if m := STEP.match(line):
            times.setdefault(m.group(2), []).append(float(m.group(3)))
    return "; ".join(f"{what} {statistics.median(t):.1f}s" for what, t in times.items())


def listed(agent: object) -> set[str]:
    ids: set[str] = set()
    token = ""
    while True:
        got = agent.call("ListVolumes", pb.ListVolumesRequest(max_entries=500, starting_token=token),  # type: ignore[attr-defined]
                         timeout=T)
        ids |= {v.id for v in got.volumes}
        token = got.next_token
        if not token:
            return ids


def test_drain_of_many_idle_volumes_moves_them_all(members: list[cluster.Member]) -> None:  # noqa: F811
    pool = AgentPool(lambda: parse_static(spec(members)), tls=None, timeout=T)
    source, target = pool.get(SOURCE), pool.get(TARGET)
    stamp = str(int(time.time()))
    made: list[str] = []
    try:
        t0 = said = time.monotonic()
        for i in range(N):
            made.append(source.call("CreateVolume", pb.CreateVolumeRequest(
                name=f"pvc-idle-{i}-{stamp}", size_bytes=SIZE), timeout=T).volume.id)
            if time.monotonic() - said >= EVERY:
                said = time.monotonic()
                print(f"created {i + 1}/{N} idle volumes on {SOURCE} ({said - t0:.0f} s)", flush=True)
        created = time.monotonic() - t0
        print(f"\ncreated {N} idle volumes on {SOURCE} in {created:.1f} s", flush=True)

        lines: list[str] = []
        moved = [0]
        planned: list[float] = []
        shown = [time.monotonic()]

        def say(line: str) -> None:
            lines.append(line)
            if ": moving (" in line and not planned:
                planned.append(time.monotonic())
            if ": moved to " in line:
                moved[0] += 1
            if not line.startswith((f"{SOURCE}/", "  ")):
                print(line, flush=True)  # the plan's head, the summary: not a line per volume and step
            elif time.monotonic() - shown[0] >= EVERY:
                shown[0] = time.monotonic()
                print(f"drain: {moved[0]}/{N} moved ({shown[0] - t0:.0f} s)", flush=True)

        t0 = time.monotonic()
        code = drain.drain(pool, SOURCE, parallel=PARALLEL, say=say)
        took = time.monotonic() - t0
        print(f"drain of {N} idle volumes: exit {code}, {took:.1f} s in all, {took / N:.2f} s per volume, "
              f"{moved[0]} moved, {PARALLEL} at once", flush=True)
        print(f"planned in {planned[0] - t0:.1f} s; each step's median: {step_medians(lines)}", flush=True)
        assert code == 0, "\n".join(lines[-20:])
        assert set(made) <= listed(target), "every volume is on the target"
        assert not set(made) & listed(source), "none is left on the source"
    finally:
        with contextlib.suppress(Exception):
            source.call("SetCordon", pb.SetCordonRequest(cordoned=False), timeout=T)
        for agent in (target, source):
            for vid in set(made) & listed(agent):
                with contextlib.suppress(Exception):
                    agent.call("DeleteVolume", pb.DeleteVolumeRequest(volume_id=vid), timeout=T)
        pool.close()
