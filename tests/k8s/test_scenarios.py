"""zvolt driven by the real callers: a real control plane (scheduler, attach-detach and PV
controllers, snapshot-controller), the chart installed with Helm, its controller Deployment's
containers run with their own ServiceAccount tokens (zvolt-csi and the kubernetes-csi
sidecars), and the agent and node plugin on the real kernel stack in the lab guest.

Every scenario asserts its end state in Kubernetes and in ZFS/configfs, and prints the time it
took to reach it. The kubelets are stand-ins (tests/k8s/nodes.py) until the lab runs real ones.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import helm_python
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubectl_zvolt import cli as kubectl_zvolt
from lab.guest import Lab
from zvolt import names, tlspsk

from . import storage
from .chartpod import CHART, Chart, LocalPod, local_exec, local_pod, project_commands, run_container
from .controlplane import ControlPlane, Say
from .nodes import Kubelets, NodeSpec
from .procs import Process, wait_for

pytestmark = pytest.mark.k8s

T = TypeVar("T")
GiB = 1 << 30
WORKER = "worker-0"
STORAGE_LABEL = {"zvolt.io/storage-node": "true"}
IMMEDIATE = "zvolt-immediate"  # the chart's zvolt class (DH-HMAC-CHAP too), but bound at once (no consumer needed)
SNAPSHOTS = ("snapshot.storage.k8s.io", "v1")
TIMEOUT = 240.0  # TCG: every ZFS/nvmet step is 10-50x slower than on hardware
RECONCILE_S = 5


@dataclass
class Zvolt:
    cp: ControlPlane
    chart: Chart
    storage: storage.Storage
    kubelets: Kubelets
    pod: LocalPod
    procs: list[Process]
    say: Say

    @property
    def core(self) -> Any:
        return client.CoreV1Api(self.cp.api)

    @property
    def snaps(self) -> Any:
        return client.CustomObjectsApi(self.cp.api)

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = TIMEOUT) -> T:
        return wait_for(what, check, timeout, watch=self.procs, interval=0.5)


def _agent_pod(cp: ControlPlane, namespace: str, daemonset: str, node: str = storage.STORAGE_NODE) -> str | None:
    ds = client.AppsV1Api(cp.api).read_namespaced_daemon_set(daemonset, namespace)
    selector = ",".join(f"{k}={v}" for k, v in sorted(ds.spec.selector.match_labels.items()))
    for pod in client.CoreV1Api(cp.api).list_namespaced_pod(namespace, label_selector=selector).items:
        if pod.spec.node_name == node and pod.metadata.deletion_timestamp is None:
            return str(pod.metadata.name)
    return None


@pytest.fixture(scope="module")
def zvolt(cluster: ControlPlane, zvolt_chart: Chart, lab: Lab, say: Say) -> Iterator[Zvolt]:
    t0 = time.monotonic()
    # The controller reaches an agent at <agent pod IP>:<agent.port>. The agent pod runs on the
    # host network of its node, whose address here is 127.0.0.1, where the lab forwards a port
    # to the agent in the guest: point the chart at that port, as a user would with helm upgrade.
    with helm_python.Config(kubeconfig_path=cluster.admin_kubeconfig, namespace=zvolt_chart.namespace) as cfg:
        # Attachment reconcile every 5 s (60 s by default): every scenario here then also shows
        # that it never unpublishes what Kubernetes attaches, even mid-attach.
        cfg.upgrade(CHART, zvolt_chart.release, {"agent": {"port": lab.forwards["agent"]},
                                                 "controller": {"reconcileAttachmentsSeconds": RECONCILE_S}},
                    namespace=zvolt_chart.namespace, reuse_values=True, timeout=120)
    fullname = zvolt_chart.controller.removesuffix("-controller")
    agent_args = client.AppsV1Api(cluster.api).read_namespaced_daemon_set(
        f"{fullname}-agent", zvolt_chart.namespace).spec.template.spec.containers[0].args
    # DH-HMAC-CHAP is on by default: the chart's agents refuse a publish without the volume's keys.
    store = storage.start(lab, cluster.api, zvolt_chart.namespace, f"{fullname}-agent-tls",
                          next(a.split("=", 1)[1] for a in agent_args if a.startswith("--controller-cn=")),
                          agent_args=[a for a in agent_args if a == "--dhchap"])
    kubelets = Kubelets(cluster.api)
    procs: list[Process] = []
    try:
        kubelets.register(NodeSpec(storage.STORAGE_NODE, labels=STORAGE_LABEL))
        kubelets.register(NodeSpec(WORKER, csi_node_id=store.node_id))
        agent_pod = wait_for("the agent DaemonSet's pod on the storage node",
                             lambda: _agent_pod(cluster, zvolt_chart.namespace, f"{fullname}-agent"), 120)
        kubelets.mark_running(zvolt_chart.namespace, agent_pod, "127.0.0.1")
        pod = local_pod(cluster, zvolt_chart.namespace, zvolt_chart.controller, commands=project_commands())
        procs = [run_container(cluster, pod, name) for name in pod.containers]
        storage_api = client.StorageV1Api(cluster.api)
        storage_api.create_storage_class(client.V1StorageClass(
            metadata=client.V1ObjectMeta(name=IMMEDIATE), provisioner="csi.zvolt.io",
            parameters=dict(storage_api.read_storage_class("zvolt").parameters),
            reclaim_policy="Delete", allow_volume_expansion=True, volume_binding_mode="Immediate"))
        env = Zvolt(cluster, zvolt_chart, store, kubelets, pod, procs, say)
        say(f"k8s: zvolt up (helm upgrade, agent + node plugin in the lab, stand-in nodes, "
            f"{len(procs)} controller containers) in {time.monotonic() - t0:.1f} s")
        yield env
    finally:
        cluster.procs.stop(procs)
        kubelets.close()
        storage.stop(lab)


@pytest.fixture
def ns(zvolt: Zvolt) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    zvolt.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    with contextlib.suppress(ApiException):
        zvolt.core.delete_namespace(name)


# --- object helpers ------------------------------------------------------------------

def pvc(name: str, size: str = "1Gi", sc: str = IMMEDIATE, source: dict[str, str] | None = None) -> Any:
    spec = client.V1PersistentVolumeClaimSpec(
        access_modes=["ReadWriteOnce"], storage_class_name=sc,
        resources=client.V1VolumeResourceRequirements(requests={"storage": size}))
    if source:
        spec.data_source = client.V1TypedLocalObjectReference(
            api_group=SNAPSHOTS[0] if source["kind"] == "VolumeSnapshot" else None,
            kind=source["kind"], name=source["name"])
    return client.V1PersistentVolumeClaim(metadata=client.V1ObjectMeta(name=name), spec=spec)


def consumer(name: str, claim: str) -> Any:
    """A pod that uses the claim: only scheduling and attach matter here (no kubelet runs it)."""
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="db", image="zvolt.invalid/postgres")],
            volumes=[client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=claim))],
        ),
    )


def scheduled_on(z: Zvolt, ns: str, pod: str) -> str:
    """The node the scheduler bound the pod to (after the volume binding it waits for)."""
    node: str = z.wait(f"pod {ns}/{pod} scheduled", lambda: z.core.read_namespaced_pod(pod, ns).spec.node_name)
    return node


def bound_pv(z: Zvolt, ns: str, claim: str) -> Any:
    def check() -> Any:
        c = z.core.read_namespaced_persistent_volume_claim(claim, ns)
        return c if c.status.phase == "Bound" else None
    c = z.wait(f"PVC {ns}/{claim} Bound", check)
    return z.core.read_persistent_volume(c.spec.volume_name)


def gone(read: Callable[[], Any]) -> bool | None:
    try:
        read()
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return None


def pv_gone(z: Zvolt, name: str) -> bool | None:
    return gone(lambda: z.core.read_persistent_volume(name))


def snapshot(name: str, source: str) -> dict[str, Any]:
    return {"apiVersion": "/".join(SNAPSHOTS), "kind": "VolumeSnapshot", "metadata": {"name": name},
            "spec": {"volumeSnapshotClassName": "zvolt", "source": {"persistentVolumeClaimName": source}}}


def ready_snapshot(z: Zvolt, ns: str, name: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        vs = z.snaps.get_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots", name)
        status = vs.get("status") or {}
        if status.get("error"):
            raise AssertionError(f"VolumeSnapshot {name}: {status['error']}")
        return vs if status.get("readyToUse") else None
    result: dict[str, Any] = z.wait(f"VolumeSnapshot {ns}/{name} readyToUse", check)
    return result


def events(z: Zvolt, ns: str, name: str) -> list[str]:
    items = z.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [f"{e.reason}: {e.message}" for e in items]


def attachment(z: Zvolt, pv: str) -> Any:
    for va in client.StorageV1Api(z.cp.api).list_volume_attachment().items:
        if va.spec.source.persistent_volume_name == pv and va.spec.node_name == WORKER:
            return va
    return None


def attached(z: Zvolt, pv: str) -> Any:
    va = attachment(z, pv)
    return va if va is not None and va.status is not None and va.status.attached else None


# --- scenarios -----------------------------------------------------------------------

def detach_then_delete(z: Zvolt, ns: str, pod: str, claim: str, pv: Any) -> float:
    """Delete the pod and see the detach reach the target (attachment gone, the volume's host
    unlinked), then delete the claim and see its PV go; returns when the detach was seen."""
    handle = pv.spec.csi.volume_handle
    z.core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
    z.wait("VolumeAttachment deleted", lambda: None if attachment(z, pv.metadata.name) else True)
    z.wait("the volume's host unlinked on detach", lambda: None if z.storage.allowed_hosts(handle) else True)
    detached = time.monotonic()
    z.core.delete_namespaced_persistent_volume_claim(claim, ns)
    z.wait("PV deleted", partial(pv_gone, z, pv.metadata.name))
    return detached


def test_wait_for_first_consumer_pvc_schedules_binds_attaches_and_detaches(zvolt: Zvolt, ns: str) -> None:
    """PVC of the chart's zvolt-postgres class + a Pod: the scheduler picks the worker from
    CSIStorageCapacity and topology, the provisioner creates the zvol there, the attach-detach
    controller's VolumeAttachment becomes a ControllerPublish to the worker's host NQN."""
    z, t0 = zvolt, time.monotonic()
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("pgdata", sc="zvolt-postgres"))
    z.core.create_namespaced_pod(ns, consumer("db-0", "pgdata"))
    pv = bound_pv(z, ns, "pgdata")
    t_bound = time.monotonic() - t0
    assert scheduled_on(z, ns, "db-0") == WORKER
    capacities = client.StorageV1Api(z.cp.api).list_namespaced_csi_storage_capacity(z.chart.namespace).items
    assert any(c.storage_class_name == "zvolt-postgres" and c.capacity for c in capacities)
    handle = pv.spec.csi.volume_handle
    ds = z.storage.zvol(handle)
    assert z.storage.prop(ds, "volblocksize") == "8192"
    assert int(z.storage.prop(ds, "volsize")) == GiB
    assert z.storage.prop(ds, "zvolt:label:pvc-name") == "pgdata"
    va = z.wait("VolumeAttachment attached", lambda: attached(z, pv.metadata.name))
    assert va.status.attachment_metadata.get("nqn"), va.status.attachment_metadata
    # DH-HMAC-CHAP (the chart's default): the worker's host NQN of its own for this volume.
    assert z.storage.allowed_hosts(handle) == [z.storage.volume_host(handle)]
    t_attached = time.monotonic() - t0
    t_detached = detach_then_delete(z, ns, "db-0", "pgdata", pv) - t0
    z.wait("zvol destroyed", lambda: None if ds in z.storage.datasets() else True)
    z.say(f"k8s scenario WaitForFirstConsumer: Bound {t_bound:.1f} s, attached {t_attached:.1f} s, "
          f"detached {t_detached:.1f} s, deleted {time.monotonic() - t0:.1f} s")


def test_dhchap_keys_live_in_a_secret_per_pv_and_never_in_the_attachment(zvolt: Zvolt, ns: str) -> None:
    """DH-HMAC-CHAP, on by default (issue 12): a PVC of the chart's zvolt class + a Pod. The
    controller makes the Secret zvolt-dhchap-<PV name> in the release namespace at CreateVolume;
    the PV names it as its node-stage secret (what kubelet hands to NodeStageVolume); the
    VolumeAttachment's attachment metadata (publish_context, which anyone who may read
    VolumeAttachments reads) carries the mode and no key; the agent's nvmet host entry for the
    worker's host NQN of this volume holds exactly the Secret's keys; deleting the PVC deletes
    the Secret."""
    z, t0 = zvolt, time.monotonic()
    mode = client.StorageV1Api(z.cp.api).read_storage_class("zvolt").parameters.get("dhchap")
    assert mode in ("bidirectional", "unidirectional"), f"the chart's zvolt class has dhchap={mode!r}"
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("authdb", sc="zvolt"))
    z.core.create_namespaced_pod(ns, consumer("db-auth", "authdb"))
    pv = bound_pv(z, ns, "authdb")
    t_bound = time.monotonic() - t0
    name, where = names.dhchap_secret_name(pv.metadata.name), z.chart.namespace
    secret = z.core.read_namespaced_secret(name, where)  # made before the PV existed: no wait
    assert secret.type == "Opaque"
    assert {"app.kubernetes.io/managed-by": "zvolt", "zvolt.io/dhchap": "true"}.items() <= \
        (secret.metadata.labels or {}).items(), secret.metadata.labels
    keys = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    assert sorted(keys) == (["dhchapCtrlKey", "dhchapKey"] if mode == "bidirectional" else ["dhchapKey"])
    assert all(v.startswith("DHHC-1:") for v in keys.values()) and len(set(keys.values())) == len(keys)
    csi = pv.spec.csi
    assert (csi.node_stage_secret_ref.name, csi.node_stage_secret_ref.namespace) == (name, where)
    # The keys go to the node only: no controller-publish (or other) secret is named for them.
    assert csi.controller_publish_secret_ref is None and csi.node_publish_secret_ref is None
    assert (csi.volume_attributes or {}).get("dhchap") == mode

    va = z.wait("VolumeAttachment attached", lambda: attached(z, pv.metadata.name))
    t_attached = time.monotonic() - t0
    meta = dict(va.status.attachment_metadata or {})
    assert meta.get("dhchap") == mode and meta.get("nqn"), sorted(meta)
    leaked = sorted(k for k, v in meta.items() if v.startswith("DHHC-1") or any(key in v for key in keys.values()))
    assert leaked == [], f"publish_context entries holding key material: {leaked}"
    handle = csi.volume_handle
    host = z.storage.volume_host(handle)
    assert host != z.storage.node_id and z.storage.allowed_hosts(handle) == [host]
    auth = z.storage.host_auth(host)
    # Compared, never printed: they are the volume's secrets.
    same_key = auth.get("dhchap_key") == keys["dhchapKey"]
    same_ctrl = auth.get("dhchap_ctrl_key", "") == keys.get("dhchapCtrlKey", "")
    assert same_key, f"nvmet host {host}: dhchap_key is not the Secret's dhchapKey (attributes: {sorted(auth)})"
    assert same_ctrl, f"nvmet host {host}: dhchap_ctrl_key is not the Secret's dhchapCtrlKey"

    t_detached = detach_then_delete(z, ns, "db-auth", "authdb", pv) - t0
    z.wait(f"Secret {where}/{name} deleted with the volume", lambda: gone(lambda: z.core.read_namespaced_secret(
        name, where)))
    left = "kept" if z.storage.host_auth(host) else "removed"
    z.say(f"k8s scenario DH-HMAC-CHAP ({mode}): Bound with its Secret {t_bound:.1f} s, attached under the "
          f"volume's host NQN with the Secret's keys {t_attached:.1f} s, detached {t_detached:.1f} s, "
          f"PVC deleted and Secret gone {time.monotonic() - t0:.1f} s (nvmet host entry {left})")


def test_a_tls_class_keeps_its_psk_in_the_volumes_secret_and_exports_only_on_the_tls_port(
        zvolt: Zvolt, ns: str) -> None:
    """NVMe/TCP TLS (SECURITY.md 3a): a class with tls: psk. The controller adds the volume's PSK
    to its Secret at CreateVolume; the PV names that Secret for node staging; the
    VolumeAttachment's metadata says tls: psk and the TLS port, and holds no key; the agent
    links the subsystem to its TLS port (addr_tsas tls1.3) and nowhere else, and files the PSK
    in the kernel keyring under the worker's per-volume NQN; the detach takes the PSK out, the
    PVC's deletion the Secret. (The stand-in kubelet stages nothing: the handshake itself is in
    tests/lab/test_tls_lab.py.)"""
    z, t0 = zvolt, time.monotonic()
    sc = f"tls-{ns}"
    client.StorageV1Api(z.cp.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=sc), provisioner="csi.zvolt.io",
        parameters={"tls": "psk", **dhchap_parameters(z)}, volume_binding_mode="Immediate"))
    try:
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("tlsdb", sc=sc))
        z.core.create_namespaced_pod(ns, consumer("db-tls", "tlsdb"))
        pv = bound_pv(z, ns, "tlsdb")
        t_bound = time.monotonic() - t0
        name, where = names.dhchap_secret_name(pv.metadata.name), z.chart.namespace
        keys = {k: base64.b64decode(v).decode()
                for k, v in (z.core.read_namespaced_secret(name, where).data or {}).items()}
        psk = keys.get("tlsPsk", "")
        assert psk.startswith("NVMeTLSkey-1:01:"), sorted(keys)
        csi = pv.spec.csi
        assert (csi.node_stage_secret_ref.name, csi.node_stage_secret_ref.namespace) == (name, where)
        assert (csi.volume_attributes or {}).get("tls") == "psk"

        va = z.wait("VolumeAttachment attached", lambda: attached(z, pv.metadata.name))
        t_attached = time.monotonic() - t0
        meta = dict(va.status.attachment_metadata or {})
        assert meta.get("tls") == "psk" and meta.get("port") == "4421", sorted(meta.items())
        leaked = sorted(k for k, v in meta.items() if "NVMeTLSkey" in v or any(key in v for key in keys.values()))
        assert leaked == [], f"publish_context entries holding key material: {leaked}"
        handle = csi.volume_handle
        host = z.storage.volume_host(handle)
        assert z.storage.allowed_hosts(handle) == [host]
        assert z.storage.port_links(handle) == {"4421": "tls1.3"}
        node, local = names.split_volume_id(handle)
        identity = tlspsk.identity(psk, host, names.subsystem_nqn(node, local))
        assert z.storage.keyring_holds(identity)

        t_detached = detach_then_delete(z, ns, "db-tls", "tlsdb", pv) - t0
        assert not z.storage.keyring_holds(identity), "the detach took the PSK out of the keyring"
        z.wait(f"Secret {where}/{name} deleted with the volume", lambda: gone(
            lambda: z.core.read_namespaced_secret(name, where)))
        z.say(f"k8s scenario TLS class: Bound with the PSK in its Secret {t_bound:.1f} s, attached on the TLS "
              f"port only {t_attached:.1f} s, detached and PSK gone {t_detached:.1f} s, Secret gone "
              f"{time.monotonic() - t0:.1f} s")
    finally:
        with contextlib.suppress(ApiException):
            z.core.delete_namespaced_pod("db-tls", ns, grace_period_seconds=0)
        client.StorageV1Api(z.cp.api).delete_storage_class(sc)


def test_unusable_class_says_why_on_the_pvc(zvolt: Zvolt, ns: str) -> None:
    z = zvolt
    client.StorageV1Api(z.cp.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=f"typo-{ns}"), provisioner="csi.zvolt.io",
        parameters={"volblocksise": "8K"}, volume_binding_mode="WaitForFirstConsumer"))
    try:
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("typo", sc=f"typo-{ns}"))
        z.core.create_namespaced_pod(ns, consumer("db-typo", "typo"))
        found = z.wait("an event naming the bad parameter", lambda: [
            e for e in events(z, ns, "typo") if "unknown StorageClass parameter 'volblocksise'" in e] or None)
        assert found[0].startswith("ProvisioningFailed"), found
        # The scheduler chose the worker (capacity was published for the class), so the user
        # reads this reason instead of the scheduler's "did not have enough free storage".
        claim = z.core.read_namespaced_persistent_volume_claim("typo", ns)
        assert claim.metadata.annotations.get("volume.kubernetes.io/selected-node") == WORKER
    finally:
        z.core.delete_namespaced_pod("db-typo", ns, grace_period_seconds=0)
        client.StorageV1Api(z.cp.api).delete_storage_class(f"typo-{ns}")


def test_snapshot_restore_clone_expand_and_delete_in_any_order(zvolt: Zvolt, ns: str) -> None:
    z, t0 = zvolt, time.monotonic()
    times: dict[str, float] = {}
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("src"))
    src = bound_pv(z, ns, "src")
    times["src Bound"] = time.monotonic() - t0
    src_ds = z.storage.zvol(src.spec.csi.volume_handle)

    z.snaps.create_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots", snapshot("snap", "src"))
    z.snaps.create_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots", snapshot("keep", "src"))
    vs = ready_snapshot(z, ns, "snap")
    ready_snapshot(z, ns, "keep")
    times["snapshot readyToUse"] = time.monotonic() - t0
    assert vs["status"]["restoreSize"] in ("1Gi", str(GiB))
    content = z.snaps.get_cluster_custom_object(*SNAPSHOTS, "volumesnapshotcontents",
                                                vs["status"]["boundVolumeSnapshotContentName"])
    snap_handle = content["status"]["snapshotHandle"]
    snap_ds = f"{src_ds}@{snap_handle.partition('@')[2]}"
    assert snap_ds in z.storage.datasets()
    assert z.storage.prop(snap_ds, "zvolt:label:snapshot-name") == "snap"

    z.core.create_namespaced_persistent_volume_claim(
        ns, pvc("restored", source={"kind": "VolumeSnapshot", "name": "snap"}))
    z.core.create_namespaced_persistent_volume_claim(
        ns, pvc("branch", source={"kind": "PersistentVolumeClaim", "name": "src"}))
    restored, branch = bound_pv(z, ns, "restored"), bound_pv(z, ns, "branch")
    times["restore + branch Bound"] = time.monotonic() - t0
    assert z.storage.prop(z.storage.zvol(restored.spec.csi.volume_handle), "origin") == snap_ds
    assert z.storage.prop(z.storage.zvol(branch.spec.csi.volume_handle), "origin").startswith(src_ds + "@")

    z.core.patch_namespaced_persistent_volume_claim(
        "src", ns, {"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
    z.wait("PV grown to 2Gi", lambda: z.core.read_persistent_volume(src.metadata.name).spec.capacity["storage"]
           in ("2Gi", str(2 * GiB)) or None)
    assert int(z.storage.prop(src_ds, "volsize")) == 2 * GiB
    times["expanded"] = time.monotonic() - t0

    # Delete in any order: the snapshot before its restore, the parent before its branches.
    zvols = [z.storage.zvol(pv.spec.csi.volume_handle) for pv in (src, restored, branch)]
    family = {d for d in z.storage.datasets() if d.partition("@")[0] in zvols}
    assert len(family) >= 6, family  # 3 zvols, 2 snapshots, the branch's hidden snapshot
    z.snaps.delete_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots", "snap")
    z.core.delete_namespaced_persistent_volume_claim("src", ns)
    z.wait("snapshot content deleted", lambda: gone(lambda: z.snaps.get_cluster_custom_object(
        *SNAPSHOTS, "volumesnapshotcontents", content["metadata"]["name"])))
    z.wait("source PV deleted", partial(pv_gone, z, src.metadata.name))
    # The branches still read their data: their zvols are untouched.
    for pv in (restored, branch):
        assert z.storage.zvol(pv.spec.csi.volume_handle) in z.storage.datasets()
    # A snapshot outlives its PVC and still restores (ZFS reports no volblocksize for a
    # snapshot: the agent reads it from the volume kept in the trash).
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("late", source={"kind": "VolumeSnapshot", "name": "keep"}))
    late = bound_pv(z, ns, "late")
    times["restore after its source PVC was deleted Bound"] = time.monotonic() - t0
    late_ds = z.storage.zvol(late.spec.csi.volume_handle)
    assert z.storage.prop(late_ds, "volblocksize") == "16384"
    z.snaps.delete_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots", "keep")
    for claim in ("restored", "branch", "late"):
        z.core.delete_namespaced_persistent_volume_claim(claim, ns)
    for pv in (restored, branch, late):
        z.wait(f"PV {pv.metadata.name} deleted", partial(pv_gone, z, pv.metadata.name))
    family.add(late_ds)
    # The source was moved to the trash while branches lived; ZFS and the agent's GC finish.
    src_trash = f"{z.storage.lab.pool}/zvolt/trash/{src_ds.rpartition('/')[2]}-"
    z.wait("every zvol and snapshot of the family destroyed, trash included",
           lambda: None if any(d in family or d.startswith(src_trash) for d in z.storage.datasets()) else True)
    times["all deleted"] = time.monotonic() - t0
    z.say("k8s scenario snapshot/restore/branch/expand/delete: " +
          ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def test_thin_branch_of_a_volume_bigger_than_the_free_space_schedules(zvolt: Zvolt, ns: str) -> None:
    z, t0 = zvolt, time.monotonic()
    free = int(z.storage.prop(f"{z.storage.lab.pool}/zvolt", "available"))
    # More than the pool's free space, thin, so it costs nothing yet; the volume and its branch
    # (2.5x the pool between them) stay under the default commitment limit of 3x.
    big = f"{-(-free * 5 // 4 // GiB)}Gi"
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("big", size=big))
    big_pv = bound_pv(z, ns, "big")
    z.core.create_namespaced_persistent_volume_claim(
        ns, pvc("big-branch", size=big, sc="zvolt", source={"kind": "PersistentVolumeClaim", "name": "big"}))
    z.core.create_namespaced_pod(ns, consumer("db-branch", "big-branch"))
    branch_pv = bound_pv(z, ns, "big-branch")
    assert scheduled_on(z, ns, "db-branch") == WORKER
    z.say(f"k8s scenario thin branch of {big} on a pool with {free / GiB:.1f} GiB free: Bound in "
          f"{time.monotonic() - t0:.1f} s")
    z.core.delete_namespaced_pod("db-branch", ns, grace_period_seconds=0)
    z.wait("VolumeAttachment deleted", lambda: None if attachment(z, branch_pv.metadata.name) else True)
    for claim, pv in (("big", big_pv), ("big-branch", branch_pv)):
        z.core.delete_namespaced_persistent_volume_claim(claim, ns)
        z.wait(f"PV of {claim} deleted", partial(pv_gone, z, pv.metadata.name))


def kz(z: Zvolt, ns: str, *argv: str) -> str:
    out = io.StringIO()
    code = kubectl_zvolt.run(["--kubeconfig", str(z.cp.admin_kubeconfig), "-n", ns, *argv], out=out)
    assert code == 0, out.getvalue()
    return out.getvalue()


def test_kubectl_zvolt_against_the_api_server(zvolt: Zvolt, ns: str) -> None:
    z, t0 = zvolt, time.monotonic()
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("db"))
    bound_pv(z, ns, "db")
    assert "volumesnapshot/nightly readytouse" in kz(z, ns, "snapshot", "db", "nightly", "--wait", "--timeout", "240")
    assert "persistentvolumeclaim/db-restored bound" in kz(z, ns, "restore", "nightly", "db-restored", "--wait",
                                                            "--timeout", "240")
    assert "persistentvolumeclaim/db-branch bound" in kz(z, ns, "branch", "db", "db-branch", "--wait",
                                                          "--timeout", "240")
    listing = json.loads(kz(z, ns, "ls", "-o", "json"))
    assert {v["name"] for v in listing["volumes"]} == {"db", "db-restored", "db-branch"}
    assert [s["name"] for s in listing["snapshots"]] == ["nightly"]
    trees = json.loads(kz(z, ns, "tree", "-o", "json"))["trees"]
    assert [t["name"] for t in trees] == ["db"], trees
    for ref in ("snapshot/nightly", "pvc/db", "pvc/db-restored", "pvc/db-branch"):
        kz(z, ns, "delete", ref)
    z.wait("every PVC gone", lambda: None if z.core.list_namespaced_persistent_volume_claim(ns).items else True)
    z.say(f"k8s scenario kubectl zvolt snapshot/restore/branch/ls/tree/delete: {time.monotonic() - t0:.1f} s")


def test_a_live_moves_host_step_reaches_the_node_plugin_with_its_stage_secret(zvolt: Zvolt, ns: str) -> None:
    """`kubectl zvolt move` of a volume in use relays each host step to that host's node plugin
    (kubectl_zvolt/move.py Relay). On the real API server, with the chart's own objects: the host
    NQN leads to its node by CSINode, the node plugin DaemonSet's pod there gets the step with
    the chart's args as its process has them (kubelet's $(NODE_NAME) expanded), and the PV's
    node-stage Secret on stdin. The exec is recorded (stand-in kubelets run no container); the
    step itself runs on the real kernel in tests/lab/test_live_move_lab.py."""
    import csi.main
    from kubectl_zvolt.kube import Kube
    from kubectl_zvolt.move import NODE_CONTAINER, Relay

    z, t0 = zvolt, time.monotonic()
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("live"))
    pv = bound_pv(z, ns, "live")
    fullname = z.chart.controller.removesuffix("-controller")
    node_pod = wait_for("the node plugin DaemonSet's pod on the worker",
                        lambda: _agent_pod(z.cp, z.chart.namespace, f"{fullname}-node", WORKER), 120)
    z.kubelets.mark_running(z.chart.namespace, node_pod, "127.0.0.1")
    calls: list[tuple[str, str, str, list[str], dict[str, Any]]] = []

    def execute(namespace: str, pod: str, container: str, argv: Any, stdin: str | None = None) -> tuple[int, str]:
        calls.append((namespace, pod, container, list(argv), json.loads(stdin or "{}")))
        return 0, json.dumps({"ok": True, "connected": True, "seconds": 0.1})

    kube = Kube(z.cp.api, z.chart.namespace)
    plain = kube.get_pv(pv.metadata.name)
    assert plain is not None
    handle = pv.spec.csi.volume_handle
    ctx = {"nqn": names.subsystem_nqn(*names.split_volume_id(handle)), "transport": "tcp", "address": "10.45.0.2",
           "port": "4420", **(pv.spec.csi.volume_attributes or {})}
    gone = f"nqn.2026-11.io.zvolt:host:{GONE_WORKER}:{uuid.uuid4()}"
    answer = Relay(kube, execute, "csi.zvolt.io", plain).answer(
        {"op": "add", "volume_id": handle, "nodes": {z.storage.node_id: ctx, gone: ctx}})
    assert answer["ok"] is False and list(answer["failed"]) == [gone], answer
    assert "no running zvolt-node pod" in answer["failed"][gone]
    [(namespace, pod, container, argv, stdin)] = calls
    assert (namespace, pod, container) == (z.chart.namespace, node_pod, NODE_CONTAINER)
    args = csi.main.parser().parse_args(argv[1:])
    assert args.mode == "live-path" and args.node_id == WORKER, argv
    assert not any("DHHC-1" in a for a in argv)
    ref = pv.spec.csi.node_stage_secret_ref
    secret = z.core.read_namespaced_secret(ref.name, ref.namespace)
    assert stdin["secrets"] == {k: base64.b64decode(v).decode() for k, v in secret.data.items()}
    assert stdin["secrets"]["dhchapKey"].startswith("DHHC-1:")
    assert stdin["publish_context"] == ctx and stdin["volume_id"] == handle and stdin["op"] == "add"
    z.core.delete_namespaced_persistent_volume_claim("live", ns)
    z.say(f"k8s scenario live-move relay to the node plugin: {time.monotonic() - t0:.1f} s")


GONE_WORKER = "worker-gone"


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return str(resp.read().decode())


def test_stale_attachments_are_shown_and_cleared_and_attached_ones_kept(zvolt: Zvolt, ns: str) -> None:
    """A publish no VolumeAttachment wants (here: to a worker the cluster does not have, made
    through the controller's CSI socket) is listed as stale by `kubectl zvolt attachments` and
    unpublished by the controller's reconcile; the volume a Pod uses stays attached."""
    import grpc

    from zvolt.pb import csi_pb2, csi_pb2_grpc

    z, t0 = zvolt, time.monotonic()
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("kept"))
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("stray"))
    kept, stray = bound_pv(z, ns, "kept"), bound_pv(z, ns, "stray")
    z.core.create_namespaced_pod(ns, consumer("db-0", "kept"))
    z.wait("VolumeAttachment attached", lambda: attached(z, kept.metadata.name))
    kept_id, stray_id = kept.spec.csi.volume_handle, stray.spec.csi.volume_handle
    gone = f"nqn.2026-11.io.zvolt:host:{GONE_WORKER}:{uuid.uuid4()}"
    with grpc.insecure_channel(f"unix://{z.pod.path('/csi/csi.sock')}") as ch:
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
        # As the external-attacher calls it: with the PV's volume attributes (the DH-HMAC-CHAP
        # mode, with which the controller fetches the volume's keys for the agent).
        csi_pb2_grpc.ControllerStub(ch).ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=stray_id, node_id=gone, volume_capability=cap,
            volume_context=dict(stray.spec.csi.volume_attributes or {})), timeout=TIMEOUT)
    t_published = time.monotonic()
    assert z.storage.allowed_hosts(stray_id) == [z.storage.volume_host(stray_id, gone)]

    # The operator's view, exec'd into the controller container as kubectl would.
    if z.core.read_namespaced_pod(z.pod.identity.name, z.chart.namespace).status.phase != "Running":
        z.kubelets.mark_running(z.chart.namespace, z.pod.identity.name, "127.0.0.1")
    out = io.StringIO()
    code = kubectl_zvolt.run(["--kubeconfig", str(z.cp.admin_kubeconfig), "-n", z.chart.namespace, "attachments",
                              "-o", "json"], execute=local_exec(z.pod), out=out)
    assert code == 0, out.getvalue()
    rows = {(r["volume_id"], r["host_nqn"]): (r["node"], r["state"]) for r in json.loads(out.getvalue())["attachments"]}
    if (stray_id, gone) in rows:  # the reconcile may already have cleared it: that is the next check
        assert rows[(stray_id, gone)] == (GONE_WORKER, "stale"), rows
    assert rows[(kept_id, z.storage.node_id)] == (WORKER, "attached"), rows

    z.wait("the stray publish cleared by the reconcile", lambda: None if z.storage.allowed_hosts(stray_id) else True,
           timeout=TIMEOUT)
    t_cleared = time.monotonic() - t_published
    assert z.storage.allowed_hosts(kept_id) == [z.storage.volume_host(kept_id)] and attached(z, kept.metadata.name)
    # Two passes in a row, not one.
    assert t_cleared >= RECONCILE_S, f"cleared after {t_cleared:.1f} s: fewer than two passes"
    z.core.delete_namespaced_pod("db-0", ns, grace_period_seconds=0)
    z.wait("VolumeAttachment deleted", lambda: None if attachment(z, kept.metadata.name) else True)
    for name in ("kept", "stray"):
        z.core.delete_namespaced_persistent_volume_claim(name, ns)
    for pv in (kept, stray):
        z.wait("PV deleted", partial(pv_gone, z, pv.metadata.name))
    z.say(f"k8s scenario stale attachment: listed, cleared {t_cleared:.1f} s after the stray publish "
          f"(passes every {RECONCILE_S} s), attached volume kept; {time.monotonic() - t0:.1f} s in all")


