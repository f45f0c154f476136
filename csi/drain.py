"""`zvolt-csi --mode drain|rebalance|uncordon`: move volumes off a storage node, or even nodes out.

A drain cordons the node first (the agent keeps the flag in ZFS, agent/cordon.py: no new volume
lands there, whichever controller places it, until an explicit uncordon), then plans: every
volume the node holds, each with its target chosen by csi/placement.py's ranking among the other
nodes of its zone, the moves already planned counted in (plan_drain). What cannot move is listed
with what blocks it: the agent's own refusal (clone families, encryption), or for an attached
volume that live moves are not built yet. The plan prints before anything moves; then at most
`parallel` offline moves run at once (csi/moves.py), one line per step per volume and one every
`heartbeat` seconds per stream still running, and a summary ends it.

Resumable by construction: the plan is made again from what the nodes hold. A volume that moved
left a tombstone, not a volume, so it is not listed again; a move cut half-way is reported by the
source as under way and goes on to the same target (csi/moves.py carries on from what both nodes
hold). Rebalance plans with csi/rebalance.py and executes the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from csi import moves, placement, rebalance
from csi.placement import Candidate, ZoneRequirement
from csi.volmove import Narrated
from zvolt.errors import ZvoltError, invalid, precondition
from zvolt.names import check_node
from zvolt.pb import agent_pb2 as pb

PAGE = 500
HEARTBEAT = 30.0
ATTACHED = "in use: move it live with `kubectl zvolt move <pvc> --to <node>`, or detach it and rerun"

Say = Callable[[str], None]
MAX_PARALLEL = 64


def check_options(parallel: int, rate_mib_per_s: float) -> None:
    """The drain's and rebalance's knobs, for zvolt-csi and the kubectl plugin alike."""
    if not 1 <= parallel <= MAX_PARALLEL:
        raise invalid(f"--parallel must be from 1 to {MAX_PARALLEL}")
    if rate_mib_per_s < 0:
        raise invalid("--rate-limit must be 0 (no limit) or more MiB/s")


class Agent(Protocol):
    name: str
    zone: str

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any: ...


class Pool(Protocol):
    def find(self, name: str) -> Any: ...

    def all(self) -> list[Any]: ...


@dataclass(frozen=True)
class Volume:
    volume_id: str  # CSI id ("<home>/<id>")
    local: str
    node: str  # the node holding it now
    size: int
    thick: bool = False
    moving_to: str = ""  # a move under way: it goes on to this node


@dataclass(frozen=True)
class Blocked:
    volume_id: str
    reason: str


@dataclass(frozen=True)
class Move:
    volume: Volume
    target: str


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...]
    blocked: tuple[Blocked, ...]


@dataclass
class Summary:
    moved: list[moves.MoveResult] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # CSI volume id -> why
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.moved)


# -- planning (pure) --------------------------------------------------------------------------


def plan_drain(volumes: Sequence[Volume], blocked: Sequence[Blocked], zone: str,
               others: Sequence[Candidate]) -> Plan:
    """Moves under way first (to their target), then the rest smallest first, each to the node
    placement ranks best among `others` (the drained node is not among them; cordoned nodes are
    skipped by placement) in the drained node's zone, with the moves planned before counted in."""
    view = {c.name: c for c in others}
    planned: list[Move] = []
    stuck = list(blocked)
    within = ZoneRequirement(frozenset({zone}), ())
    for v in sorted(volumes, key=lambda v: (not v.moving_to, v.size, v.volume_id)):
        if v.moving_to:
            target = v.moving_to
        else:
            try:
                target = placement.choose(list(view.values()), v.size, v.thick, within)[0]
            except ZvoltError as err:
                stuck.append(Blocked(v.volume_id, f"no storage node can take it: {err.message}"))
                continue
        if target in view:
            view[target] = placement.with_volume(view[target], v.size, v.thick)
        planned.append(Move(v, target))
    return Plan(tuple(planned), tuple(stuck))


# -- what the nodes hold ----------------------------------------------------------------------


