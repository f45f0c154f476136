"""StorageClass and VolumeAttributesClass parameters, validated into one record.

A VolumeAttributesClass parameter (CSI mutable_parameters) is checked by the very code that
checks a StorageClass parameter: `parse_mutable` only narrows which keys are allowed.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from csi.mounter import SUPPORTED_FS
from zvolt import commitment, volprops
from zvolt.errors import invalid

DEFAULT_VOLBLOCKSIZE = volprops.DEFAULT_VOLBLOCKSIZE
_SIZE = re.compile(r"^([0-9]+)([KkMm]?)$")
FSTYPE_KEY = "csi.storage.k8s.io/fstype"
# Added by external-provisioner --extra-create-metadata: kept as labels on the zvol.
_METADATA_KEYS = {
    "csi.storage.k8s.io/pvc/name": "pvc-name",
    "csi.storage.k8s.io/pvc/namespace": "pvc-namespace",
    "csi.storage.k8s.io/pv/name": "pv-name",
    "csi.storage.k8s.io/volumesnapshot/name": "snapshot-name",
    "csi.storage.k8s.io/volumesnapshot/namespace": "snapshot-namespace",
    "csi.storage.k8s.io/volumesnapshotcontent/name": "snapshotcontent-name",
}
_SNAPSHOT_METADATA = ("csi.storage.k8s.io/volumesnapshot/name", "csi.storage.k8s.io/volumesnapshot/namespace",
                      "csi.storage.k8s.io/volumesnapshotcontent/name")
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9._-]{0,253}$")
# StorageClass keys the sidecars consume and never pass on (secret references). The chart's
# values.schema.json allows exactly these in extraParameters, besides the driver's own keys.
SIDECAR_KEY = re.compile(
    r"^csi\.storage\.k8s\.io/(provisioner|controller-publish|node-stage|node-publish|controller-expand"
    r"|node-expand)-secret-(name|namespace)$"
)
COMMITMENT_KEY = "commitmentRatio"
# Keeps the volumes of one group on different storage nodes: "required" (refuse when no other
# node fits), "preferred" (the node with the fewest of the group first), "off" (the default).
GROUP_SPREAD_KEY = "groupSpread"
GROUP_SPREADS = ("off", "preferred", "required")
# The group rule: a PVC's group is its name with one trailing -<ordinal> removed, within its
# namespace (a StatefulSet's claims data-pg-0, data-pg-1 -> "data-pg").
_ORDINAL = re.compile(r"-[0-9]+$")
# NVMe in-band authentication (csi/dhchap.py): "unidirectional", "bidirectional", or off.
DHCHAP_KEY = "dhchap"
DHCHAP_MODES = ("unidirectional", "bidirectional", "off")
# NVMe/TCP TLS 1.3 with a per-volume pre-shared key (zvolt/tlspsk.py): "psk", or "off".
TLS_KEY = "tls"
TLS_MODES = ("psk", "off")
ENCRYPTION_KEY = "encryption"
# ZFS native encryption zvolt offers: the one cipher, and "off" (the default).
ENCRYPTIONS = ("aes-256-gcm", "off")
# The key in the CSI secrets (provisioner, controller-publish, controller-expand) holding a volume's
# encryption key: 64 hex characters = 32 bytes (`openssl rand -hex 32`).
SECRET_KEY = "encryptionKey"  # noqa: S105 - the name of a Secret's key, not a secret
_KEY_BYTES = 32
DRIVER_KEYS = ("volblocksize", "compression", "thin", COMMITMENT_KEY, ENCRYPTION_KEY, GROUP_SPREAD_KEY, DHCHAP_KEY,
               TLS_KEY, FSTYPE_KEY)
# What ZFS can change on a live zvol and zvolt offers to change (ControllerModifyVolume).
MUTABLE_KEYS = ("compression",)
# Why each other driver key stays as created: the refusal tells the user.
_FIXED_BECAUSE = {
    "volblocksize": "ZFS fixes a zvol's volblocksize when it is created",
    "thin": "zvolt does not add or drop a volume's space reservation after creation",
    COMMITMENT_KEY: "it decides placement, which is done once",
    ENCRYPTION_KEY: "ZFS fixes a volume's encryption when it is created (its key can be rotated)",
    GROUP_SPREAD_KEY: "it decides placement, which is done once",
    DHCHAP_KEY: "a volume's keys are made with it, in its Secret",
    TLS_KEY: "a volume's keys are made with it, in its Secret",
    FSTYPE_KEY: "the filesystem is made once, on first use",
}


@dataclass(frozen=True)
class VolumeParams:
    volblocksize: int = DEFAULT_VOLBLOCKSIZE
    compression: str = "lz4"
    thick: bool = False
    fstype: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # The class's own commitment limit (0: none): its volumes go only where the node's commitment
    # stays within it. Enforced by the controller from GetCapacity (see csi/placement.py).
    commitment_ratio: float = 0.0
    # ZFS native encryption (aes-256-gcm) with the key from the provisioner secret.
    encrypted: bool = False
    # groupSpread: "off", "preferred" or "required" (see group_of for the group).
    group_spread: str = "off"
    # DH-HMAC-CHAP: "" (off), "unidirectional" or "bidirectional" (csi/dhchap.py).
    dhchap: str = ""
    # NVMe/TCP TLS with the PSK kept in the volume's Secret (next to its DH-HMAC-CHAP keys).
    tls: bool = False

    def group(self) -> tuple[str, str] | None:
        """(namespace, group) of the PVC this volume is made for, if its class spreads groups.
        The PVC's name and namespace come from external-provisioner --extra-create-metadata."""
        if self.group_spread == "off":
            return None
        if "pvc-name" not in self.labels or "pvc-namespace" not in self.labels:
            raise invalid(f"{GROUP_SPREAD_KEY}={self.group_spread} needs the PVC's name and namespace: run "
                          "external-provisioner with --extra-create-metadata (the chart does)")
        return self.labels["pvc-namespace"], group_of(self.labels["pvc-name"])


