"""A live move's PathSwitch (csi/moves.py) for the controller: the hosts' steps go through a relay.

Only the controller reaches the agents, and only a node can connect its own paths; neither can
reach the other. `zvolt-csi --mode move --live-relay` runs in the controller container and, at
each host step, writes one request line (RELAY_PREFIX + JSON, no key in it) on stdout and reads
one answer line on stdin. `kubectl zvolt move` is the relay: it carries each request to the node
plugin of every host (`zvolt-csi --mode live-path`, csi/livepath.py) with that node's stage
secrets, and answers with what they said.

A host is allowed on the target under the NQN and keys its first publish gave it
(csi/publishing.py, as ControllerPublishVolume does), and each node gets the target's path as
the publish_context NodeStageVolume would have read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from csi import dhchap, publishing
from zvolt.errors import invalid, precondition
from zvolt.names import node_host_nqn, split_volume_id
from zvolt.pb import agent_pb2 as pb

RELAY_PREFIX = "zvolt-live-path "
Ask = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class RelayedPaths:
    volume_id: str  # the CSI id
    volume_name: str  # its CSI name (the PV name): the key Secret is named after it
    published: list[str]  # the host NQNs the source agent has it published to
    volume_context: Mapping[str, str]  # the PV's volumeAttributes (the DH-HMAC-CHAP and TLS modes)
    keys: dhchap.VolumeKeys | None
    ask: Ask
    added: dict[str, dict[str, str]] = field(default_factory=dict)  # node NQN -> the path it added

    @property
    def local(self) -> str:
        return split_volume_id(self.volume_id)[1]

    def nodes(self) -> list[str]:
        """The nodes' own host NQNs (an authenticated volume is published under per-volume ones)."""
        return sorted({node_host_nqn(h, self.local) for h in self.published})

    def hosts(self) -> list[pb.PublishVolumeRequest]:
        return [publishing.agent_request(self.keys, self.volume_id, self.volume_name, self.local, node,
                                         self.volume_context) for node in self.nodes()]

    def add(self, paths: list[pb.PublishVolumeResponse]) -> None:
        nodes = {node_host_nqn(p.host_nqn, self.local): publishing.node_context(p, self.volume_context)
                 for p in paths}
        self._ask("add", nodes)
        self.added = nodes

    def drop(self, source: str) -> None:
        # A repeat after the commit never saw the target's paths: each node keeps its live ones.
        self._ask("drop", self.added or {node: {} for node in self.nodes()})

    def _ask(self, op: str, nodes: dict[str, dict[str, str]]) -> None:
        answer = self.ask({"op": op, "volume_id": self.volume_id, "nodes": nodes})
        failed = {str(n): str(why) for n, why in (answer.get("failed") or {}).items()}
        if not answer.get("ok") or failed:
            detail = "; ".join(f"{n}: {why}" for n, why in sorted(failed.items())) or str(answer.get("error", ""))
            raise precondition(f"the hosts could not {op} their path to volume {self.volume_id}: {detail}")


def stdio_ask(out: TextIO, inp: TextIO) -> Ask:
    """Ask the relay on the other end of this process's stdout and stdin: one line each way."""

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        out.write(RELAY_PREFIX + json.dumps(request, sort_keys=True) + "\n")
        out.flush()
        line = inp.readline()
        if not line:
            return {"ok": False, "error": "the relay (kubectl zvolt move) went away"}
        try:
            answer = json.loads(line)
        except ValueError:
            return {"ok": False, "error": f"the relay answered {line.strip()[:200]!r}, not JSON"}
        return answer if isinstance(answer, dict) else {"ok": False, "error": "the relay answered no object"}

    return ask


def read_context(inp: TextIO) -> dict[str, str]:
    """The relay's first line: the volume's context ({"volume_context": {...}}), read from its PV."""
    try:
        doc = json.loads(inp.readline() or "{}")
        ctx = doc.get("volume_context") or {}
    except (ValueError, AttributeError):
        raise invalid("--live-relay: the first line on stdin must be {\"volume_context\": {...}}") from None
    if not isinstance(ctx, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise invalid("--live-relay: volume_context must be a map of strings")
    return dict(ctx)
