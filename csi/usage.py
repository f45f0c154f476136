"""`zvolt-csi --mode usage`: space per volume on every storage node (what `kubectl zvolt usage` shows).

Runs in the controller container with its settings (agent discovery, mTLS): it pages through
GetUsage on all agents at once. Each page is one scoped `zfs get` on the agent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from csi.agents import AgentClient, AgentPool, fan_out
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2

PAGE = 1000


@dataclass(frozen=True)
class UsageRow:
    namespace: str
    pvc: str
    pv: str  # the CSI name the external-provisioner gave: the PV's name
    volume_id: str  # CSI volume id, "<node>/<id>"
    node: str
    logical_bytes: int
    referenced_bytes: int
    unique_bytes: int
    written_bytes: int
    compress_ratio: float


@dataclass(frozen=True)
class PoolRow:
    node: str
    total_bytes: int
    used_bytes: int
    available_bytes: int
    fragmentation_percent: int  # -1: not known yet


def _one(agent: AgentClient) -> tuple[list[UsageRow], PoolRow]:
    rows: list[UsageRow] = []
    token = ""
    while True:
        resp = agent.call("GetUsage", agent_pb2.GetUsageRequest(max_entries=PAGE, starting_token=token))
        rows += [UsageRow(u.pvc_namespace, u.pvc_name, u.name, f"{agent.name}/{u.volume_id}", agent.name,
                          u.logical_bytes, u.referenced_bytes, u.unique_bytes, u.written_bytes,
                          round(u.compress_ratio, 2)) for u in resp.volumes]
        token = resp.next_token
        if not token:
            p = resp.pool
            return rows, PoolRow(agent.name, p.total_bytes, p.used_bytes, p.available_bytes, p.fragmentation_percent)


def collect(pool: AgentPool) -> tuple[list[UsageRow], list[PoolRow], dict[str, str]]:
    """(every volume's usage, every pool's totals, agents that did not answer: name -> why)."""
    agents = pool.all()
    rows: list[UsageRow] = []
    pools: list[PoolRow] = []
    failed: dict[str, str] = {}
    for agent, result in zip(agents, fan_out(agents, _one), strict=True):
        if isinstance(result, ZvoltError):
            failed[agent.name] = result.message
        else:
            rows += result[0]
            pools.append(result[1])
    rows.sort(key=lambda r: (r.namespace, r.pvc, r.volume_id))
    return rows, sorted(pools, key=lambda p: p.node), failed


def render(rows: list[UsageRow], pools: list[PoolRow], failed: dict[str, str], output: str) -> str:
    if output == "json":
        return json.dumps({"usage": [asdict(r) for r in rows], "pools": [asdict(p) for p in pools],
                           "unreachable": failed}, indent=2)
    lines = [f"{'NAMESPACE':<20} {'PVC':<30} {'VOLUME':<40} {'SIZE':>14} {'UNIQUE':>14} RATIO"]
    lines += [f"{r.namespace or '-':<20} {r.pvc or '-':<30} {r.volume_id:<40} {r.logical_bytes:>14} "
              f"{r.unique_bytes:>14} {r.compress_ratio:.2f}" for r in rows]
    lines += [f"storage node {name} did not answer: {why}" for name, why in failed.items()]
    return "\n".join(lines)
