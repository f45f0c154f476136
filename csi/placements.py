"""Where each CreateVolume was sent, recorded on its PVC before the agent is called.

Volume ids come from names, so a retried CreateVolume finds its volume by asking every agent.
A storage node that does not answer might hold a volume an earlier attempt made there; placing
the retry elsewhere would make a second copy. Without a record the controller can only refuse
every create while any storage node is down. With one, only a create whose record names a
node that does not answer waits; every other create goes to the nodes that answer.

The record is an annotation on the PVC (external-provisioner --extra-create-metadata passes
its name and namespace), written before each agent CreateVolume call: no record means no
attempt was ever sent anywhere.

The same write labels the PVC with its volume group (csi/params.py group_of), so the controller
finds where a group's other volumes live by listing only the PVCs with that label in the
namespace: a cost that grows with the group, never with the number of volumes.
"""

from __future__ import annotations

import hashlib
import re
from typing import Protocol, runtime_checkable

from csi.params import group_of
from zvolt import kubeconfig
from zvolt.errors import unavailable

ANNOTATION = "csi.zvolt.io/placement"
GROUP_LABEL = "csi.zvolt.io/group"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


class PlacementRecords(Protocol):
    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        """(volume name, storage node) of the last attempt, if any."""
        ...

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None: ...


@runtime_checkable
class GroupRecords(PlacementRecords, Protocol):
    def members(self, namespace: str, group: str) -> dict[str, str]:
        """PVC name -> storage node of every recorded PVC of the group in the namespace."""
        ...


def group_label(group: str) -> str:
    """The group as a label value: itself when it is one, else a digest (a PVC name can be 253
    characters, a label value 63). Readers check group_of on each PVC found, so a clash of
    shortened values never makes a PVC a member of another group."""
    if _LABEL_VALUE.fullmatch(group):
        return group
    return "g-" + hashlib.sha256(group.encode()).hexdigest()[:40]


def encode(name: str, node: str) -> str:
    return f"{name}={node}"


def decode(value: str) -> tuple[str, str] | None:
    name, sep, node = (value or "").rpartition("=")
    return (name, node) if sep and name and node else None


class KubernetesRecords:  # pragma: no cover - needs an API server (tests/k8s covers it)
    def __init__(self) -> None:
        from kubernetes import client

        kubeconfig.load()
        self._core = client.CoreV1Api()
        self._error = client.ApiException

    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        try:
            obj = self._core.read_namespaced_persistent_volume_claim(pvc, namespace)
        except self._error as exc:
            raise unavailable(f"cannot read PVC {namespace}/{pvc} for its placement record: {exc.reason}") from None
        return decode((obj.metadata.annotations or {}).get(ANNOTATION, ""))

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None:
        body = {"metadata": {"annotations": {ANNOTATION: encode(name, node)},
                             "labels": {GROUP_LABEL: group_label(group_of(pvc))}}}
        try:
            self._core.patch_namespaced_persistent_volume_claim(pvc, namespace, body)
        except self._error as exc:
            raise unavailable(f"cannot record the placement of {name} on PVC {namespace}/{pvc}: {exc.reason}") from None

    def members(self, namespace: str, group: str) -> dict[str, str]:
        try:
            found = self._core.list_namespaced_persistent_volume_claim(
                namespace, label_selector=f"{GROUP_LABEL}={group_label(group)}")
        except self._error as exc:
            raise unavailable(f"cannot list the PVCs of volume group {namespace}/{group}: {exc.reason}") from None
        out: dict[str, str] = {}
        for obj in found.items:
            record = decode((obj.metadata.annotations or {}).get(ANNOTATION, ""))
            if record is not None and group_of(obj.metadata.name) == group:
                out[obj.metadata.name] = record[1]
        return out
