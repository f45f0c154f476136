"""DH-HMAC-CHAP and NVMe/TCP TLS on the CSI side: a volume's keys live in a Kubernetes Secret of their own.

The controller makes the Secret `zvolt-dhchap-<PV name>` with the volume (CreateVolume), reads it
for each ControllerPublishVolume and hands the keys to the agent, and deletes it with the volume.
kubelet hands the same keys to the node plugin as node-stage secrets: the chart's StorageClasses
name the Secret `zvolt-dhchap-${pv.name}`, which the node authorizer lets only a node with a pod
on that PV read. The keys never travel in publish_context, which Kubernetes keeps in the
VolumeAttachment. publish_context says only that the volume is authenticated (CONTEXT_KEY) or
uses TLS (TLS_CONTEXT_KEY). A TLS volume's configured PSK (zvolt/tlspsk.py) is one more key of the
same Secret, so the Secret keeps its name when only TLS is on.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.dhchap import check_keys, generate_secret
from zvolt import tlspsk
from zvolt.errors import ZvoltError, precondition, unavailable
from zvolt.files import write_private_json
from zvolt.names import DHCHAP_SECRET_PREFIX, check_dhchap_secret_name

CONTEXT_KEY = "dhchap"  # in volume_context and publish_context: the mode, never a key
TLS_CONTEXT_KEY = "tls"  # ... "psk" for a TLS volume
KEY = "dhchapKey"
CTRL_KEY = "dhchapCtrlKey"
TLS_PSK = "tlsPsk"
LABELS = {"app.kubernetes.io/managed-by": "zvolt", "zvolt.io/dhchap": "true"}


@dataclass(frozen=True)
class Keys:
    key: str  # "": no DH-HMAC-CHAP
    ctrl_key: str = ""
    tls_psk: str = ""  # "": no TLS

    def __repr__(self) -> str:  # never printed by accident
        return (f"Keys(key=<{'set' if self.key else ''}>, ctrl_key=<{'set' if self.ctrl_key else ''}>, "
                f"tls_psk=<{'set' if self.tls_psk else ''}>)")


def new_keys(mode: str, tls: bool = False) -> Keys:
    return Keys(generate_secret() if mode else "", generate_secret() if mode == "bidirectional" else "",
                tlspsk.generate() if tls else "")


def keys_from(data: Mapping[str, str], where: str, mode: str, tls: bool = False) -> Keys:
    """The keys in a Secret's data (or CSI secrets), checked; messages never repeat a key."""
    key, ctrl, psk = data.get(KEY, ""), data.get(CTRL_KEY, ""), data.get(TLS_PSK, "")
    if mode and not key:
        raise precondition(f"{where} has no {KEY!r}: the volume's DH-HMAC-CHAP keys are missing")
    if mode == "bidirectional" and not ctrl:
        raise precondition(f"{where} has no {CTRL_KEY!r}, which bidirectional DH-HMAC-CHAP needs")
    if tls and not psk:
        raise precondition(f"{where} has no {TLS_PSK!r}: the volume's NVMe/TCP TLS key is missing")
    found = Keys(key if mode else "", ctrl if mode else "", psk if tls else "")
    check_keys(found.key, found.ctrl_key, where, found.tls_psk)
    return found


def node_keys(secrets: Mapping[str, str], volume_id: str, mode: str, tls: bool = False) -> Keys:
    """NodeStageVolume: the keys kubelet read from the volume's Secret."""
    if not secrets:
        what = " and ".join([*(["DH-HMAC-CHAP"] if mode else []), *(["TLS"] if tls else [])])
        raise precondition(f"volume {volume_id} is exported with {what} but NodeStageVolume got no secrets: "
                           "its StorageClass must set csi.storage.k8s.io/node-stage-secret-name to "
                           "zvolt-dhchap-${pv.name} and -namespace to the driver's namespace (the chart does)")
    return keys_from(secrets, f"the node-stage secret of volume {volume_id}", mode, tls)


class SecretStore(Protocol):
    """Where the controller keeps volumes' keys: Kubernetes Secrets (KubeSecrets) or a test's dict."""

    namespace: str

    def read(self, name: str) -> dict[str, str] | None: ...
    def create(self, name: str, data: dict[str, str], labels: dict[str, str]) -> None: ...
    def delete(self, name: str) -> None: ...


