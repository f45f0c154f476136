"""Placement reuses the storage nodes' capacity for a few seconds (csi/capacityview.py): a create
does not ask every agent, the controller's own creates count at once, and a node that was silent
is asked again with a short deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from csi.agents import AgentPool, parse_static
from csi.capacityview import CapacityView
from csi.controller import ControllerService
from csi.fakes import FakeAgent, serve_fake_agent
from csi.placement import Candidate
from zvolt.errors import ZvoltError
from zvolt.pb import csi_pb2

GiB = 1 << 30
NODES = ("storage-0", "storage-1", "storage-2")


class CountingAgent(FakeAgent):
    def GetCapacity(self, request: Any, context: Any) -> Any:
        self.state.calls.append("GetCapacity")
        return super().GetCapacity(request, context)


@pytest.fixture
def cluster(sockdir: str) -> Iterator[tuple[dict[str, CountingAgent], ControllerService]]:
    agents = {n: CountingAgent(n) for n in NODES}
    servers = [serve_fake_agent(a, f"{sockdir}/{n}.sock") for n, a in agents.items()]
    pool = AgentPool(lambda: parse_static(",".join(f"{n}=unix://{sockdir}/{n}.sock" for n in NODES)), tls=None,
                     timeout=5)
    yield agents, ControllerService(pool)
    pool.close()
    for s in servers:
        s.stop(None)


def request(name: str, size: int = GiB, parameters: dict[str, str] | None = None) -> csi_pb2.CreateVolumeRequest:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(), access_mode=csi_pb2.VolumeCapability.
                                   AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    return csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap], parameters=parameters or {},
                                       capacity_range=csi_pb2.CapacityRange(required_bytes=size))


def capacity_calls(agents: dict[str, CountingAgent]) -> int:
    return sum(a.state.calls.count("GetCapacity") for a in agents.values())


def test_creates_within_the_ttl_ask_each_agent_for_capacity_once(
        cluster: tuple[dict[str, CountingAgent], ControllerService]) -> None:
    agents, ctrl = cluster
    ctrl.capacity = CapacityView(ttl=3600)  # however slow this machine is, all five fall within it
    for k in range(5):
        ctrl.CreateVolume(request(f"pvc-{k}"), None)
    assert capacity_calls(agents) == len(NODES)


def test_the_controllers_own_creates_count_against_a_class_limit_at_once(
        cluster: tuple[dict[str, CountingAgent], ControllerService]) -> None:
    agents, ctrl = cluster
    # Each node: 100 GiB, the class admits 1.0x. Six 40 GiB volumes fit (two per node); a
    # seventh does not, although the figures taken before the first create say every node is empty.
    cls = {"commitmentRatio": "1.0"}
    placed = [ctrl.CreateVolume(request(f"big-{k}", 40 * GiB, cls), None).volume.volume_id.split("/")[0]
              for k in range(6)]
    assert sorted(placed) == sorted(NODES * 2)
    with pytest.raises(ZvoltError) as err:
        ctrl.CreateVolume(request("big-6", 40 * GiB, cls), None)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sum(len(a.state.volumes) for a in agents.values()) == 6


def test_a_refusal_on_old_figures_is_checked_again_on_fresh_ones(
        cluster: tuple[dict[str, CountingAgent], ControllerService]) -> None:
    agents, ctrl = cluster
    ctrl.CreateVolume(request("pvc-a"), None)
    for a in agents.values():
        a.total = 1000 * GiB  # the nodes grew: the view is stale, in the safe direction
    ctrl.CreateVolume(request("pvc-b", 500 * GiB, {"thin": "false"}), None)
    assert capacity_calls(agents) == 2 * len(NODES)


def test_an_old_view_is_served_at_once_while_a_refresh_runs_off_the_request_path() -> None:
    now = [0.0]
    seen: list[frozenset[str]] = []
    spawned: list[Callable[[], None]] = []
    answers = [10, 20]

    def fetch(silent_before: frozenset[str]) -> tuple[list[Candidate], frozenset[str]]:
        seen.append(silent_before)
        return [Candidate("a", "z", answers[len(seen) - 1], 0)], frozenset({"b"})

    view = CapacityView(ttl=5.0, clock=lambda: now[0], spawn=spawned.append)
    assert view.get(fetch) == [Candidate("a", "z", 10, 0)]  # the first create waits for the agents
    now[0] = 4.9
    view.get(fetch)
    assert seen == [frozenset()] and not spawned
    now[0] = 10.0
    # Older than the ttl: served as it is, one refresh started in the background (not two).
    assert view.get(fetch) == [Candidate("a", "z", 10, 0)] and view.get(fetch) == [Candidate("a", "z", 10, 0)]
    assert len(spawned) == 1 and len(seen) == 1
    spawned[0]()
    assert seen == [frozenset(), frozenset({"b"})]  # b was silent: the refresh gives it the short deadline
    view.placed("a", 3, thick=True)
    assert view.get(fetch) == [Candidate("a", "z", 17, 0, committed_bytes=3)]


def test_after_a_refusal_the_next_create_waits_for_fresh_figures() -> None:
    calls: list[int] = []

    def fetch(silent_before: frozenset[str]) -> tuple[list[Candidate], frozenset[str]]:
        calls.append(1)
        return [Candidate("a", "z", len(calls), 0)], frozenset()

    view = CapacityView(ttl=60.0, spawn=lambda work: None)
    view.get(fetch)
    view.expire()
    assert view.get(fetch) == [Candidate("a", "z", 2, 0)]


def test_a_failed_background_refresh_keeps_the_old_view() -> None:
    now = [0.0]
    spawned: list[Callable[[], None]] = []
    view = CapacityView(ttl=1.0, clock=lambda: now[0], spawn=spawned.append)
    view.get(lambda _: ([Candidate("a", "z", 1, 0)], frozenset()))
    now[0] = 2.0

    def broken(_: frozenset[str]) -> tuple[list[Candidate], frozenset[str]]:
        raise RuntimeError("discovery failed")

    view.get(broken)
    spawned[0]()
    assert view.get(broken) == [Candidate("a", "z", 1, 0)] and len(spawned) == 2  # and it tries again


def test_the_view_primed_at_start_serves_the_first_create_and_one_sooner_waits_for_that_fetch() -> None:
    spawned: list[Callable[[], None]] = []
    seen: list[int] = []
    gate = threading.Event()

    def fetch(silent: frozenset[str]) -> tuple[list[Candidate], frozenset[str]]:
        seen.append(1)
        gate.wait(5)
        return [Candidate("a", "z", 1, 0)], frozenset()

    view = CapacityView(ttl=60.0, spawn=spawned.append)
    view.prime(fetch)
    assert len(spawned) == 1 and not seen, "primed off the caller's thread"
    first = threading.Thread(target=spawned[0])
    first.start()
    while not seen:
        time.sleep(0.01)
    early: list[list[Candidate]] = []
    create = threading.Thread(target=lambda: early.append(view.get(fetch)))
    create.start()
    time.sleep(0.2)
    assert not early, "a create sooner than the first view waits for it"
    gate.set()
    first.join(5)
    create.join(5)
    assert early == [[Candidate("a", "z", 1, 0)]] and len(seen) == 1, "one fetch, not one each"
    assert view.get(fetch) == [Candidate("a", "z", 1, 0)] and len(seen) == 1


def test_a_failed_prime_leaves_the_first_create_to_fetch() -> None:
    spawned: list[Callable[[], None]] = []
    calls: list[int] = []

    def broken(silent: frozenset[str]) -> tuple[list[Candidate], frozenset[str]]:
        calls.append(1)
        if len(calls) == 1:
            raise ZvoltError(grpc.StatusCode.UNAVAILABLE, "down")
        return [Candidate("a", "z", 1, 0)], frozenset()

    view = CapacityView(ttl=60.0, spawn=spawned.append)
    view.prime(broken)
    spawned[0]()  # logs, does not raise
    assert view.get(broken) == [Candidate("a", "z", 1, 0)] and len(calls) == 2


def test_the_controller_primes_its_view_when_it_starts(
        cluster: tuple[dict[str, CountingAgent], ControllerService]) -> None:
    agents, ctrl = cluster
    ctrl.capacity = CapacityView(ttl=3600)
    ctrl.warm()
    deadline = time.monotonic() + 10
    while capacity_calls(agents) < len(NODES) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    asked = capacity_calls(agents)
    ctrl.CreateVolume(request("pvc-first"), None)
    assert asked == len(NODES) and capacity_calls(agents) == asked, "the first create asked no node"
