"""A live move's host side (csi/moves.py PathSwitch): one node's paths to a moving volume.

Before the cutover the node connects a second controller to the same subsystem NQN on the target
(`add`); with native NVMe multipath (nvme_core.multipath=Y, Debian's default) the kernel makes it
a second path of the same block device, so the application sees neither a new device nor a
remount. The target's namespace appears on that path at the commit, and the I/O the host held
while the source was fenced resumes there. After the move the path to the source is dropped
(`drop`). Without native multipath a second controller would be a second device: `add` refuses,
and the move is undone before anything was fenced.

All NVMe actions go through the node adapter (csi/nvme_host.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import json_format

from csi.nvme_host import ConnectSpec, Controller, NvmeHost, ours
from zvolt import names
from zvolt.errors import ZvoltError, precondition
from zvolt.pb import agent_pb2 as pb


def address_of(ctrl: Controller) -> tuple[str, str]:
    """(traddr, trsvcid) of a controller's sysfs `address` ("traddr=...,trsvcid=...,src_addr=...")."""
    parts = dict(p.split("=", 1) for p in ctrl.address.split(",") if "=" in p)
    return parts.get("traddr", ""), parts.get("trsvcid", "")


@dataclass
class NodePaths:
    host: NvmeHost
    node_nqn: str  # this node's own host NQN
    node_hostid: str
    volume_id: str  # local id (per-volume host NQNs and host ids derive from it)
    publishes: list[pb.PublishVolumeRequest]  # as the volume's ControllerPublish calls carried them
    ctrl_loss_tmo: int = 600
    reconnect_delay: int = 10
    targets: set[tuple[str, str]] = field(default_factory=set)  # (address, port) of the paths added
    nqns: set[str] = field(default_factory=set)  # the subsystems they belong to

    def hosts(self) -> list[pb.PublishVolumeRequest]:
        return list(self.publishes)

    def _mine(self, paths: Sequence[pb.PublishVolumeResponse]) -> list[pb.PublishVolumeResponse]:
        return [p for p in paths if names.opened_by(p.host_nqn, self.node_nqn)]

    def add(self, paths: list[pb.PublishVolumeResponse]) -> None:
        mine = self._mine(paths)
        if not mine:
            return
        if not self.host.multipath():
            raise precondition(f"native NVMe multipath is off on the node of {self.node_nqn} "
                               "(nvme_core.multipath=N): a second path would be a second device")
        publish = next((p for p in self.publishes if p.host_nqn == self.node_nqn), None)
        if publish is None:
            raise precondition(f"no publish of volume {self.volume_id} for {self.node_nqn} was given")
        for path in mine:
            where = (path.address, path.port)
            self.targets.add(where)
            self.nqns.add(names.check_nqn(path.nqn))
            live = [c for c in ours(self.host.controllers(path.nqn), self.node_nqn)
                    if address_of(c) == where and c.state == "live"]
            if live:
                continue  # a repeat: this path is there already
            per_volume = path.host_nqn != self.node_nqn
            self.host.connect(ConnectSpec(
                nqn=path.nqn, transport=path.transport or "tcp", address=path.address, port=path.port,
                hostnqn=path.host_nqn,
                hostid=names.volume_host_id(self.node_nqn, self.volume_id) if per_volume else self.node_hostid,
                ctrl_loss_tmo=self.ctrl_loss_tmo, reconnect_delay=self.reconnect_delay,
                dhchap_secret=publish.dhchap_key, dhchap_ctrl_secret=publish.dhchap_ctrl_key,
                tls_psk=publish.tls_psk,
            ).validate())

    def drop(self, source: str) -> None:
        """Disconnect this node's other controllers of the volume: its paths to the source."""
        for nqn in sorted(self.nqns):
            for ctrl in ours(self.host.controllers(nqn), self.node_nqn):
                if address_of(ctrl) not in self.targets:
                    self.host.disconnect(ctrl.name)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m csi.livepath add|drop` with a JSON request on stdin (keys never in argv): what a
    node runs for a live move's `add` and `drop` (the lab drives the orchestrator from elsewhere)."""
    from csi.nvme_host import SysfsNvmeHost
    from zvolt.keyring import KernelKeyring

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] not in ("add", "drop"):
        print("usage: python -m csi.livepath add|drop < request.json", file=sys.stderr)
        return 2
    req = json.load(sys.stdin)
    node = NodePaths(
        host=SysfsNvmeHost(keyring=KernelKeyring()), node_nqn=req["node_nqn"], node_hostid=req["node_hostid"],
        volume_id=names.check_id(req["volume_id"]),
        publishes=[json_format.ParseDict(p, pb.PublishVolumeRequest()) for p in req.get("publishes", [])],
        ctrl_loss_tmo=int(req.get("ctrl_loss_tmo", 600)), reconnect_delay=int(req.get("reconnect_delay", 10)),
        targets={(a, p) for a, p in req.get("targets", [])}, nqns=set(req.get("nqns", [])),
    )
    start = time.monotonic()
    try:
        if args[0] == "add":
            node.add([json_format.ParseDict(p, pb.PublishVolumeResponse()) for p in req["paths"]])
        else:
            node.drop(req.get("source", ""))
    except ZvoltError as exc:
        print(json.dumps({"ok": False, "code": exc.code.name, "error": exc.message}))
        return 1
    print(json.dumps({"ok": True, "targets": sorted(node.targets), "nqns": sorted(node.nqns),
                      "seconds": round(time.monotonic() - start, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
