"""An agent client that calls a FakeNode's servicer in process, as csi/agents.AgentClient does
over gRPC: what the move tests hand csi/moves.py and the locator."""

from __future__ import annotations

from typing import Any

from agent.fakes import FakeNode
from agent.metrics import Metrics
from agent.server import AgentServicer


class Direct:
    def __init__(self, node: FakeNode) -> None:
        self.name = node.volumes.cfg.node
        self.servicer = AgentServicer(node.volumes, node.readiness, Metrics(), moves=node.moves)

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        return getattr(self.servicer, method)(request, None)
