"""Smoke test of the real control plane: it comes up with RBAC, the chart installs, objects
round-trip, and the chart's controller sidecars run with their own ServiceAccount token and
talk to a zvolt-csi controller socket."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import grpc
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from zvolt.names import dhchap_secret_name
from zvolt.pb import csi_pb2, csi_pb2_grpc

from .chartpod import Chart, LocalPod, rejected_flags, run_container
from .controlplane import ControlPlane, Say, api_client, forbidden_lines
from .procs import Process, wait_for

pytestmark = pytest.mark.k8s

DRIVER = "csi.zvolt.io"
CONTROLLER_CONTAINER = "zvolt-controller"
# Lease names the sidecars elect on (lock names derived from the driver name).
LEASES = {
    "csi-provisioner": "csi-zvolt-io",
    "csi-attacher": "external-attacher-leader-csi-zvolt-io",
    "csi-resizer": "external-resizer-csi-zvolt-io",
    "csi-snapshotter": "external-snapshotter-leader-csi-zvolt-io",
}


def test_control_plane_is_up(cluster: ControlPlane, say: Say) -> None:
    version = client.VersionApi(cluster.api).get_code()
    assert version.git_version.startswith("v1.")
    core = client.CoreV1Api(cluster.api)
    assert {"default", "kube-system"} <= {ns.metadata.name for ns in core.list_namespace().items}
    assert core.list_node().items == []
    # RBAC is the authorizer, not AlwaysAllow: the scheduler may not read Secrets.
    attributes = client.V1ResourceAttributes(verb="list", resource="secrets", namespace="kube-system")
    review = client.AuthorizationV1Api(cluster.api).create_subject_access_review(client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(user="system:kube-scheduler", resource_attributes=attributes)))
    assert review.status.allowed is False
    # snapshot-controller runs with its own ServiceAccount and this suite's RBAC: nothing refused.
    snapshot_controller = cluster.procs.get("snapshot-controller")
    snapshot_controller.check()
    assert forbidden_lines(snapshot_controller.log_text()) == []
    say(f"k8s: kube-apiserver {version.git_version}; " +
        ", ".join(f"{k} {v:.1f} s" for k, v in cluster.timings.items()))


def test_namespace_and_pvc_round_trip(cluster: ControlPlane, zvolt_chart: Chart) -> None:
    core = client.CoreV1Api(cluster.api)
    ns = f"roundtrip-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels={"zvolt-test": "yes"})))
    pvc = client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name="pgdata", annotations={"zvolt.io/test": "round-trip"}),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], storage_class_name="zvolt-postgres",
            resources=client.V1VolumeResourceRequirements(requests={"storage": "20Gi"}),
        ),
    )
    core.create_namespaced_persistent_volume_claim(ns, pvc)
    got = core.read_namespaced_persistent_volume_claim("pgdata", ns)
    assert got.metadata.annotations["zvolt.io/test"] == "round-trip"
    assert got.spec.access_modes == ["ReadWriteOnce"]
    assert got.spec.storage_class_name == "zvolt-postgres"
    assert got.spec.resources.requests == {"storage": "20Gi"}
    assert got.status.phase == "Pending"

    # kube-controller-manager's PV controller (its own ServiceAccount) sees the class is
    # WaitForFirstConsumer: the claim waits for a pod instead of asking the provisioner.
    def waiting_event() -> bool | None:
        events = core.list_namespaced_event(ns, field_selector="involvedObject.name=pgdata").items
        return True if any(e.reason == "WaitForFirstConsumer" for e in events) else None

    wait_for("the WaitForFirstConsumer event", waiting_event, 60, watch=[cluster.procs.get("kube-controller-manager")])

    core.delete_namespace(ns)

    def gone() -> bool | None:
        try:
            core.read_namespace(ns)
        except ApiException as err:
            return True if err.status == 404 else None
        return None

    # The namespace controller empties and removes it.
    wait_for(f"namespace {ns} to be deleted", gone, 90, watch=[cluster.procs.get("kube-controller-manager")])


def test_chart_objects_exist(cluster: ControlPlane, zvolt_chart: Chart) -> None:
    storage = client.StorageV1Api(cluster.api)
    classes = {sc.metadata.name: sc for sc in storage.list_storage_class().items}
    for name, block in (("zvolt", "16K"), ("zvolt-postgres", "8K")):
        sc = classes[name]
        assert sc.provisioner == DRIVER
        assert sc.parameters["volblocksize"] == block
        assert sc.volume_binding_mode == "WaitForFirstConsumer"
        assert sc.allow_volume_expansion is True
    vsc: Any = client.CustomObjectsApi(cluster.api).get_cluster_custom_object(
        "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses", "zvolt")
    assert vsc["driver"] == DRIVER
    assert vsc["deletionPolicy"] == "Delete"
    driver = storage.read_csi_driver(DRIVER)
    assert driver.spec.attach_required is True
    assert driver.spec.storage_capacity is True
    deployment = client.AppsV1Api(cluster.api).read_namespaced_deployment(zvolt_chart.controller, zvolt_chart.namespace)
    assert deployment.spec.replicas == 1
    names = [c.name for c in deployment.spec.template.spec.containers]
    assert names[0] == CONTROLLER_CONTAINER
    assert {"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "liveness-probe"} <= set(names)


def _csi(pod: LocalPod) -> grpc.Channel:
    return grpc.insecure_channel(f"unix://{pod.path('/csi/csi.sock')}")


def _start_zvolt_csi(cluster: ControlPlane, pod: LocalPod, argv: list[str] | None = None) -> Process:
    proc = run_container(cluster, pod, CONTROLLER_CONTAINER, argv=argv)
    sock = pod.path("/csi/csi.sock")
    wait_for("zvolt-csi to serve", lambda: True if sock.exists() and '"serving"' in proc.log_text() else None,
             30, watch=[proc])
    return proc


def test_sidecars_connect_with_their_own_token(cluster: ControlPlane, controller_pod: LocalPod, say: Say) -> None:
    pod = controller_pod
    t0 = time.monotonic()
    exe = pod.containers[CONTROLLER_CONTAINER].argv[0]
    sock = pod.path("/csi/csi.sock")
    _start_zvolt_csi(cluster, pod, [exe, "--mode=controller", f"--endpoint=unix://{sock}",
                                    "--agents=storage-0=unix:///nonexistent", "--insecure"])
    say(f"k8s: zvolt-csi controller serving in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    with _csi(pod) as channel:
        ready = csi_pb2_grpc.IdentityStub(channel).Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value

    sidecars = {name: c for name, c in pod.containers.items() if name != CONTROLLER_CONTAINER}
    procs = {name: run_container(cluster, pod, name) for name in sidecars}
    refused: dict[str, list[str]] = {}
    died: dict[str, str] = {}
    time.sleep(2.0)  # a Go sidecar refuses an unknown flag at once
    for name, proc in procs.items():
        if not proc.alive():
            flags = rejected_flags(proc.log_text())
            if flags:
                refused[f"{name} ({sidecars[name].image} chart pin)"] = flags
            else:
                died[name] = proc.describe()
    assert not refused, f"sidecar binaries refused the chart's flags: {refused}"
    assert not died, "sidecars exited:\n" + "\n".join(died.values())

    # Each sidecar got an answer from the socket: the driver name, or a Probe's "not ready".
    def connected(proc: Process) -> bool | None:
        text = proc.log_text()
        return True if DRIVER in text or "CSI driver is not ready" in text else None

    for name, proc in procs.items():
        wait_for(f"{name} to reach zvolt-csi", partial(connected, proc), 60, watch=[proc])
    say(f"k8s: {len(procs)} sidecars connected to zvolt-csi in {time.monotonic() - t0:.1f} s (Probe ready={ready})")

    # livenessprobe serves /healthz from the Probe it forwards.
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{pod.port('healthz')}/healthz", timeout=10) as resp:
            code = resp.status
    except urllib.error.HTTPError as err:
        code = err.code
    assert code == (200 if ready else 500)

    if ready:
        # Past the Probe every controller sidecar elects a leader in the release namespace,
        # with the leader-election Role bound to the ServiceAccount.
        coordination = client.CoordinationV1Api(cluster.api)

        def held() -> dict[str, str] | None:
            leases = {lease.metadata.name: lease.spec.holder_identity or ""
                      for lease in coordination.list_namespaced_lease(pod.identity.namespace).items}
            want = {name: leases.get(lease, "") for name, lease in LEASES.items()}
            return want if all(want.values()) else None

        wait_for("every sidecar to hold its lease", held, 60, watch=list(procs.values()))
        say(f"k8s: all sidecar leases held {time.monotonic() - t0:.1f} s after start")
        time.sleep(3)  # informers list and watch right after election: a refusal shows by now
    refusals = {name: forbidden_lines(proc.log_text()) for name, proc in procs.items()}
    refusals = {k: v for k, v in refusals.items() if v}
    assert not refusals, "RBAC refused the chart's sidecars:\n" + json.dumps(refusals, indent=1)
    for proc in procs.values():
        proc.check()


def test_rbac_is_live_for_the_sidecar_token(cluster: ControlPlane, controller_pod: LocalPod) -> None:
    pod = controller_pod
    api = api_client(pod.kubeconfig)
    try:
        review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
        user = review.status.user_info
        assert user.username == f"system:serviceaccount:{pod.identity.namespace}:{pod.identity.service_account}"
        # The token is bound to the Pod the ReplicaSet created, like kubelet's projected token.
        assert user.extra["authentication.kubernetes.io/pod-name"] == [pod.identity.name]

        core = client.CoreV1Api(api)
        core.list_persistent_volume()  # the provisioner's ClusterRole allows it
        attempts: list[Callable[[], Any]] = [
            lambda: core.list_namespaced_secret(pod.identity.namespace),
            lambda: core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="not-allowed"))),
            lambda: client.StorageV1Api(api).delete_csi_driver(DRIVER),
            lambda: client.RbacAuthorizationV1Api(api).list_cluster_role(),
        ]
        for attempt in attempts:
            with pytest.raises(ApiException) as err:
                attempt()
            assert err.value.status == 403, err.value
    finally:
        api.close()


def test_controller_token_keeps_dhchap_secrets_in_the_release_namespace_only(
    cluster: ControlPlane, controller_pod: LocalPod, zvolt_chart: Chart
) -> None:
    """DH-HMAC-CHAP is on by default: with the controller pod's own token, the chart's Role lets
    it create, get and delete a volume's Secret in the release namespace, and nothing more
    (no list, watch or update there, no Secret anywhere else). The chart's classes name that
    Secret as their node-stage secret."""
    pod = controller_pod
    where = pod.identity.namespace
    for sc in ("zvolt", "zvolt-postgres"):
        par = client.StorageV1Api(cluster.api).read_storage_class(sc).parameters
        assert par["dhchap"] == "bidirectional"
        assert par["csi.storage.k8s.io/node-stage-secret-name"] == dhchap_secret_name("${pv.name}")
        assert par["csi.storage.k8s.io/node-stage-secret-namespace"] == where == zvolt_chart.namespace
    assert f"--dhchap-secret-namespace={where}" in pod.containers[CONTROLLER_CONTAINER].chart_argv
    api = api_client(pod.kubeconfig)
    name = dhchap_secret_name(f"pvc-{uuid.uuid4()}")
    try:
        core = client.CoreV1Api(api)
        core.create_namespaced_secret(where, client.V1Secret(metadata=client.V1ObjectMeta(name=name),
                                                             type="Opaque", string_data={"dhchapKey": "x"}))
        assert core.read_namespaced_secret(name, where).metadata.name == name
        refused: list[Callable[[], Any]] = [
            lambda: core.list_namespaced_secret(where),
            lambda: core.list_namespaced_secret(where, watch=True, timeout_seconds=1),
            lambda: core.patch_namespaced_secret(name, where, {"metadata": {"labels": {"x": "y"}}}),
            lambda: core.read_namespaced_secret(name, "default"),
            lambda: core.create_namespaced_secret("default", client.V1Secret(metadata=client.V1ObjectMeta(name=name))),
            lambda: core.list_secret_for_all_namespaces(),
        ]
        for attempt in refused:
            with pytest.raises(ApiException) as err:
                attempt()
            assert err.value.status == 403, err.value
        core.delete_namespaced_secret(name, where)
        with pytest.raises(ApiException) as err:
            core.read_namespaced_secret(name, where)
        assert err.value.status == 404
    finally:
        api.close()


def test_a_sidecar_with_another_service_account_is_refused(
    cluster: ControlPlane, controller_pod: LocalPod, zvolt_chart: Chart
) -> None:
    """The same csi-attacher argv with the node plugin's ServiceAccount (the chart gives it no
    permissions) is refused by RBAC; this also shows forbidden_lines() sees refusals."""
    pod = controller_pod
    exe = pod.containers[CONTROLLER_CONTAINER].argv[0]
    _start_zvolt_csi(cluster, pod, [exe, "--mode=controller", f"--endpoint=unix://{pod.path('/csi/csi.sock')}",
                                    "--agents=storage-0=unix:///nonexistent", "--insecure"])
    node_sa = f"{zvolt_chart.release}-node"
    other = cluster.service_account_kubeconfig(pod.identity.namespace, node_sa, pod.root / "node-sa.kubeconfig")
    argv = [f"--kubeconfig={other}" if a.startswith("--kubeconfig=") else a
            for a in pod.containers["csi-attacher"].argv]
    proc = run_container(cluster, pod, "csi-attacher", argv=argv)
    refused = wait_for("csi-attacher to be refused", lambda: forbidden_lines(proc.log_text()) or None, 60)
    assert f"system:serviceaccount:{pod.identity.namespace}:{node_sa}" in refused[0]


def test_chart_controller_container_runs_as_its_service_account(
    cluster: ControlPlane, controller_pod: LocalPod
) -> None:
    """The zvolt-controller container exactly as the chart runs it (agents discovered from
    Kubernetes, mTLS files from the chart's Secret), with the pod's token."""
    pod = controller_pod
    container = pod.containers[CONTROLLER_CONTAINER]
    assert any(a.startswith("--tls-cert=") and str(pod.volumes["tls"]) in a for a in container.argv)
    assert (pod.volumes["tls"] / "tls.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    proc = _start_zvolt_csi(cluster, pod)
    with _csi(pod) as channel:
        info = csi_pb2_grpc.IdentityStub(channel).GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
        assert info.name == DRIVER
        controller = csi_pb2_grpc.ControllerStub(channel)
        # No agent pods exist, so no volumes.
        listed = controller.ListVolumes(csi_pb2.ListVolumesRequest(), timeout=30)
        assert list(listed.entries) == []
        # An unknown storage node forces a fresh discovery: a pod list in the release namespace
        # with the pod's token, which the agent-discovery Role allows (a refusal would be an
        # UNKNOWN error here, not "no known agent").
        with pytest.raises(grpc.RpcError) as err:
            controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="storage-9/vabc"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "no known agent" in str(err.value.details())
    assert "forbidden" not in proc.log_text().lower()
    proc.check()
