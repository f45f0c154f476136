"""csi/locator.py: a volume is found where it is now, whatever node its id names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi.agents import fan_out
from csi.locator import MAX_HOPS, Locator
from zvolt.errors import Moved, ZvoltError, moved, not_found, unavailable
from zvolt.pb import agent_pb2


class FakeAgent:
    """Holds some volumes, keeps tombstones for others; records every call."""

    def __init__(self, name: str, held: dict[str, str] | None = None, tombstones: dict[str, str] | None = None,
                 down: bool = False) -> None:
        self.name = name
        self.held = held or {}  # vid -> home node
        self.tombstones = tombstones or {}  # vid -> node it moved to
        self.down = down
        self.calls: list[tuple[str, str]] = []

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.calls.append((method, request.volume_id))
        if self.down:
            raise unavailable(f"storage node {self.name}: unreachable")
        vid = request.volume_id
        if vid in self.tombstones:
            raise moved(vid, self.tombstones[vid])
        if vid not in self.held:
            raise not_found(f"volume {vid} does not exist")
        if method == "GetVolume":
            return agent_pb2.GetVolumeResponse(volume=agent_pb2.Volume(id=vid), placement=agent_pb2.PLACEMENT_HELD,
                                               home_node=self.held[vid])
        return f"{method} on {self.name}"


class FakePool:
    def __init__(self, *agents: FakeAgent) -> None:
        self.agents = {a.name: a for a in agents}

    def find(self, name: str) -> FakeAgent | None:
        return self.agents.get(name)

    def all(self) -> list[FakeAgent]:
        return [self.agents[n] for n in sorted(self.agents)]


def _locator(*agents: FakeAgent) -> Locator:
    fan: Callable[[list[Any], Callable[[Any], Any]], list[Any]] = fan_out  # type: ignore[assignment]
    return Locator(FakePool(*agents), fan)


def _req(vid: str) -> agent_pb2.DeleteVolumeRequest:
    return agent_pb2.DeleteVolumeRequest(volume_id=vid)


def test_a_volume_that_never_moved_costs_one_call_on_its_home() -> None:
    a, b = FakeAgent("a", held={"v1": "a"}), FakeAgent("b")
    loc = _locator(a, b)
    agent, got = loc.call("a", "v1", "DeleteVolume", _req("v1"))
    assert agent is a and got == "DeleteVolume on a"
    assert a.calls == [("DeleteVolume", "v1")] and b.calls == []


def test_a_tombstone_is_followed_and_remembered() -> None:
    a = FakeAgent("a", tombstones={"v1": "b"})
    b = FakeAgent("b", held={"v1": "a"})
    loc = _locator(a, b)
    agent, got = loc.call("a", "v1", "DeleteVolume", _req("v1"))
    assert agent is b and got == "DeleteVolume on b"
    agent, _ = loc.call("a", "v1", "DeleteVolume", _req("v1"))
    assert agent is b
    assert a.calls == [("DeleteVolume", "v1")], "the second call must go straight to the holder"


def test_a_chain_of_moves_is_followed() -> None:
    a, b = FakeAgent("a", tombstones={"v1": "b"}), FakeAgent("b", tombstones={"v1": "c"})
    c = FakeAgent("c", held={"v1": "a"})
    agent, _ = _locator(a, b, c).call("a", "v1", "DeleteVolume", _req("v1"))
    assert agent is c


def test_a_loop_of_tombstones_ends_with_unavailable() -> None:
    a, b = FakeAgent("a", tombstones={"v1": "b"}), FakeAgent("b", tombstones={"v1": "a"})
    with pytest.raises(ZvoltError) as exc:
        _locator(a, b).call("a", "v1", "DeleteVolume", _req("v1"))
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE and str(MAX_HOPS) in exc.value.message


def test_a_removed_home_is_searched_once_and_only_a_held_copy_counts() -> None:
    # "a" was removed for good; "b" has a volume of the same id homed elsewhere, "c" holds it.
    b = FakeAgent("b", held={"v1": "x"})
    c = FakeAgent("c", held={"v1": "a"})
    d = FakeAgent("d")
    loc = _locator(b, c, d)
    agent, _ = loc.call("a", "v1", "DeleteVolume", _req("v1"))
    assert agent is c
    loc.call("a", "v1", "DeleteVolume", _req("v1"))
    assert [m for m, _ in d.calls] == ["GetVolume"], "searched once, then remembered"


def test_nobody_holding_a_volume_of_a_removed_home_is_unavailable_naming_the_silent() -> None:
    b, c = FakeAgent("b"), FakeAgent("c", down=True)
    with pytest.raises(ZvoltError) as exc:
        _locator(b, c).call("a", "v1", "DeleteVolume", _req("v1"))
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE
    assert "storage node a has no known agent" in exc.value.message and "c did not answer" in exc.value.message


def test_a_plain_not_found_is_not_a_move() -> None:
    a = FakeAgent("a")
    with pytest.raises(ZvoltError) as exc:
        _locator(a).call("a", "v1", "DeleteVolume", _req("v1"))
    assert exc.value.code == grpc.StatusCode.NOT_FOUND and not isinstance(exc.value, Moved)


def test_moved_crosses_grpc_as_not_found_with_the_new_node(tmp_path: Any) -> None:
    """The agent's RpcInterceptor puts Moved.to in trailing metadata; AgentClient makes it Moved
    again, and a caller that knows nothing of moves still sees NOT_FOUND."""
    from concurrent import futures

    from csi.agents import AgentClient, AgentEndpoint
    from zvolt.pb import agent_pb2_grpc
    from zvolt.rpc import RpcInterceptor

    class Tombstone(agent_pb2_grpc.AgentServicer):  # type: ignore[misc]
        def DeleteVolume(self, request: Any, context: Any) -> Any:
            raise moved(request.volume_id, "storage-7")

        def GetVolume(self, request: Any, context: Any) -> Any:
            raise not_found(f"volume {request.volume_id} does not exist")

    target = f"unix://{tmp_path}/agent.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[RpcInterceptor("agent")])
    agent_pb2_grpc.add_AgentServicer_to_server(Tombstone(), server)
    server.add_insecure_port(target)
    server.start()
    try:
        with grpc.insecure_channel(target) as channel:
            client = AgentClient(AgentEndpoint("storage-1", target), channel, timeout=10)
            with pytest.raises(Moved) as exc:
                client.call("DeleteVolume", _req("v1"))
            assert exc.value.to == "storage-7" and exc.value.code == grpc.StatusCode.NOT_FOUND
            assert "v1 moved to storage node storage-7" in exc.value.message
            with pytest.raises(ZvoltError) as plain:
                client.call("GetVolume", agent_pb2.GetVolumeRequest(volume_id="v1"))
            assert not isinstance(plain.value, Moved)
    finally:
        server.stop(None)


class TombstoneAnswers(FakeAgent):
    """A real agent's GetVolume on a tombstone: placement MOVED, not an error (csi/moves.py reads it)."""

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        if method == "GetVolume" and request.volume_id in self.tombstones:
            self.calls.append((method, request.volume_id))
            return agent_pb2.GetVolumeResponse(volume=agent_pb2.Volume(id=request.volume_id),
                                               placement=agent_pb2.PLACEMENT_MOVED,
                                               moved_to=self.tombstones[request.volume_id])
        return super().call(method, request, timeout)


def test_get_volume_follows_a_moved_placement_to_the_holder() -> None:
    a = TombstoneAnswers("a", tombstones={"v1": "b"})
    b = FakeAgent("b", held={"v1": "a"})
    agent, vol = _locator(a, b).get_volume("a", "v1")
    assert agent is b and vol.id == "v1"
    assert [m for m, _ in b.calls] == ["GetVolume"]
