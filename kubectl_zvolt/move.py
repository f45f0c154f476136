"""`kubectl zvolt move <pvc> --to <storage-node>`: move a PVC's volume, with its snapshots.

The PVC's PV names the volume (volumeHandle); `zvolt-csi --mode move --live-relay` runs in a
running controller container with that container's settings (only the controller reaches the
agents) and prints one line per step. The PV and its VolumeSnapshotContents keep their handles:
the controller finds the volume where it is now. A rerun after an interruption carries on where
the two storage nodes are.

A volume in use (published to nodes) moves live: at each host step the controller prints a
request line, and this plugin is the relay (csi/pathrelay.py): it runs `zvolt-csi --mode
live-path` in the node plugin container of each host (csi/livepath.py), with the volume's
node-stage secret on stdin as kubelet would hand it, and answers with what every node said.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from csi.pathrelay import RELAY_PREFIX
from kubectl_zvolt.attachments import CONTAINER, container_args, controller, one_shot
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import ExecInput, Kube, Obj, Session
from zvolt.errors import ZvoltError
from zvolt.names import check_node

NODE_CONTAINER = "zvolt-node"


@dataclass(frozen=True)
class MoveRun:
    pvc: str  # namespace/name
    volume_id: str
    code: int
    output: str  # what the controller said on stderr (its error, if any)
    relayed: list[str] = field(default_factory=list)  # "<op> <node>: <answer>" per host step


def pv_of(kube: Kube, driver: str, namespace: str, pvc: str) -> Obj:
    """The PersistentVolume of a bound zvolt PVC."""
    claim = kube.get_pvc(pvc, namespace)
    if claim is None:
        raise PluginError(f"PVC {namespace}/{pvc} not found")
    pv_name = (claim.get("spec") or {}).get("volumeName")
    if not pv_name:
        raise PluginError(f"PVC {namespace}/{pvc} is not bound to a volume yet")
    pv = kube.get_pv(pv_name) or {}
    csi = (pv.get("spec") or {}).get("csi") or {}
    if csi.get("driver") != driver:
        raise PluginError(f"PVC {namespace}/{pvc} is not a {driver} volume (PV {pv_name})")
    return pv


def argv(controller_args: list[str], volume_id: str, to: str) -> list[str]:
    return one_shot(controller_args, "move", f"--volume-id={volume_id}", f"--to={to}", "--log-level=error",
                    "--live-relay")


class Relay:
    """Carries the controller's host steps to the node plugins (csi/pathrelay.py's other end)."""

    def __init__(self, kube: Kube, execute: ExecInput, driver: str, pv: Obj) -> None:
        self.kube, self.execute, self.driver, self.pv = kube, execute, driver, pv
        self.log: list[str] = []
        self._nodes: dict[str, tuple[str, list[str]]] | None = None

    def node_plugins(self) -> dict[str, tuple[str, list[str]]]:
        """Host NQN (the driver's node id on a CSINode) -> (node plugin pod, its container's args)."""
        if self._nodes is None:
            node_of = {}
            for csinode in self.kube.list_csinodes():
                for d in (csinode.get("spec") or {}).get("drivers") or []:
                    if d.get("name") == self.driver and d.get("nodeID"):
                        node_of[str(csinode["metadata"]["name"])] = str(d["nodeID"])
            self._nodes = {}
            for pod in self.kube.list_pods():
                spec = pod.get("spec") or {}
                if (pod.get("status") or {}).get("phase") != "Running" or spec.get("nodeName") not in node_of:
                    continue
                for c in spec.get("containers") or []:
                    if c.get("name") == NODE_CONTAINER:
                        self._nodes[node_of[spec["nodeName"]]] = (str(pod["metadata"]["name"]),
                                                                  container_args(pod, c))
        return self._nodes

    def stage_secrets(self) -> dict[str, str]:
        """The volume's node-stage secret, as kubelet hands it to NodeStageVolume ({} if it has none)."""
        ref = ((self.pv.get("spec") or {}).get("csi") or {}).get("nodeStageSecretRef") or {}
        if not ref.get("name"):
            return {}
        secret = self.kube.get_secret(str(ref.get("namespace") or "default"), str(ref["name"]))
        if secret is None:
            raise PluginError(f"Secret {ref.get('namespace')}/{ref['name']}, the node-stage secret of PV "
                              f"{self.pv['metadata']['name']}, is missing")
        try:
            return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        except (binascii.Error, UnicodeDecodeError):
            raise PluginError(f"Secret {ref['name']} holds a value that is not text") from None

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        op, volume_id = str(request.get("op")), str(request.get("volume_id"))
        plugins = self.node_plugins()
        secrets = self.stage_secrets() if op == "add" else {}
        failed: dict[str, str] = {}
        for node, ctx in sorted((request.get("nodes") or {}).items()):
            if node not in plugins:
                failed[node] = (f"no running {NODE_CONTAINER} pod on the Kubernetes node whose CSINode names "
                                f"{node} for {self.driver}")
                continue
            pod, args = plugins[node]
            stdin = json.dumps({"op": op, "volume_id": volume_id, "publish_context": ctx, "secrets": secrets})
            code, out = self.execute(self.kube.namespace, pod, NODE_CONTAINER,
                                     one_shot(args, "live-path", "--log-level=error"), stdin=stdin)
            said = _last_json(out)
            self.log.append(f"{op} {node} ({pod}): {json.dumps(said) if said else out.strip()[-300:]}")
            if code != 0 or not said.get("ok"):
                failed[node] = str(said.get("error") or f"exit {code}: {out.strip()[-300:]}")
        return {"ok": not failed, "failed": failed}


def _last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        return doc if isinstance(doc, dict) else {}
    return {}


def relaying(relay: Relay, say: Callable[[str], None]) -> Callable[[str], str | None]:
    """A Session's on_line for the controller's move: a request line gets the relay's answer,
    any other line is a progress line for the user."""

    def on_line(line: str) -> str | None:
        if line.startswith(RELAY_PREFIX):
            try:
                request = json.loads(line[len(RELAY_PREFIX):])
            except ValueError:
                return json.dumps({"ok": False, "error": "the relay could not read the request"})
            try:
                return json.dumps(relay.answer(request))
            except PluginError as err:
                return json.dumps({"ok": False, "error": str(err)})
        say(line)
        return None

    return on_line


def move(kube: Kube, session: Session, execute: ExecInput, driver: str, namespace: str, pvc: str, to: str,
         say: Callable[[str], None]) -> MoveRun:
    try:
        check_node(to)
    except ZvoltError as err:
        raise PluginError(err.message) from None
    pv = pv_of(kube, driver, namespace, pvc)
    csi = pv["spec"]["csi"]
    volume_id = str(csi["volumeHandle"])
    pod, args = controller(kube.list_pods())
    relay = Relay(kube, execute, driver, pv)

    first = json.dumps({"volume_context": csi.get("volumeAttributes") or {}})
    code, out = session(kube.namespace, pod, CONTAINER, argv(args, volume_id, to), first, relaying(relay, say))
    return MoveRun(f"{namespace}/{pvc}", volume_id, code, out, relay.log)
