"""The controller reaches an agent again within seconds of its restart, however long it was away.

gRPC's default reconnect backoff grows to 120 s: a channel that probed an agent during a long
restart went on failing calls with the stale "connect failed: No such file or directory" after the
agent was back (seen in CI: the bench's ListVolumes right after an agent restart).
"""

from __future__ import annotations

import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from csi.agents import AgentEndpoint, AgentPool
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2, agent_pb2_grpc

AWAY_S = 20.0  # long enough for gRPC's default backoff to grow past 4 s
BACK_WITHIN_S = 3.0


class _Agent(agent_pb2_grpc.AgentServicer):  # type: ignore[misc]
    def GetInfo(self, request: Any, context: Any) -> Any:
        return agent_pb2.GetInfoResponse(ready=True)


def _serve(sock: Path) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    agent_pb2_grpc.add_AgentServicer_to_server(_Agent(), server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    return server


def test_a_restarted_agent_answers_within_seconds_after_a_long_absence(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    pool = AgentPool(lambda: [AgentEndpoint("storage-0", f"unix://{sock}")], tls=None, timeout=2)
    agent = pool.get("storage-0")
    server = _serve(sock)
    try:
        assert agent.call("GetInfo", agent_pb2.GetInfoRequest()).ready
        server.stop(0)
        away_until = time.monotonic() + AWAY_S
        failures = 0
        while time.monotonic() < away_until:  # the controller's callers keep trying meanwhile
            try:
                agent.call("GetInfo", agent_pb2.GetInfoRequest())
            except ZvoltError:
                failures += 1
            time.sleep(0.5)
        assert failures > 0
        server = _serve(sock)
        back = time.monotonic()
        while True:
            try:
                agent.call("GetInfo", agent_pb2.GetInfoRequest())
                break
            except ZvoltError as err:
                assert time.monotonic() - back < BACK_WITHIN_S, f"agent back for {BACK_WITHIN_S} s, still: {err}"
            time.sleep(0.1)
    finally:
        server.stop(0)
        pool.close()
