"""A real kubelet in the lab guest, joined to the real control plane on the host (issue 15, item 2).

kubelet (from $ZVOLT_K8S_BIN) and bookworm's containerd run in the guest; the guest reaches the
host's kube-apiserver through the qemu guestfwd (lab/kubenode.py). The node registers with a
system:node client certificate (Node authorizer), images come from the OCI archives of
`zvolt-lab oci-image --all`, pods get their address from the CNI bridge. Skips in one line
without the binaries or the archives.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from lab import kubenode
from tests.k8s.conftest import cluster, k8s_bins, say  # noqa: F401  (the k8s suite's fixtures)
from tests.k8s.controlplane import Say

# The shared fixtures are imported by name so pytest finds them here.
from tests.lab.kubelab import (  # noqa: F401
    POD_TIMEOUT,
    Node,
    inputs,
    node,
    wait,
)

# slow: ~25 min on a cold guest under TCG (most of it containerd unpacking zvolt's image), so it
# stays out of scripts/test's default run: `python -m pytest tests/lab/test_kubelet_lab.py`.
pytestmark = [pytest.mark.lab, pytest.mark.slow]

NAMESPACE = "default"


def test_node_registers_ready_through_the_node_authorizer(node: Node) -> None:  # noqa: F811
    got = node.core.read_node(kubenode.NODE_NAME)
    info = got.status.node_info
    assert info.container_runtime_version.startswith("containerd://1.6"), info.container_runtime_version
    assert info.kubelet_version.startswith("v1."), info.kubelet_version
    addresses = {(a.type, a.address) for a in got.status.addresses}
    assert ("InternalIP", kubenode.NODE_IP) in addresses, addresses
    # Written by the kubelet itself (its system:node certificate), not by a stand-in as admin.
    managers = {f.manager for f in got.metadata.managed_fields or []}
    assert "kubelet" in managers, managers
    # Its heartbeat Lease may follow Ready by a few seconds (a warm node is Ready in ~20 s).
    leases = client.CoordinationV1Api(node.cluster.api)

    def lease() -> Any:
        try:
            return leases.read_namespaced_lease(kubenode.NODE_NAME, "kube-node-lease")
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    got_lease = wait("the node's Lease", lease, 120, lambda: node.lab.service_log(kubenode.KUBELET_SERVICE, 40))
    assert got_lease.spec.holder_identity == kubenode.NODE_NAME


def test_pod_runs_on_the_cni_bridge_with_the_local_pause_image(node: Node, say: Say) -> None:  # noqa: F811
    name = "kubelet-lab-web"
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace=NAMESPACE),
        spec=client.V1PodSpec(
            automount_service_account_token=False,
            termination_grace_period_seconds=2,
            containers=[client.V1Container(
                name="web", image=node.zvolt_image, image_pull_policy="Never",
                command=["python3", "-m", "http.server", "8080", "--directory", "/"],
                readiness_probe=client.V1Probe(tcp_socket=client.V1TCPSocketAction(port=8080), period_seconds=2),
            )],
        ),
    )
    t0 = time.monotonic()
    node.core.create_namespaced_pod(NAMESPACE, pod)
    try:
        def running() -> Any:
            p = node.core.read_namespaced_pod(name, NAMESPACE)
            ready = [c for c in p.status.conditions or [] if c.type == "Ready" and c.status == "True"]
            return p if p.status.phase == "Running" and ready else None

        def why() -> str:
            p = node.core.read_namespaced_pod(name, NAMESPACE)
            events = node.core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={name}")
            return f"{p.status}\n" + "\n".join(f"{e.reason}: {e.message}" for e in events.items) + "\n" + \
                node.lab.service_log(kubenode.KUBELET_SERVICE, 40)

        got = wait(f"pod {name} Running and Ready", running, POD_TIMEOUT, why)
        seconds = time.monotonic() - t0
        say(f"kubelet lab: pod {name} Running and Ready {seconds:.1f} s after create, IP {got.status.pod_ip}")
        assert got.spec.node_name == kubenode.NODE_NAME
        assert ipaddress.ip_address(got.status.pod_ip) in ipaddress.ip_network(kubenode.POD_SUBNET)
        # The node reaches the pod across the bridge: the pod's own server answers.
        answer = node.lab.run(["python3", "-c", "import sys, urllib.request; "
                               "print(urllib.request.urlopen(sys.argv[1], timeout=20).status)",
                               f"http://{got.status.pod_ip}:8080/"], timeout=60)
        assert answer.stdout.strip() == "200"
        # The sandbox is the project's pause image (containerd's sandbox_image), not a pulled one.
        containers = node.lab.run(["ctr", "-n", kubenode.CONTAINERD_NAMESPACE, "containers", "ls"], timeout=60).stdout
        assert kubenode.SANDBOX_IMAGE in containers, containers
    finally:
        node.core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=2)

    def gone() -> bool:
        try:
            node.core.read_namespaced_pod(name, NAMESPACE)
        except ApiException as err:
            return bool(err.status == 404)
        return False

    wait(f"pod {name} deleted by the kubelet", gone, 120, lambda: node.lab.service_log(kubenode.KUBELET_SERVICE, 40))

