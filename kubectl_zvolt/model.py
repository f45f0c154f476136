"""Plain records the plugin works with, read from PVC and VolumeSnapshot objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

DRIVER = "csi.zvolt.io"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_VERSION = "v1"

# Annotations the plugin writes on what it creates, so `tree` can show the branch graph
# even when a dataSource no longer names an existing object.
ANN_BRANCH_OF = "zvolt.io/branch-of"
ANN_BRANCH_SNAPSHOT = "zvolt.io/branch-snapshot"
ANN_CHECKPOINT = "zvolt.io/checkpoint"
ANN_SELECTED_NODE = "volume.kubernetes.io/selected-node"


@dataclass(frozen=True)
class Source:
    kind: str  # "PersistentVolumeClaim" | "VolumeSnapshot"
    name: str


@dataclass
class Volume:
    name: str
    namespace: str
    storage_class: str | None
    phase: str
    request: str | None
    capacity: str | None
    source: Source | None
    created: datetime | None
    annotations: dict[str, str] = field(default_factory=dict)
    volume_name: str | None = None

    @property
    def size(self) -> str | None:
        return self.capacity or self.request

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Volume:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ds = spec.get("dataSourceRef") or spec.get("dataSource")
        source = Source(ds["kind"], ds["name"]) if ds and ds.get("kind") and ds.get("name") else None
        annotations = meta.get("annotations") or {}
        if source is None and annotations.get(ANN_BRANCH_OF):
            source = Source("PersistentVolumeClaim", annotations[ANN_BRANCH_OF])
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", ""),
            storage_class=spec.get("storageClassName"),
            phase=status.get("phase") or "Pending",
            request=((spec.get("resources") or {}).get("requests") or {}).get("storage"),
            capacity=(status.get("capacity") or {}).get("storage"),
            source=source,
            created=parse_time(meta.get("creationTimestamp")),
            annotations=dict(annotations),
            volume_name=spec.get("volumeName"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "PersistentVolumeClaim",
            "name": self.name,
            "namespace": self.namespace,
            "storageClass": self.storage_class,
            "phase": self.phase,
            "size": self.size,
            "source": {"kind": self.source.kind, "name": self.source.name} if self.source else None,
            "created": self.created.isoformat() if self.created else None,
        }


@dataclass
class Snapshot:
    name: str
    namespace: str
    source_pvc: str | None
    class_name: str | None
    ready: bool
    restore_size: str | None
    created: datetime | None
    error: str | None = None

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> Snapshot:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        err = status.get("error") or {}
        return cls(
            name=meta["name"],
            namespace=meta.get("namespace", ""),
            source_pvc=(spec.get("source") or {}).get("persistentVolumeClaimName"),
            class_name=spec.get("volumeSnapshotClassName"),
            ready=bool(status.get("readyToUse")),
            restore_size=status.get("restoreSize"),
            created=parse_time(status.get("creationTime") or meta.get("creationTimestamp")),
            error=err.get("message"),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "VolumeSnapshot",
            "name": self.name,
            "namespace": self.namespace,
            "source": self.source_pvc,
            "readyToUse": self.ready,
            "restoreSize": self.restore_size,
            "created": self.created.isoformat() if self.created else None,
        }


def parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