def test_a_dead_storage_node_holds_up_only_what_was_sent_to_it(zvolt: Zvolt, ns: str) -> None:
    """A second storage node whose agent pod is Running but answers nothing (the node died and
    its DaemonSet pod stays): a new PVC still binds on the node that answers, without waiting
    on the dead one, because its PVC's placement record shows no attempt ever went there."""
    z, t0 = zvolt, time.monotonic()
    dead = "storage-dead"
    fullname = z.chart.controller.removesuffix("-controller")
    z.kubelets.register(NodeSpec(dead, labels=STORAGE_LABEL))
    try:
        pod = z.wait("the agent DaemonSet's pod on the dead node",
                     lambda: _agent_pod(z.cp, z.chart.namespace, f"{fullname}-agent", dead), 120)
        # Its address answers nothing: 127.0.0.2 is loopback, where no agent port is forwarded.
        z.kubelets.mark_running(z.chart.namespace, pod, "127.0.0.2")
        # Only once the controller knows the dead node does this show anything: its readiness
        # metric names it (discovery and the metric refresh every 30 s).
        metrics = f"http://127.0.0.1:{z.pod.port('metrics')}/metrics"
        z.wait("the controller sees the dead storage node",
               lambda: f'zvolt_csi_storage_node_ready{{node="{dead}"}} 0.0' in _get(metrics) or None, 150)
        t_known = time.monotonic() - t0
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("db"))
        pv = bound_pv(z, ns, "db")
        t_bound = time.monotonic() - t0
        assert pv.spec.csi.volume_handle.startswith(f"{storage.STORAGE_NODE}/")
        assert f'zvolt_csi_storage_node_ready{{node="{dead}"}} 0.0' in _get(metrics)
        claim = z.core.read_namespaced_persistent_volume_claim("db", ns)
        record = (claim.metadata.annotations or {}).get("csi.zvolt.io/placement")
        assert record == f"{pv.metadata.name}={storage.STORAGE_NODE}", claim.metadata.annotations
        z.core.delete_namespaced_persistent_volume_claim("db", ns)
        z.wait("PV deleted", partial(pv_gone, z, pv.metadata.name))
        z.say(f"k8s scenario dead storage node: known to the controller after {t_known:.1f} s, a new PVC "
              f"Bound on the live node {t_bound - t_known:.1f} s later, "
              f"deleted {time.monotonic() - t0:.1f} s")
    finally:
        z.kubelets.remove(dead)


