"""What each subcommand does, in terms of PVC and VolumeSnapshot objects."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.kube import Exec, Kube, Obj
from kubectl_zvolt.model import (
    ANN_BRANCH_OF,
    ANN_BRANCH_SNAPSHOT,
    ANN_CHECKPOINT,
    ANN_SELECTED_NODE,
    DRIVER,
    SNAPSHOT_GROUP,
    Snapshot,
    Volume,
)

Clock = Callable[[], float]

SNAPSHOT_CRDS_MISSING = (
    "the VolumeSnapshot API (snapshot.storage.k8s.io/v1) is not installed in this cluster: "
    "install the external-snapshotter CRDs and the snapshot-controller, then retry"
)


@dataclass
class Result:
    """What a mutating command did, for the one line it prints."""

    kind: str
    name: str
    phase: str
    elapsed: float
    detail: str = ""


class Ops:
    def __init__(self, kube: Kube, *, driver: str = DRIVER, clock: Clock = time.monotonic,
                 execute: Exec | None = None) -> None:
        self.kube = kube
        self.driver = driver
        self.clock = clock
        self.execute = execute

    # --- lookups with the errors a user can act on ------------------------------------

    def zvolt_classes(self) -> dict[str, Obj]:
        return {sc["metadata"]["name"]: sc for sc in self.kube.list_storage_classes()
                if sc.get("provisioner") == self.driver}

    def require_pvc(self, name: str) -> Obj:
        pvc = self.kube.get_pvc(name)
        if pvc is None:
            raise PluginError(f"PersistentVolumeClaim {name!r} not found in namespace {self.kube.namespace!r}")
        sc_name = (pvc.get("spec") or {}).get("storageClassName")
        sc = self.kube.get_storage_class(sc_name) if sc_name else None
        if sc is None or sc.get("provisioner") != self.driver:
            shown = f"StorageClass {sc_name!r}" if sc_name else "no StorageClass"
            provisioner = f" (provisioner {sc.get('provisioner')!r})" if sc else ""
            raise PluginError(
                f"PersistentVolumeClaim {name!r} uses {shown}{provisioner}, not a zvolt class "
                f"(provisioner {self.driver}); zvolt can only branch and snapshot its own volumes"
            )
        return pvc

    def require_bound(self, pvc: Obj) -> None:
        phase = (pvc.get("status") or {}).get("phase") or "Pending"
        if phase != "Bound":
            name = pvc["metadata"]["name"]
            raise PluginError(f"PersistentVolumeClaim {name!r} is {phase}, not Bound: it has no volume to "
                              "branch or snapshot yet")

    def require_snapshot_api(self) -> None:
        if not self.kube.snapshot_api_present():
            raise PluginError(SNAPSHOT_CRDS_MISSING)

    def require_snapshot(self, name: str) -> Obj:
        self.require_snapshot_api()
        snap = self.kube.get_snapshot(name)
        if snap is None:
            raise PluginError(f"VolumeSnapshot {name!r} not found in namespace {self.kube.namespace!r}")
        return snap

    def require_absent(self, name: str) -> None:
        if self.kube.get_pvc(name) is not None:
            raise PluginError(f"PersistentVolumeClaim {name!r} already exists in namespace {self.kube.namespace!r}")

    def snapshot_class(self) -> str:
        classes = [c for c in self.kube.list_snapshot_classes() if c.get("driver") == self.driver]
        if not classes:
            raise PluginError(f"no VolumeSnapshotClass for driver {self.driver}: install the zvolt chart "
                              "with volumeSnapshotClass.enabled=true")
        default = [c for c in classes if ((c.get("metadata") or {}).get("annotations") or {})
                   .get("snapshot.storage.kubernetes.io/is-default-class") == "true"]
        return str((default or classes)[0]["metadata"]["name"])

    # --- the pod that mounts a claim ------------------------------------------------

    def consumer(self, pvc: str) -> tuple[Obj, str] | None:
        """A running pod mounting `pvc` and the container that mounts it (Postgres first)."""
        for pod in self.kube.list_pods():
            spec = pod.get("spec") or {}
            if (pod.get("status") or {}).get("phase") != "Running":
                continue
            vols = [v["name"] for v in spec.get("volumes") or []
                    if (v.get("persistentVolumeClaim") or {}).get("claimName") == pvc]
            if not vols:
                continue
            containers = [c for c in spec.get("containers") or []
                          if any(m.get("name") in vols for m in c.get("volumeMounts") or [])]
            if not containers:
                continue
            containers.sort(key=lambda c: 0 if "postgres" in (c.get("name", "") + c.get("image", "")) else 1)
            return pod, containers[0]["name"]
        return None

    def checkpoint(self, pvc: str, user: str) -> str:
        found = self.consumer(pvc)
        if found is None:
            raise PluginError(f"--checkpoint: no running pod mounts PVC {pvc!r}, so there is no Postgres "
                              "to CHECKPOINT (drop --checkpoint to branch a stopped database)")
        pod, container = found
        if self.execute is None:
            raise PluginError("--checkpoint needs exec access to pods")
        pod_name = pod["metadata"]["name"]
        code, out = self.execute(self.kube.namespace, pod_name, container,
                                 ["psql", "-X", "-q", "-U", user, "-d", "postgres", "-c", "CHECKPOINT"])
        if code != 0:
            raise PluginError(f"CHECKPOINT in pod {pod_name} (container {container}) failed "
                              f"with status {code}: {out.strip()[:500]}")
        return f"{pod_name}/{container}"

    # --- commands ------------------------------------------------------------------

    def branch(self, src: str, new: str, *, from_snapshot: str | None, checkpoint: bool,
               checkpoint_user: str, wait: bool, timeout: float) -> Result:
        start = self.clock()
        source = self.require_pvc(src)
        self.require_bound(source)
        self.require_absent(new)
        annotations = {ANN_BRANCH_OF: src}
        checkpointed = ""
        if checkpoint:
            checkpointed = self.checkpoint(src, checkpoint_user)
            annotations[ANN_CHECKPOINT] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if from_snapshot:
            snap = Snapshot.from_obj(self.require_snapshot(from_snapshot))
            if snap.source_pvc and snap.source_pvc != src:
                raise PluginError(f"VolumeSnapshot {from_snapshot!r} is of PVC {snap.source_pvc!r}, not {src!r}")
            data_source = {"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": from_snapshot}
            annotations[ANN_BRANCH_SNAPSHOT] = from_snapshot
            size = snap.restore_size or _size_of(source)
        else:
            data_source = {"kind": "PersistentVolumeClaim", "name": src}
            size = _size_of(source)
        body = self._pvc_body(new, source, size, data_source, annotations)
        self._select_node(body, source, src)
        self.kube.create_pvc(body)
        detail = f"checkpointed {checkpointed}" if checkpointed else ""
        return self._finish_pvc(new, start, wait, timeout, detail)

    def restore(self, snapshot: str, new: str, *, storage_class: str | None, wait: bool, timeout: float) -> Result:
        start = self.clock()
        snap = Snapshot.from_obj(self.require_snapshot(snapshot))
        self.require_absent(new)
        source = self.kube.get_pvc(snap.source_pvc) if snap.source_pvc else None
        if storage_class is None:
            if source is None:
                raise PluginError(f"the source PVC of VolumeSnapshot {snapshot!r} is gone: "
                                  "pass --storage-class to choose the class of the restored volume")
            storage_class = (source.get("spec") or {}).get("storageClassName")
        if storage_class not in self.zvolt_classes():
            raise PluginError(f"StorageClass {storage_class!r} is not a zvolt class (provisioner {self.driver})")
        size = snap.restore_size or (_size_of(source) if source else None)
        if not size:
            raise PluginError(f"VolumeSnapshot {snapshot!r} has no restoreSize yet: wait until it is ready")
        template: Obj = source or {"spec": {"accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem"}}
        template = {**template, "spec": {**(template.get("spec") or {}), "storageClassName": storage_class}}
        data_source = {"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": snapshot}
        annotations = {ANN_BRANCH_SNAPSHOT: snapshot}
        if snap.source_pvc:
            annotations[ANN_BRANCH_OF] = snap.source_pvc
        body = self._pvc_body(new, template, size, data_source, annotations)
        if source is not None and snap.source_pvc:
            self._select_node(body, source, snap.source_pvc)
        self.kube.create_pvc(body)
        return self._finish_pvc(new, start, wait, timeout, "")

    def snapshot(self, pvc: str, name: str, *, wait: bool, timeout: float) -> Result:
        start = self.clock()
        self.require_bound(self.require_pvc(pvc))
        self.require_snapshot_api()
        if self.kube.get_snapshot(name) is not None:
            raise PluginError(f"VolumeSnapshot {name!r} already exists in namespace {self.kube.namespace!r}")
        body: Obj = {
            "apiVersion": f"{SNAPSHOT_GROUP}/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": self.kube.namespace,
                         "annotations": {ANN_BRANCH_OF: pvc}},
            "spec": {"volumeSnapshotClassName": self.snapshot_class(),
                     "source": {"persistentVolumeClaimName": pvc}},
        }
        self.kube.create_snapshot(body)
        phase = "Created"
        if wait:
            def ready(obj: Obj) -> bool:
                s = Snapshot.from_obj(obj)
                if s.error:
                    raise PluginError(f"VolumeSnapshot {name} failed: {s.error}")
                return s.ready
            self.kube.wait_snapshot(name, ready, timeout)
            phase = "ReadyToUse"
        return Result("VolumeSnapshot", name, phase, self.clock() - start)

    def delete(self, ref: str) -> Result:
        start = self.clock()
        kind, _, name = ref.rpartition("/")
        kind = kind.lower()
        if kind not in {"", "pvc", "persistentvolumeclaim", "snapshot", "volumesnapshot"}:
            raise PluginError(f"unknown kind {kind!r}: use pvc/NAME or snapshot/NAME")
        pvc = self.kube.get_pvc(name) if kind in {"", "pvc", "persistentvolumeclaim"} else None
        snap = None
        if kind in {"", "snapshot", "volumesnapshot"} and (kind or self.kube.snapshot_api_present()):
            snap = self.require_snapshot(name) if kind else self.kube.get_snapshot(name)
        if pvc is not None and snap is not None:
            raise PluginError(f"both a PVC and a VolumeSnapshot are named {name!r}: "
                              f"say pvc/{name} or snapshot/{name}")
        if pvc is not None:
            self.require_pvc(name)
            self.kube.delete_pvc(name)
            return Result("PersistentVolumeClaim", name, "Deleted", self.clock() - start)
        if snap is not None:
            if Snapshot.from_obj(snap).class_name not in {None, *self._zvolt_snapshot_classes()}:
                raise PluginError(f"VolumeSnapshot {name!r} is not of a zvolt VolumeSnapshotClass")
            self.kube.delete_snapshot(name)
            return Result("VolumeSnapshot", name, "Deleted", self.clock() - start)
        raise PluginError(f"no PVC or VolumeSnapshot named {name!r} in namespace {self.kube.namespace!r}")

    def inventory(self) -> tuple[list[Volume], list[Snapshot]]:
        """zvolt PVCs and their VolumeSnapshots in the namespace (snapshots only if the API exists)."""
        classes = self.zvolt_classes()
        vols = [Volume.from_obj(p) for p in self.kube.list_pvcs()
                if (p.get("spec") or {}).get("storageClassName") in classes]
        names = {v.name for v in vols}
        snaps: list[Snapshot] = []
        if self.kube.snapshot_api_present():
            zclasses = self._zvolt_snapshot_classes()
            snaps = [s for s in (Snapshot.from_obj(o) for o in self.kube.list_snapshots())
                     if s.class_name in zclasses or (s.class_name is None and s.source_pvc in names)]
        vols.sort(key=lambda v: v.name)
        snaps.sort(key=lambda s: s.name)
        return vols, snaps

    # --- helpers -------------------------------------------------------------------

    def _zvolt_snapshot_classes(self) -> set[str]:
        return {c["metadata"]["name"] for c in self.kube.list_snapshot_classes() if c.get("driver") == self.driver}

    def _pvc_body(self, name: str, template: Obj, size: str, data_source: Obj, annotations: dict[str, str]) -> Obj:
        spec = template.get("spec") or {}
        body_spec: dict[str, Any] = {
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "storageClassName": spec.get("storageClassName"),
            "resources": {"requests": {"storage": size}},
            "dataSource": data_source,
        }
        if spec.get("volumeMode"):
            body_spec["volumeMode"] = spec["volumeMode"]
        labels = dict(((template.get("metadata") or {}).get("labels")) or {})
        return {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": self.kube.namespace, "labels": labels,
                         "annotations": annotations},
            "spec": body_spec,
        }

    def _select_node(self, body: Obj, source: Obj, src: str) -> None:
        """With WaitForFirstConsumer a new claim is provisioned only once a pod uses it; a
        branch is meant to capture the source *now*, so name the node the scheduler would:
        the one running the source's pod (the clone lands on the source's storage node
        either way)."""
        sc_name = (source.get("spec") or {}).get("storageClassName")
        sc = self.kube.get_storage_class(sc_name) if sc_name else None
        if not sc or sc.get("volumeBindingMode") != "WaitForFirstConsumer":
            return
        found = self.consumer(src)
        node = ((found[0].get("spec") or {}).get("nodeName")) if found else None
        if node:
            body["metadata"]["annotations"][ANN_SELECTED_NODE] = node

    def _finish_pvc(self, name: str, start: float, wait: bool, timeout: float, detail: str) -> Result:
        if not wait:
            return Result("PersistentVolumeClaim", name, "Pending", self.clock() - start, detail)
        cur = self.kube.get_pvc(name) or {}
        if ANN_SELECTED_NODE not in ((cur.get("metadata") or {}).get("annotations") or {}):
            sc = self.kube.get_storage_class((cur.get("spec") or {}).get("storageClassName") or "")
            if sc and sc.get("volumeBindingMode") == "WaitForFirstConsumer":
                note = "WaitForFirstConsumer: it binds when a pod first uses it"
                return Result("PersistentVolumeClaim", name, "Pending", self.clock() - start,
                              "; ".join(x for x in (detail, note) if x))

        def bound(obj: Obj) -> bool:
            return (obj.get("status") or {}).get("phase") == "Bound"

        self.kube.wait_pvc(name, bound, timeout)
        return Result("PersistentVolumeClaim", name, "Bound", self.clock() - start, detail)


def _size_of(pvc: Obj) -> str:
    cap = ((pvc.get("status") or {}).get("capacity") or {}).get("storage")
    req = (((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage")
    size = cap or req
    if not size:
        raise PluginError(f"PVC {pvc['metadata']['name']} has no size")
    return str(size)
