"""`kubectl zvolt move <pvc> --to <storage-node>`: move a PVC's volume, with its snapshots.

The PVC's PV names the volume (volumeHandle); `zvolt-csi --mode move` runs in a running controller
container with that container's settings (only the controller reaches the agents) and prints one
line per step. The PV and its VolumeSnapshotContents keep their handles: the controller finds the
volume where it is now. The move is offline: the volume must not be attached (stop its pods).
A rerun after an interruption carries on where the two storage nodes are.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubectl_zvolt.attachments import CONTAINER, controller, one_shot
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import Exec, Kube
from zvolt.errors import ZvoltError
from zvolt.names import check_node


@dataclass(frozen=True)
class MoveRun:
    pvc: str  # namespace/name
    volume_id: str
    code: int
    output: str


def volume_of(kube: Kube, driver: str, namespace: str, pvc: str) -> str:
    """The CSI volume id of a bound zvolt PVC."""
    claim = kube.get_pvc(pvc, namespace)
    if claim is None:
        raise PluginError(f"PVC {namespace}/{pvc} not found")
    pv_name = (claim.get("spec") or {}).get("volumeName")
    if not pv_name:
        raise PluginError(f"PVC {namespace}/{pvc} is not bound to a volume yet")
    pv = kube.get_pv(pv_name)
    csi = ((pv or {}).get("spec") or {}).get("csi") or {}
    if csi.get("driver") != driver:
        raise PluginError(f"PVC {namespace}/{pvc} is not a {driver} volume (PV {pv_name})")
    return str(csi["volumeHandle"])


def argv(controller_args: list[str], volume_id: str, to: str) -> list[str]:
    return one_shot(controller_args, "move", f"--volume-id={volume_id}", f"--to={to}", "--log-level=error")


def move(kube: Kube, execute: Exec, driver: str, namespace: str, pvc: str, to: str) -> MoveRun:
    try:
        check_node(to)
    except ZvoltError as err:
        raise PluginError(err.message) from None
    volume_id = volume_of(kube, driver, namespace, pvc)
    pod, args = controller(kube.list_pods())
    code, out = execute(kube.namespace, pod, CONTAINER, argv(args, volume_id, to))
    return MoveRun(f"{namespace}/{pvc}", volume_id, code, out)