def test_only_the_controller_certificate_changes_volumes(zvolt: Zvolt, ns: str) -> None:
    """The chart's own agent certificate (what root on any storage node holds), used as a
    client against the agent in the lab: it may read GetInfo, never publish a volume to itself;
    the controller, with the chart's controller certificate, did all the other scenarios."""
    import grpc

    from zvolt.pb import agent_pb2, agent_pb2_grpc

    z = zvolt
    z.core.create_namespaced_persistent_volume_claim(ns, pvc("victim"))
    handle = bound_pv(z, ns, "victim").spec.csi.volume_handle
    fullname = z.chart.controller.removesuffix("-controller")
    secret = z.core.read_namespaced_secret(f"{fullname}-agent-tls", z.chart.namespace).data
    files = {k: base64.b64decode(v) for k, v in secret.items()}
    ctrl = client.AppsV1Api(z.cp.api).read_namespaced_deployment(z.chart.controller, z.chart.namespace)
    server_name = next(a.split("=", 1)[1] for c in ctrl.spec.template.spec.containers for a in c.args or []
                       if a.startswith("--tls-server-name="))
    creds = grpc.ssl_channel_credentials(root_certificates=files["ca.crt"], private_key=files["tls.key"],
                                         certificate_chain=files["tls.crt"])
    target = z.storage.lab.grpc_target("agent")
    with grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", server_name)]) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        assert stub.GetInfo(agent_pb2.GetInfoRequest(), timeout=30).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.PublishVolume(agent_pb2.PublishVolumeRequest(
                volume_id=handle.split("/", 1)[1], host_nqn=f"nqn.2014-08.org.nvmexpress:uuid:{uuid.uuid4()}"),
                timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    assert z.storage.allowed_hosts(handle) == []
    z.core.delete_namespaced_persistent_volume_claim("victim", ns)
    z.say("k8s scenario roles: the chart's agent certificate as a client reads GetInfo, PublishVolume refused "
          "(PERMISSION_DENIED)")


