"""Which storage node holds a volume now (design.md, "Where a volume lives").

A CSI volume id names the volume's home node for ever. A volume that never moved is on its home:
the first call goes there and costs nothing extra. A volume that moved left a tombstone on the
node it left, and every agent answers a call for a tombstoned id with Moved (NOT_FOUND plus the
node it went to): the locator follows it, remembers the answer, and the next call goes straight
to the holder. When the node an id points at has no agent any more (removed for good), the
locator asks every agent once, in parallel, which of them holds the volume: only a HELD (or
MOVING) answer counts, since that copy is the one true copy after the commit point. That costs
one call per node, once per volume of a removed node, and never on the path of any other volume.

The truth stays in ZFS on the nodes; this cache is only a shortcut, rebuilt by the same rules
after a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from zvolt.errors import Moved, ZvoltError, moved, not_found, unavailable
from zvolt.pb import agent_pb2

# A chain of moves is followed this far (A -> B -> C); a longer one means a loop of tombstones.
MAX_HOPS = 4
# Volumes whose holder is remembered; beyond it the oldest is forgotten (found again by the rules).
CACHE_SIZE = 100_000


class Agent(Protocol):
    name: str

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any: ...


class Pool(Protocol):
    def find(self, name: str) -> Any: ...

    def all(self) -> list[Any]: ...


FanOut = Callable[[list[Any], Callable[[Any], Any]], list[Any]]


class Locator:
    def __init__(self, pool: Pool, fan_out: FanOut, lookup_timeout: float = 10.0) -> None:
        self._pool = pool
        self._fan_out = fan_out
        self._timeout = lookup_timeout
        self._mu = threading.Lock()
        self._where: dict[str, str] = {}  # volume id -> node, only for volumes not on their home

    def holder(self, home: str, vid: str) -> Any:
        """The agent to ask first about volume `vid` whose id names `home`."""
        with self._mu:
            node = self._where.get(vid, home)
        agent = self._pool.find(node)
        if agent is not None:
            return agent
        return self._search(home, vid, node)

    def call(self, home: str, vid: str, method: str, request: Any, timeout: float | None = None) -> tuple[Any, Any]:
        """`method` on the node holding the volume: (agent, response). Follows Moved answers."""
        agent = self.holder(home, vid)
        for _ in range(MAX_HOPS):
            try:
                got = agent.call(method, request, timeout=timeout)
            except Moved as err:
                agent = self.follow(vid, agent.name, err)
                continue
            # GetVolume on a tombstone answers placement MOVED rather than an error (csi/moves.py
            # reads it): the same pointer as Moved.
            if method == "GetVolume" and got.placement == agent_pb2.PLACEMENT_MOVED:
                agent = self.follow(vid, agent.name, moved(vid, got.moved_to))
                continue
            if method == "GetVolume" and got.placement == agent_pb2.PLACEMENT_INCOMING:
                raise not_found(f"volume {home}/{vid} does not exist on storage node {agent.name} yet "
                                f"(a move from {got.move_from} is under way)")
            return agent, got
        raise unavailable(f"volume {home}/{vid}: more than {MAX_HOPS} moves in a row (a loop of tombstones?); "
                          "check `kubectl zvolt` move status")

    def get_volume(self, home: str, vid: str, timeout: float | None = None) -> tuple[Any, Any]:
        """(agent holding it, its agent Volume)."""
        agent, got = self.call(home, vid, "GetVolume", agent_pb2.GetVolumeRequest(volume_id=vid), timeout)
        return agent, got.volume

    def follow(self, vid: str, at: str, err: Moved) -> Any:
        """The agent a Moved answer from node `at` points to, remembered for next time."""
        if err.to == at:
            raise unavailable(f"volume {vid}: storage node {at} says it moved to itself")
        self._remember(vid, err.to)
        agent = self._pool.find(err.to)
        if agent is None:
            raise unavailable(f"volume {vid} moved to storage node {err.to}, which has no known agent; retry later")
        return agent

    def moved(self, vid: str, node: str) -> None:
        """A move of ours committed: calls go to `node` from now on."""
        self._remember(vid, node)

    def _remember(self, vid: str, node: str) -> None:
        with self._mu:
            self._where.pop(vid, None)
            self._where[vid] = node
            while len(self._where) > CACHE_SIZE:
                self._where.pop(next(iter(self._where)))

    def _search(self, home: str, vid: str, node: str) -> Any:
        agents = [a for a in self._pool.all() if a.name != node]
        request = agent_pb2.GetVolumeRequest(volume_id=vid)
        answers = self._fan_out(agents, lambda a: a.call("GetVolume", request, timeout=self._timeout))
        silent = []
        for agent, got in zip(agents, answers, strict=True):
            if isinstance(got, ZvoltError):
                if got.code != grpc.StatusCode.NOT_FOUND:
                    silent.append(agent.name)
                continue
            if got.placement in (agent_pb2.PLACEMENT_HELD, agent_pb2.PLACEMENT_MOVING) and \
                    (got.home_node or agent.name) == home:
                self._remember(vid, agent.name)
                return agent
        unknown = f" ({', '.join(silent)} did not answer)" if silent else ""
        raise unavailable(f"storage node {node} has no known agent and no other storage node holds volume "
                          f"{home}/{vid}{unknown}; retry later")