def group_of(pvc: str) -> str:
    """The group rule: the PVC name with one trailing -<ordinal> removed ("data-pg-2" -> "data-pg";
    a name without an ordinal is a group of its own name)."""
    return _ORDINAL.sub("", pvc) or pvc


def _volblocksize(value: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise invalid(f"volblocksize {value!r} is not a size like 8K or 16K")
    unit = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return volprops.check_volblocksize(int(match.group(1)) * unit)


def _bool(key: str, value: str) -> bool:
    if value.lower() in ("true", "yes", "1"):
        return True
    if value.lower() in ("false", "no", "0"):
        return False
    raise invalid(f"parameter {key}={value!r} must be true or false")


def parse(parameters: Mapping[str, str]) -> VolumeParams:
    """Unknown keys are refused: a typo in a StorageClass should fail loudly, not be ignored."""
    volblocksize, compression, thick, fstype = DEFAULT_VOLBLOCKSIZE, volprops.DEFAULT_COMPRESSION, False, ""
    ratio = 0.0
    encrypted = False
    spread = "off"
    auth = ""
    tls = False
    labels: dict[str, str] = {}
    for key, value in parameters.items():
        if key == "volblocksize":
            volblocksize = _volblocksize(value)
        elif key == "compression":
            compression = volprops.check_compression(value)
        elif key == "thin":
            thick = not _bool(key, value)
        elif key == COMMITMENT_KEY:
            ratio = commitment.check_ratio(value, f"parameter {COMMITMENT_KEY}")
        elif key == ENCRYPTION_KEY:
            if value not in ENCRYPTIONS:
                raise invalid(f"parameter {ENCRYPTION_KEY}={value!r} is not supported "
                              f"(supported: {', '.join(ENCRYPTIONS)})")
            encrypted = value != "off"
        elif key == GROUP_SPREAD_KEY:
            if value not in GROUP_SPREADS:
                raise invalid(f"parameter {GROUP_SPREAD_KEY}={value!r} is not one of {', '.join(GROUP_SPREADS)}")
            spread = value
        elif key == DHCHAP_KEY:
            if value not in DHCHAP_MODES:
                raise invalid(f"parameter {DHCHAP_KEY}={value!r} is not one of {', '.join(DHCHAP_MODES)}")
            auth = "" if value == "off" else value
        elif key == TLS_KEY:
            if value not in TLS_MODES:
                raise invalid(f"parameter {TLS_KEY}={value!r} is not one of {', '.join(TLS_MODES)}")
            tls = value != "off"
        elif key == FSTYPE_KEY:
            if value not in SUPPORTED_FS:
                raise invalid(f"{FSTYPE_KEY} {value!r} is not supported (supported: {', '.join(SUPPORTED_FS)})")
            fstype = value
        elif key in _METADATA_KEYS:
            _label(labels, key, value)
        else:
            raise invalid(f"unknown StorageClass parameter {key!r} (known: {', '.join(DRIVER_KEYS)})")
    return VolumeParams(volblocksize=volblocksize, compression=compression, thick=thick, fstype=fstype, labels=labels,
                        commitment_ratio=ratio, encrypted=encrypted, group_spread=spread, dhchap=auth,
                        tls=tls)


def encryption_key(secrets: Mapping[str, str], which: str) -> bytes:
    """The volume key from a CSI secret (`which`: provisioner, controller-publish, ...). Messages
    name the Secret's key and what is wrong with it, never its value."""
    value = secrets.get(SECRET_KEY)
    if value is None:
        raise invalid(f"the volume is encrypted: the {which} secret (StorageClass "
                      f"csi.storage.k8s.io/{which}-secret-name and -namespace) must hold its key in {SECRET_KEY!r}")
    return _key(value.strip(), which)


def optional_encryption_key(secrets: Mapping[str, str], which: str) -> bytes:
    """The key if the secret holds one (publish and expand: the agent says when it needs one), else b""."""
    return _key(secrets[SECRET_KEY].strip(), which) if SECRET_KEY in secrets else b""


def _key(text: str, which: str) -> bytes:
    hex_only = all(c in string.hexdigits for c in text)
    if len(text) != 2 * _KEY_BYTES or not hex_only:
        found = f"{len(text)} characters" + ("" if hex_only else ", not all hex")
        raise invalid(f"{SECRET_KEY!r} in the {which} secret must be {2 * _KEY_BYTES} hex characters "
                      f"({_KEY_BYTES} bytes; make one with: openssl rand -hex 32); it has {found}")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class VolumeChanges:
    """What a VolumeAttributesClass asks of a volume; "" = leave as it is."""

    compression: str = ""


def _check_mutable_keys(mutable: Mapping[str, str]) -> None:
    allowed = ", ".join(MUTABLE_KEYS)
    for key in mutable:
        if key in MUTABLE_KEYS:
            continue
        if key in _FIXED_BECAUSE:
            raise invalid(f"parameter {key!r} cannot change after a volume is created: {_FIXED_BECAUSE[key]} "
                          f"(mutable: {allowed})")
        raise invalid(f"unknown VolumeAttributesClass parameter {key!r} (mutable: {allowed})")


def parse_mutable(mutable: Mapping[str, str]) -> VolumeChanges:
    """VolumeAttributesClass parameters (ControllerModifyVolume)."""
    _check_mutable_keys(mutable)
    par = parse(mutable)  # the values: exactly the checks CreateVolume makes
    return VolumeChanges(compression=par.compression if "compression" in mutable else "")


def parse_create(parameters: Mapping[str, str], mutable: Mapping[str, str]) -> VolumeParams:
    """CreateVolume: the StorageClass's parameters, overridden by the VolumeAttributesClass's
    (CSI: mutable_parameters take precedence over parameters)."""
    _check_mutable_keys(mutable)
    return parse({**parameters, **mutable})


def _label(labels: dict[str, str], key: str, value: str) -> None:
    # Kubernetes names fit the label charset; anything else is dropped rather than refused,
    # since the sidecar adds these keys on its own and a user cannot change them.
    if _LABEL_VALUE.fullmatch(value):
        labels[_METADATA_KEYS[key]] = value


def parse_snapshot(parameters: Mapping[str, str]) -> dict[str, str]:
    """VolumeSnapshotClass parameters: zvolt takes none of its own. external-snapshotter
    --extra-create-metadata adds the snapshot's names, which are kept as labels."""
    labels: dict[str, str] = {}
    for key, value in parameters.items():
        if key not in _SNAPSHOT_METADATA:
            raise invalid(f"unknown VolumeSnapshotClass parameter {key!r}: zvolt snapshots take no parameters")
        _label(labels, key, value)
    return labels