def inventory(agent: Agent) -> tuple[list[Volume], list[Blocked]]:
    """Every volume the node holds, movable or blocked (with the agent's own reason). Per PAGE
    volumes: one listing and one CheckMoves (the agent reads their properties in one go)."""
    found: list[Volume] = []
    blocked: list[Blocked] = []
    token = ""
    while True:
        page = agent.call("ListVolumes", pb.ListVolumesRequest(max_entries=PAGE, starting_token=token))
        unpublished = [vol.id for vol in page.volumes if not vol.published_hosts]
        checks = agent.call("CheckMoves", pb.CheckMovesRequest(volume_ids=unpublished)).checks if unpublished else []
        verdict = {c.volume_id: c for c in checks}
        for vol in page.volumes:
            vid = f"{vol.home_node or agent.name}/{vol.id}"
            if vol.published_hosts:
                blocked.append(Blocked(vid, f"attached (published to {', '.join(vol.published_hosts)}): {ATTACHED}"))
                continue
            check = verdict[vol.id]
            if check.missing:
                continue  # deleted (or moved) since the page was read
            if check.blocked:
                blocked.append(Blocked(vid, check.blocked))
                continue
            found.append(Volume(vid, vol.id, agent.name, vol.size_bytes, vol.thick, check.moving_to))
        token = page.next_token
        if not token:
            return found, blocked


def capacities(pool: Pool) -> dict[str, Candidate]:
    """Every node's GetCapacity as placement sees it; a node that does not answer is left out."""
    out = {}
    for agent in pool.all():
        try:
            out[agent.name] = placement.from_capacity(agent.name, agent.zone,
                                                      agent.call("GetCapacity", pb.GetCapacityRequest()))
        except ZvoltError:
            continue
    return out


# -- executing --------------------------------------------------------------------------------


class _Progress:
    """Progress lines from several moves at once, and a line per stream still running every
    `every` seconds (a stream is one blocking call on the target, which says nothing until done)."""

    def __init__(self, say: Say, every: float) -> None:
        self._say = say
        self._every = every
        self._mu = threading.Lock()
        self._streams: dict[str, tuple[str, float]] = {}  # volume id -> (target, started)
        self._done = threading.Event()

    def say(self, line: str) -> None:
        with self._mu:
            self._say(line)

    def streaming(self, vid: str, target: str | None) -> None:
        with self._mu:
            if target is None:
                self._streams.pop(vid, None)
            else:
                self._streams[vid] = (target, time.monotonic())

    def run(self) -> None:
        while not self._done.wait(self._every):
            now = time.monotonic()
            with self._mu:
                for vid, (target, started) in sorted(self._streams.items()):
                    self._say(f"  {vid}: still streaming to {target} ({now - started:.0f}s so far)")

    def stop(self) -> None:
        self._done.set()


def execute(pool: Pool, planned: Sequence[Move], parallel: int, say: Say, rate: int = 0,
            heartbeat: float = HEARTBEAT) -> Summary:
    """At most `parallel` moves at once; a failed move is reported and the others go on."""
    progress = _Progress(say, heartbeat)
    summary = Summary()
    start = time.monotonic()

    def one(m: Move) -> None:
        vid = m.volume.volume_id
        try:
            source, target = _agent(pool, m.volume.node), _agent(pool, m.target)
            progress.say(f"{vid}: moving ({m.volume.size} bytes) from {source.name} to {target.name}")
            narrate = partial(Narrated, say=progress.say, prefix=f"{vid}: ",
                              streaming=partial(progress.streaming, vid))
            result = moves.move(narrate(source), narrate(target), m.volume.local, rate=rate)
        except ZvoltError as err:
            summary.failed[vid] = err.message
            progress.say(f"{vid}: NOT moved: {err.message}")
            return
        summary.moved.append(result)
        progress.say(f"{vid}: moved to {target.name}: {result.bytes} bytes in {result.streams} stream(s), "
                     f"{result.seconds:.1f}s")

    ticker = threading.Thread(target=progress.run, name="drain-progress", daemon=True)
    ticker.start()
    try:
        with ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="drain") as workers:
            list(workers.map(one, planned))
    finally:
        progress.stop()
    summary.seconds = time.monotonic() - start
    return summary


def _agent(pool: Pool, name: str) -> Agent:
    agent = pool.find(name)
    if agent is None:
        raise precondition(f"storage node {name} has no known agent: bring it back, or abort the move to it")
    return agent  # type: ignore[no-any-return]