def test_a_pvc_over_the_commitment_limit_says_so(zvolt: Zvolt, ns: str) -> None:
    z, t0 = zvolt, time.monotonic()
    parent = f"{z.storage.lab.pool}/zvolt"
    pool = sum(int(z.storage.prop(parent, p)) for p in ("available", "used"))
    sc = f"half-{ns}"
    client.StorageV1Api(z.cp.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=sc), provisioner="csi.zvolt.io",
        parameters={"commitmentRatio": "0.5"}, volume_binding_mode="Immediate"))
    try:
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("over", size=f"{-(-pool * 3 // 4 // GiB)}Gi", sc=sc))
        found = z.wait("an event naming the commitment limit", lambda: [
            e for e in events(z, ns, "over") if "commitment limit of the StorageClass (commitmentRatio)" in e] or None)
        assert found[0].startswith("ProvisioningFailed") and "0.5 x pool size" in found[0], found
        z.say(f"k8s scenario PVC over the class's commitment limit: event after {time.monotonic() - t0:.1f} s: "
              f"{found[0][:160]}")
    finally:
        z.core.delete_namespaced_persistent_volume_claim("over", ns)
        client.StorageV1Api(z.cp.api).delete_storage_class(sc)


def test_group_spread_keeps_a_statefulsets_claims_apart(zvolt: Zvolt, ns: str) -> None:
    """groupSpread=required through the real external-provisioner: the first claim of group
    data-pg binds and its PVC carries the group label the controller lists by; with one storage
    node the second claim is refused, naming the node that holds the first (csi/README.md)."""
    z, t0 = zvolt, time.monotonic()
    sc, pv_name = f"spread-{ns}", ""
    client.StorageV1Api(z.cp.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=sc), provisioner="csi.zvolt.io",
        parameters={"groupSpread": "required"}, volume_binding_mode="Immediate"))
    try:
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("data-pg-0", sc=sc))
        pv_name = bound_pv(z, ns, "data-pg-0").metadata.name
        claim = z.core.read_namespaced_persistent_volume_claim("data-pg-0", ns)
        assert (claim.metadata.labels or {}).get("csi.zvolt.io/group") == "data-pg", claim.metadata.labels
        t_bound = time.monotonic() - t0
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("data-pg-1", sc=sc))
        found = z.wait("an event naming the node that holds data-pg-0", lambda: [
            e for e in events(z, ns, "data-pg-1") if f"holding one already: {storage.STORAGE_NODE};" in e] or None)
        assert found[0].startswith("ProvisioningFailed") and f"'{ns}/data-pg'" in found[0], found
        assert z.core.read_namespaced_persistent_volume_claim("data-pg-1", ns).status.phase == "Pending"
        z.say(f"k8s scenario groupSpread: data-pg-0 Bound in {t_bound:.1f} s, data-pg-1 refused "
              f"{time.monotonic() - t0 - t_bound:.1f} s later: {found[0][:200]}")
    finally:
        for name in ("data-pg-0", "data-pg-1"):
            with contextlib.suppress(ApiException):
                z.core.delete_namespaced_persistent_volume_claim(name, ns)
        if pv_name:
            z.wait("PV deleted", partial(pv_gone, z, pv_name))
        client.StorageV1Api(z.cp.api).delete_storage_class(sc)


