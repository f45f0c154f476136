"""A live move's host side: one node's paths to a moving volume (`zvolt-csi --mode live-path`).

Runs in the node plugin's container with its settings, one JSON request on stdin (keys never in
argv), one JSON answer on stdout; `kubectl zvolt move` relays the controller's requests here.

`add`: before the cutover the node connects a second controller to the same subsystem NQN on the
target, from a publish_context as ControllerPublish gives it, under the host NQN and keys
NodeStageVolume would use (csi/node.py connect_spec). With native NVMe multipath
(nvme_core.multipath=Y, Debian's default) the kernel makes it a second path of the same block
device, so the application sees neither a new device nor a remount; the target's namespace
appears on it at the commit, and the I/O the host held while the source was fenced resumes
there. Without native multipath a second controller would be a second device: `add` refuses, and
the move is undone before anything was fenced.

`drop`: after the move, the node lets go of its other paths to the volume, the source's. Given
the target's context it keeps exactly that path; without it (a move repeated after its commit)
it keeps the live ones and drops the rest, and never its last live path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from csi.node import NodeService
from csi.nvme_host import Controller, ours
from zvolt.errors import ZvoltError, invalid, precondition
from zvolt.names import split_volume_id, subsystem_nqn

OPS = ("add", "drop")


def address_of(ctrl: Controller) -> tuple[str, str]:
    """(traddr, trsvcid) of a controller's sysfs `address` ("traddr=...,trsvcid=...,src_addr=...")."""
    parts = dict(p.split("=", 1) for p in ctrl.address.split(",") if "=" in p)
    return parts.get("traddr", ""), parts.get("trsvcid", "")


@dataclass(frozen=True)
class Request:
    op: str
    volume_id: str  # the CSI id
    context: dict[str, str] = field(default_factory=dict)  # the target's path; may be empty for drop
    secrets: dict[str, str] = field(default_factory=dict)  # node-stage secrets, for add

    @classmethod
    def parse(cls, line: str) -> Request:
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise invalid(f"live-path request is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("op") not in OPS or not isinstance(doc.get("volume_id"), str):
            raise invalid(f"live-path request needs op ({' or '.join(OPS)}) and volume_id")
        ctx, secrets = doc.get("publish_context") or {}, doc.get("secrets") or {}
        if not all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in (ctx, secrets)):
            raise invalid("live-path publish_context and secrets are maps of strings")
        split_volume_id(doc["volume_id"])
        return cls(doc["op"], doc["volume_id"], dict(ctx), dict(secrets))


def _nqn(volume_id: str) -> str:
    return subsystem_nqn(*split_volume_id(volume_id))


def add(node: NodeService, volume_id: str, ctx: Mapping[str, str], secrets: Mapping[str, str]) -> bool:
    """Connect the path `ctx` names; False when it was there already (a repeat)."""
    spec = node.connect_spec(volume_id, ctx, secrets)
    if not node.nvme.multipath():
        raise precondition(f"native NVMe multipath is off on this node ({node.identity.hostnqn}; "
                           "nvme_core.multipath=N): a second path would be a second device")
    where = (spec.address, spec.port)
    if any(address_of(c) == where and c.state == "live" for c in ours(node.nvme.controllers(spec.nqn), spec.hostnqn)):
        return False
    node.nvme.connect(spec)
    return True


def drop(node: NodeService, volume_id: str, ctx: Mapping[str, str]) -> list[str]:
    """Disconnect this node's paths to the volume but the one to keep; the controllers dropped."""
    nqn = _nqn(volume_id)
    if ctx and ctx.get("nqn") != nqn:
        raise invalid(f"publish_context nqn {ctx.get('nqn')!r} does not belong to volume {volume_id}")
    mine = ours(node.nvme.controllers(nqn), node.identity.hostnqn)
    if ctx:
        gone = [c for c in mine if address_of(c) != (ctx.get("address", ""), ctx.get("port", ""))]
    elif any(c.state == "live" for c in mine):
        gone = [c for c in mine if c.state != "live"]
    else:
        gone = []  # no live path to keep: dropping any would leave the volume with none
    for ctrl in gone:
        node.nvme.disconnect(ctrl.name)
    return [c.name for c in gone]


def run(node: NodeService, line: str) -> dict[str, Any]:
    """One request line in, the answer out (never raises for a refusal: the answer says it)."""
    start = time.monotonic()
    try:
        req = Request.parse(line)
        if req.op == "add":
            result: dict[str, Any] = {"connected": add(node, req.volume_id, req.context, req.secrets)}
        else:
            result = {"dropped": drop(node, req.volume_id, req.context)}
    except ZvoltError as exc:
        return {"ok": False, "code": exc.code.name, "error": exc.message}
    return {"ok": True, **result, "seconds": round(time.monotonic() - start, 3)}


def serve_one(node: NodeService, stdin: TextIO, stdout: TextIO) -> int:
    answer = run(node, stdin.readline())
    stdout.write(json.dumps(answer) + "\n")
    stdout.flush()
    return 0 if answer["ok"] else 1
