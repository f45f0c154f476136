"""Where each CreateVolume was sent, recorded on its PVC before the agent is called.

Volume ids come from names, so a retried CreateVolume finds its volume by asking every agent.
A storage node that does not answer might hold a volume an earlier attempt made there; placing
the retry elsewhere would make a second copy. Without a record the controller can only refuse
every create while any storage node is down. With one, only a create whose record names a
node that does not answer waits; every other create goes to the nodes that answer.

The record is an annotation on the PVC (external-provisioner --extra-create-metadata passes
its name and namespace), written before each agent CreateVolume call: no record means no
attempt was ever sent anywhere.
"""

from __future__ import annotations

from typing import Protocol

from zvolt.errors import unavailable

ANNOTATION = "csi.zvolt.io/placement"


class PlacementRecords(Protocol):
    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        """(volume name, storage node) of the last attempt, if any."""
        ...

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None: ...


def encode(name: str, node: str) -> str:
    return f"{name}={node}"


def decode(value: str) -> tuple[str, str] | None:
    name, sep, node = (value or "").rpartition("=")
    return (name, node) if sep and name and node else None


class KubernetesRecords:  # pragma: no cover - needs an API server (tests/k8s covers it)
    def __init__(self) -> None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._core = client.CoreV1Api()
        self._error = client.ApiException

    def get(self, namespace: str, pvc: str) -> tuple[str, str] | None:
        try:
            obj = self._core.read_namespaced_persistent_volume_claim(pvc, namespace)
        except self._error as exc:
            raise unavailable(f"cannot read PVC {namespace}/{pvc} for its placement record: {exc.reason}") from None
        return decode((obj.metadata.annotations or {}).get(ANNOTATION, ""))

    def put(self, namespace: str, pvc: str, name: str, node: str) -> None:
        body = {"metadata": {"annotations": {ANNOTATION: encode(name, node)}}}
        try:
            self._core.patch_namespaced_persistent_volume_claim(pvc, namespace, body)
        except self._error as exc:
            raise unavailable(f"cannot record the placement of {name} on PVC {namespace}/{pvc}: {exc.reason}") from None
