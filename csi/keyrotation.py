"""Key rotation of encrypted volumes: `zvolt-csi --mode rotate-key`, what `kubectl zvolt rotate-key` runs.

Like `attachments` and `usage`, only the controller reaches the agents, so the plugin runs this
mode in the controller container. The keys arrive on stdin as one JSON line, never in argv (a
process listing shows argv to every user of the node), and are never printed. Each volume's
storage node runs `zfs change-key` on the volume's encryption root (agent RotateKey): no data is
copied, a volume already on the new key counts as rotated, so a rerun after an interruption
finishes the job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO

from csi import params
from csi.agents import AgentPool
from zvolt.errors import ZvoltError, invalid
from zvolt.names import split_volume_id
from zvolt.pb import agent_pb2


@dataclass(frozen=True)
class Request:
    volumes: list[str]
    old_key: bytes
    new_key: bytes


@dataclass
class Outcome:
    rotated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> str:
        return json.dumps({"rotated": self.rotated, "failed": self.failed}, indent=2)


def read_request(stream: IO[str]) -> Request:
    """The one JSON line {"volumes": [...], "old_key": hex, "new_key": hex}, checked by the same
    rule as a StorageClass secret's key (csi/params.py)."""
    try:
        doc = json.loads(stream.readline())
        volumes = [str(v) for v in doc["volumes"]]
        old, new = doc["old_key"], doc["new_key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid(f"rotate-key reads one JSON line on stdin with volumes, old_key and new_key ({exc})") from None
    old_key = params.encryption_key({params.SECRET_KEY: old}, "old")
    new_key = params.encryption_key({params.SECRET_KEY: new}, "new")
    if old_key == new_key:
        raise invalid("the new key is the key in use: nothing to rotate")
    return Request(volumes, old_key, new_key)


def rotate(pool: AgentPool, req: Request) -> Outcome:
    """One RotateKey per volume, in order; a failure is reported and the others go on."""
    out = Outcome()
    for volume_id in req.volumes:
        try:
            node, local = split_volume_id(volume_id)
            agent = pool.get(node)  # UNAVAILABLE for a storage node not discovered
            agent.call("RotateKey", agent_pb2.RotateKeyRequest(volume_id=local, old_key=req.old_key,
                                                               new_key=req.new_key))
        except ZvoltError as err:
            out.failed[volume_id] = err.message
            continue
        out.rotated.append(volume_id)
    return out