# -- the modes --------------------------------------------------------------------------------


def _print_plan(plan: Plan, say: Say) -> None:
    say(f"plan: {len(plan.moves)} to move, {len(plan.blocked)} blocked")
    for m in plan.moves:
        again = " (a move under way goes on)" if m.volume.moving_to else ""
        say(f"  move {m.volume.volume_id} ({m.volume.size} bytes) {m.volume.node} -> {m.target}{again}")
    for b in plan.blocked:
        say(f"  blocked {b.volume_id}: {b.reason}")


def _print_summary(what: str, summary: Summary, blocked: Sequence[Blocked], say: Say) -> None:
    say(f"{what}: {len(summary.moved)} moved, {summary.bytes} bytes, {summary.seconds:.1f}s; "
        f"{len(blocked)} blocked; {len(summary.failed)} failed")
    for b in blocked:
        say(f"  blocked {b.volume_id}: {b.reason}")
    for vid, why in sorted(summary.failed.items()):
        say(f"  failed {vid}: {why} (rerun to carry on)")


def drain(pool: Pool, node: str, parallel: int = 2, dry_run: bool = False, say: Say = print, rate: int = 0,
          heartbeat: float = HEARTBEAT) -> int:
    """0 when the node holds no volume at the end; 1 when anything is left on it."""
    check_node(node)
    source = _agent(pool, node)
    if dry_run:
        say(f"dry run of a drain of storage node {node}: nothing is cordoned or moved")
    else:
        state = source.call("SetCordon", pb.SetCordonRequest(cordoned=True, reason="drain"))
        say(f"storage node {node} is cordoned ({state.reason}): no new volume lands on it until "
            f"`kubectl zvolt uncordon-storage {node}`")
    volumes, blocked = inventory(source)
    caps = capacities(pool)
    zone = source.zone
    plan = plan_drain(volumes, blocked, zone, [c for name, c in caps.items() if name != node])
    _print_plan(plan, say)
    if dry_run:
        return 0 if not plan.blocked else 1
    summary = execute(pool, plan.moves, parallel, say, rate, heartbeat)
    _print_summary(f"drain of {node}", summary, plan.blocked, say)
    left = source.call("ListVolumes", pb.ListVolumesRequest(max_entries=1)).volumes
    if left:
        say(f"storage node {node} still holds volumes; it stays cordoned. Fix what blocks them and rerun")
        return 1
    say(f"storage node {node} holds no volumes; it stays cordoned")
    return 0


def rebalance_run(pool: Pool, parallel: int = 2, dry_run: bool = False, say: Say = print, rate: int = 0,
                  heartbeat: float = HEARTBEAT) -> int:
    """0 when every planned move went through."""
    caps = capacities(pool)
    movable: list[Volume] = []
    for name, cand in sorted(caps.items()):
        if cand.cordoned:
            continue
        volumes, _ = inventory(_agent(pool, name))
        movable += [v for v in volumes if not v.moving_to]
    by_id = {v.volume_id: v for v in movable}
    steps, after = rebalance.plan(list(caps.values()),
                                  [rebalance.Movable(v.volume_id, v.node, v.size, v.thick) for v in movable])
    say(f"rebalance plan: {len(steps)} move(s)")
    for name in sorted(after):
        say(f"  {name}: committed {rebalance.committed_fraction(caps[name]):.1%} -> "
            f"{rebalance.committed_fraction(after[name]):.1%}")
    planned = [Move(by_id[s.volume.volume_id], s.target) for s in steps]
    for m in planned:
        say(f"  move {m.volume.volume_id} ({m.volume.size} bytes) {m.volume.node} -> {m.target}")
    if dry_run:
        return 0
    summary = execute(pool, planned, parallel, say, rate, heartbeat)
    _print_summary("rebalance", summary, [], say)
    return 1 if summary.failed else 0


def uncordon(pool: Pool, node: str, say: Say = print) -> int:
    check_node(node)
    _agent(pool, node).call("SetCordon", pb.SetCordonRequest(cordoned=False))
    say(f"storage node {node} takes new volumes again")
    return 0
