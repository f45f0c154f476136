"""`kubectl zvolt rotate-key <storage-class> --new-key-file FILE`: a new key for an encrypted class.

An encrypted class's volumes all use the key in one Secret (the class's provisioner,
controller-publish and controller-expand secrets must name the same one). Rotation, in an order
that a rerun with the same file always finishes:
1. the new key is recorded in the Secret as `encryptionKeyNext` (a rerun with another key is
   refused until this one is done, so no volume is left under a key nobody has);
2. every PV of the class gets `zfs change-key` through the controller (`zvolt-csi --mode
   rotate-key`, keys on stdin): no data is copied, and a volume already on the new key counts
   as done;
3. only when all succeeded, `encryptionKey` becomes the new key and `encryptionKeyNext` goes.
Between 1 and 3 a volume being attached may be refused (its Secret still has the old key) and
is retried by Kubernetes; after 3 everything uses the new key.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field

from csi import params
from kubectl_zvolt.attachments import CONTAINER, controller, one_shot
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import ExecInput, Kube, Obj

NEXT_KEY = params.SECRET_KEY + "Next"
_SECRET_PARAM = "csi.storage.k8s.io/{which}-secret-{part}"  # noqa: S105 - a parameter name
_USED_BY = ("provisioner", "controller-publish", "controller-expand")


@dataclass
class Rotation:
    storage_class: str
    secret: str
    rotated: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def class_secret(sc: Obj, driver: str) -> tuple[str, str]:
    """(namespace, name) of the one Secret holding the key of an encrypted class of ours."""
    name = sc["metadata"]["name"]
    parameters = sc.get("parameters") or {}
    if sc.get("provisioner") != driver:
        raise PluginError(f"StorageClass {name} is not a {driver} class")
    if parameters.get(params.ENCRYPTION_KEY, "off") == "off":
        raise PluginError(f"StorageClass {name} is not encrypted (parameter {params.ENCRYPTION_KEY})")
    refs = {(parameters.get(_SECRET_PARAM.format(which=w, part="namespace"), ""),
             parameters.get(_SECRET_PARAM.format(which=w, part="name"), "")) for w in _USED_BY}
    if len(refs) != 1:
        raise PluginError(f"StorageClass {name}: the {', '.join(_USED_BY)} secrets must be one Secret to rotate its "
                          f"key; they name {sorted(refs)}")
    namespace, secret = refs.pop()
    if not namespace or not secret or "${" in namespace + secret:
        raise PluginError(f"StorageClass {name} names its key Secret per claim ({namespace}/{secret}); rotate-key "
                          "handles one Secret per class")
    return namespace, secret


def _key_of(secret: Obj, key: str) -> str | None:
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        raise PluginError(f"Secret {secret['metadata']['name']}: {key} is not text") from None


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def argv(controller_args: list[str]) -> list[str]:
    return one_shot(controller_args, "rotate-key", "--log-level=error")


def parse(output: str) -> tuple[list[str], dict[str, str]]:
    start = output.find('{\n  "rotated"')
    if start < 0:
        raise PluginError(f"zvolt-csi --mode rotate-key gave no result: {output.strip()[-500:]}")
    try:
        doc, _ = json.JSONDecoder().raw_decode(output[start:])
        return [str(v) for v in doc["rotated"]], {str(k): str(v) for k, v in doc["failed"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PluginError(f"cannot read the output of zvolt-csi --mode rotate-key: {exc}") from exc


def rotate_key(kube: Kube, execute: ExecInput, driver: str, storage_class: str, new_key: str) -> Rotation:
    new_key = new_key.strip()
    params.encryption_key({params.SECRET_KEY: new_key}, "new")  # the driver's own rule for a key
    sc = kube.get_storage_class(storage_class)
    if sc is None:
        raise PluginError(f"StorageClass {storage_class} not found")
    namespace, name = class_secret(sc, driver)
    secret = kube.get_secret(namespace, name)
    if secret is None:
        raise PluginError(f"Secret {namespace}/{name} of StorageClass {storage_class} not found")
    old_key = _key_of(secret, params.SECRET_KEY)
    if old_key is None:
        raise PluginError(f"Secret {namespace}/{name} has no {params.SECRET_KEY}")
    pending = _key_of(secret, NEXT_KEY)
    if old_key == new_key and pending is None:
        raise PluginError(f"Secret {namespace}/{name} already holds this key: nothing to rotate")
    if pending is not None and pending != new_key:
        raise PluginError(f"Secret {namespace}/{name} records an unfinished rotation to another key ({NEXT_KEY}): "
                          "run rotate-key again with that key first")
    kube.patch_secret_data(namespace, name, {NEXT_KEY: _b64(new_key)})
    volumes = sorted(pv["spec"]["csi"]["volumeHandle"] for pv in kube.list_pvs()
                     if (pv.get("spec") or {}).get("storageClassName") == storage_class
                     and ((pv.get("spec") or {}).get("csi") or {}).get("driver") == driver)
    out = Rotation(storage_class, f"{namespace}/{name}")
    if volumes:
        pod, args = controller(kube.list_pods())
        request = json.dumps({"volumes": volumes, "old_key": old_key, "new_key": new_key})
        code, text = execute(kube.namespace, pod, CONTAINER, argv(args), stdin=request)
        out.rotated, out.failed = parse(text)
        if code not in (0, 1):  # 1: some volumes failed, which the result says
            raise PluginError(f"zvolt-csi --mode rotate-key in pod {pod} exited {code}: {text.strip()[-500:]}")
        missing = set(volumes) - set(out.rotated) - set(out.failed)
        for volume in sorted(missing):
            out.failed[volume] = "not reported by the controller"
    if not out.failed:
        kube.patch_secret_data(namespace, name, {params.SECRET_KEY: _b64(new_key), NEXT_KEY: None})
    return out