GROUPS = ("groupsnapshot.storage.k8s.io", "v1beta1")


def test_volume_group_snapshot_is_one_zfs_transaction_and_each_member_restores(zvolt: Zvolt, ns: str) -> None:
    """A VolumeGroupSnapshot of data + WAL claims (the CloudNativePG layout): snapshot-controller
    and csi-snapshotter (both with the CSIVolumeGroupSnapshot gate the chart sets) call
    CreateVolumeGroupSnapshot once; ZFS shows every member snapshot born in one transaction
    group; each member is an ordinary VolumeSnapshot that restores on its own."""
    z, t0 = zvolt, time.monotonic()
    times: dict[str, float] = {}
    claims = ("pgdata", "pgwal")
    for name in claims:
        claim = pvc(name)
        claim.metadata.labels = {"cluster": "pg-1"}
        z.core.create_namespaced_persistent_volume_claim(ns, claim)
    pvs = {name: bound_pv(z, ns, name) for name in claims}
    handles = {name: pv.spec.csi.volume_handle for name, pv in pvs.items()}
    times["2 PVCs Bound"] = time.monotonic() - t0
    z.snaps.create_namespaced_custom_object(*GROUPS, ns, "volumegroupsnapshots", {
        "apiVersion": "/".join(GROUPS), "kind": "VolumeGroupSnapshot", "metadata": {"name": "pg-1-backup"},
        "spec": {"volumeGroupSnapshotClassName": "zvolt",
                 "source": {"selector": {"matchLabels": {"cluster": "pg-1"}}}}})

    def group_ready() -> dict[str, Any] | None:
        vgs = z.snaps.get_namespaced_custom_object(*GROUPS, ns, "volumegroupsnapshots", "pg-1-backup")
        status = vgs.get("status") or {}
        if status.get("error"):
            raise AssertionError(f"VolumeGroupSnapshot: {status['error']}")
        return vgs if status.get("readyToUse") else None

    vgs = z.wait("VolumeGroupSnapshot readyToUse", group_ready)
    times["group snapshot readyToUse"] = time.monotonic() - t0
    content = z.snaps.get_cluster_custom_object(*GROUPS, "volumegroupsnapshotcontents",
                                                vgs["status"]["boundVolumeGroupSnapshotContentName"])
    pairs = {p["volumeHandle"]: p["snapshotHandle"] for p in content["status"]["volumeSnapshotHandlePairList"]}
    assert set(pairs) == set(handles.values()), pairs
    snap_ds = {name: f"{z.storage.zvol(h)}@{pairs[h].partition('@')[2]}" for name, h in handles.items()}
    txgs = {name: z.storage.prop(ds, "createtxg") for name, ds in snap_ds.items()}
    assert len(set(txgs.values())) == 1, f"member snapshots in different transaction groups: {txgs}"

    # The members are VolumeSnapshots in the namespace, owned by the group; restore the WAL one.
    members = {vs["status"]["boundVolumeSnapshotContentName"]: vs["metadata"]["name"]
               for vs in z.snaps.list_namespaced_custom_object(*SNAPSHOTS, ns, "volumesnapshots")["items"]
               if any(o["kind"] == "VolumeGroupSnapshot" for o in vs["metadata"].get("ownerReferences", []))
               and (vs.get("status") or {}).get("boundVolumeSnapshotContentName")}
    assert len(members) == 2, members
    by_handle = {}
    for content_name, vs_name in members.items():
        vsc = z.snaps.get_cluster_custom_object(*SNAPSHOTS, "volumesnapshotcontents", content_name)
        by_handle[vsc["status"]["snapshotHandle"]] = vs_name
    wal_member = by_handle[pairs[handles["pgwal"]]]
    ready_snapshot(z, ns, wal_member)
    z.core.create_namespaced_persistent_volume_claim(
        ns, pvc("wal-restored", source={"kind": "VolumeSnapshot", "name": wal_member}))
    restored = bound_pv(z, ns, "wal-restored")
    assert z.storage.prop(z.storage.zvol(restored.spec.csi.volume_handle), "origin") == snap_ds["pgwal"]
    times["member restored Bound"] = time.monotonic() - t0

    # Deleting the group deletes its members (class deletionPolicy Delete); the restored
    # volume keeps its origin until it goes, then nothing of the family is left.
    z.snaps.delete_namespaced_custom_object(*GROUPS, ns, "volumegroupsnapshots", "pg-1-backup")
    z.wait("group snapshot content deleted", lambda: gone(lambda: z.snaps.get_cluster_custom_object(
        *GROUPS, "volumegroupsnapshotcontents", content["metadata"]["name"])))
    z.wait("the data member's ZFS snapshot destroyed",
           lambda: None if snap_ds["pgdata"] in z.storage.datasets() else True)
    for claim in (*claims, "wal-restored"):
        z.core.delete_namespaced_persistent_volume_claim(claim, ns)
    zvols = {z.storage.zvol(h) for h in (*handles.values(), restored.spec.csi.volume_handle)}
    trash = tuple(f"{z.storage.lab.pool}/zvolt/trash/{d.rpartition('/')[2]}-" for d in zvols)
    z.wait("every zvol and snapshot of the group destroyed, trash included", lambda: None if any(
        d.partition("@")[0] in zvols or d.startswith(trash) for d in z.storage.datasets()) else True)
    times["all deleted"] = time.monotonic() - t0
    z.say("k8s scenario VolumeGroupSnapshot (2 members, one createtxg): " +
          ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def test_encrypted_class_rotates_its_key_in_place_and_attaches_with_the_new_one(
        zvolt: Zvolt, ns: str, tmp_path: Any) -> None:
    """An encrypted StorageClass whose key lives in a tenant Secret, readable by the sidecars
    through the chart's Role (controller.keySecrets): the provisioner's secret reaches
    CreateVolume, `kubectl zvolt rotate-key` changes the key of every volume of the class in
    place (zfs change-key, through the controller container, keys on stdin) and then the
    Secret, and the attacher's ControllerPublish with the new Secret loads it."""
    z, t0 = zvolt, time.monotonic()
    old, new = os.urandom(32).hex(), os.urandom(32).hex()
    # As an operator would: let the sidecars read key Secrets in this namespace (a Role, get only).
    key_readers(z, [ns])
    z.core.create_namespaced_secret(ns, client.V1Secret(metadata=client.V1ObjectMeta(name="db-key"),
                                                        string_data={"encryptionKey": old}))
    sc = f"enc-{ns}"
    refs = {f"csi.storage.k8s.io/{w}-secret-{p}": v for w in ("provisioner", "controller-publish", "controller-expand")
            for p, v in (("namespace", ns), ("name", "db-key"))}
    client.StorageV1Api(z.cp.api).create_storage_class(client.V1StorageClass(
        metadata=client.V1ObjectMeta(name=sc), provisioner="csi.zvolt.io",
        parameters={"encryption": "aes-256-gcm", **refs, **dhchap_parameters(z)}, volume_binding_mode="Immediate"))
    try:
        z.core.create_namespaced_persistent_volume_claim(ns, pvc("secret-db", sc=sc))
        pv = bound_pv(z, ns, "secret-db")
        handle = pv.spec.csi.volume_handle
        ds = z.storage.zvol(handle)
        assert z.storage.prop(ds, "encryption") == "aes-256-gcm"
        used = z.storage.prop(ds, "used")
        t_bound = time.monotonic() - t0

        def opens(key: str) -> bool:  # a dry-run load-key: is this the key of the volume's root?
            return z.storage.lab.run(["zfs", "load-key", "-n", "-L", "prompt", ds], input=key,
                                     check=False).returncode == 0

        assert opens(old) and not opens(new)
        keyfile = tmp_path / "new.key"
        keyfile.write_text(new + "\n")
        if z.core.read_namespaced_pod(z.pod.identity.name, z.chart.namespace).status.phase != "Running":
            z.kubelets.mark_running(z.chart.namespace, z.pod.identity.name, "127.0.0.1")
        out = io.StringIO()
        code = kubectl_zvolt.run(["--kubeconfig", str(z.cp.admin_kubeconfig), "-n", z.chart.namespace,
                                  "rotate-key", sc, "--new-key-file", str(keyfile)],
                                 execute_input=local_exec(z.pod), out=out)
        assert code == 0, out.getvalue()
        assert f"rotated {handle}" in out.getvalue()
        t_rotated = time.monotonic() - t0
        assert opens(new) and not opens(old)
        assert z.storage.prop(ds, "used") == used, "change-key copies no data"
        data = z.core.read_namespaced_secret("db-key", ns).data
        assert set(data) == {"encryptionKey"} and base64.b64decode(data["encryptionKey"]).decode() == new

        z.core.create_namespaced_pod(ns, consumer("db-0", "secret-db"))
        z.wait("VolumeAttachment attached with the rotated key", lambda: attached(z, pv.metadata.name))
        assert z.storage.allowed_hosts(handle) == [z.storage.volume_host(handle)]
        assert z.storage.prop(ds, "keystatus") == "available"
        t_attached = time.monotonic() - t0
        z.core.delete_namespaced_pod("db-0", ns, grace_period_seconds=0)
        z.wait("VolumeAttachment deleted", lambda: None if attachment(z, pv.metadata.name) else True)
        z.core.delete_namespaced_persistent_volume_claim("secret-db", ns)
        z.wait("PV deleted", partial(pv_gone, z, pv.metadata.name))
        z.say(f"k8s scenario encrypted class: Bound {t_bound:.1f} s, key rotated {t_rotated:.1f} s, "
              f"attached with the new key {t_attached:.1f} s")
    finally:
        with contextlib.suppress(ApiException):
            z.core.delete_namespaced_pod("db-0", ns, grace_period_seconds=0)
        client.StorageV1Api(z.cp.api).delete_storage_class(sc)
        key_readers(z, [])


def dhchap_parameters(z: Zvolt) -> dict[str, str]:
    """The DH-HMAC-CHAP parameters of the chart's classes: a class made here needs them too, since
    the chart's agents refuse a publish without keys."""
    chart_class = client.StorageV1Api(z.cp.api).read_storage_class("zvolt").parameters
    return {k: v for k, v in chart_class.items()
            if k == "dhchap" or k.startswith("csi.storage.k8s.io/node-stage-secret-")}


def key_readers(z: Zvolt, namespaces: list[str]) -> None:
    with helm_python.Config(kubeconfig_path=z.cp.admin_kubeconfig, namespace=z.chart.namespace) as cfg:
        cfg.upgrade(CHART, z.chart.release, {"controller": {"keySecrets": {"namespaces": namespaces}}},
                    namespace=z.chart.namespace, reuse_values=True, timeout=120)