class VolumeKeys:
    """The controller's DH-HMAC-CHAP keys, one Secret per volume, named after the volume's CSI
    name (the PV name). Every call is one API request: never a list of Secrets."""

    def __init__(self, store: SecretStore) -> None:
        self.store = store

    def _where(self, name: str) -> str:
        return f"Secret {self.store.namespace}/{name}"

    def ensure(self, volume_name: str, mode: str, tls: bool = False) -> Keys:
        """Look up, then create: a retried CreateVolume finds the keys its first try made."""
        name = check_dhchap_secret_name(volume_name)
        found = self.store.read(name)
        if found is None:
            fresh = new_keys(mode, tls)
            data = {KEY: fresh.key, CTRL_KEY: fresh.ctrl_key, TLS_PSK: fresh.tls_psk}
            self.store.create(name, {k: v for k, v in data.items() if v}, dict(LABELS))
            found = self.store.read(name)  # a concurrent create won: use what is there
            if found is None:
                raise unavailable(f"{self._where(name)} was created but cannot be read back; retry")
        return keys_from(found, self._where(name), mode, tls)

    def get(self, volume_name: str, mode: str, tls: bool = False) -> Keys:
        name = check_dhchap_secret_name(volume_name)
        found = self.store.read(name)
        if found is None:
            raise precondition(f"{self._where(name)} holding the keys of volume {volume_name} is "
                               "missing: it is made with the volume; restore it, or recreate the volume")
        return keys_from(found, self._where(name), mode, tls)

    def delete(self, volume_name: str) -> None:
        try:
            name = check_dhchap_secret_name(volume_name)
        except ZvoltError:
            return  # such a volume never had a Secret
        self.store.delete(name)


class KubeSecrets:
    """SecretStore on the Kubernetes API (the controller's ServiceAccount: get, create, delete in
    its own namespace; the chart's Role)."""

    def __init__(self, core: Any, namespace: str) -> None:
        self.core = core
        self.namespace = namespace

    def read(self, name: str) -> dict[str, str] | None:
        import base64

        from kubernetes.client.rest import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise unavailable(f"reading Secret {self.namespace}/{name}: {exc.status} {exc.reason}") from None
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def create(self, name: str, data: dict[str, str], labels: dict[str, str]) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        body = client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels=labels), type="Opaque",
                               string_data=data)
        try:
            self.core.create_namespaced_secret(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:  # made meanwhile by a concurrent call: read back by the caller
                raise unavailable(f"creating Secret {self.namespace}/{name}: {exc.status} {exc.reason}") from None

    def delete(self, name: str) -> None:
        from kubernetes.client.rest import ApiException

        try:
            self.core.delete_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise unavailable(f"deleting Secret {self.namespace}/{name}: {exc.status} {exc.reason}") from None


class FileSecrets:
    """SecretStore in a folder (0700; one 0600 JSON file per volume): a CO without Kubernetes
    Secrets, and the lab. The caller hands each volume's file to the node plugin as its
    node-stage secrets."""

    def __init__(self, folder: str) -> None:
        self.namespace = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)

    def _path(self, name: str) -> str:
        return os.path.join(self.namespace, check_dhchap_secret_name(name.removeprefix(DHCHAP_SECRET_PREFIX)))

    def read(self, name: str) -> dict[str, str] | None:
        try:
            with open(self._path(name)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise unavailable(f"reading {self._path(name)}: {exc}") from None
        return {str(k): str(v) for k, v in data.items()}

    def create(self, name: str, data: dict[str, str], labels: dict[str, str]) -> None:
        if not os.path.exists(self._path(name)):
            write_private_json(self._path(name), data)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))


class MemorySecrets:
    """SecretStore in a dict: unit tests, and a controller run without Kubernetes."""

    def __init__(self, namespace: str = "zvolt") -> None:
        self.namespace = namespace
        self.secrets: dict[str, dict[str, str]] = {}

    def read(self, name: str) -> dict[str, str] | None:
        found = self.secrets.get(name)
        return dict(found) if found is not None else None

    def create(self, name: str, data: dict[str, str], labels: dict[str, str]) -> None:
        self.secrets.setdefault(name, dict(data))

    def delete(self, name: str) -> None:
        self.secrets.pop(name, None)
