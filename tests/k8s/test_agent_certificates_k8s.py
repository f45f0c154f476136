"""Per-node agent certificates against the real API server (no lab guest needed).

The chart is installed with its defaults (tls.agentCertificates=perNode) as a second release in
its own namespace; its controller container runs as a local process with its own pod-bound
ServiceAccount token and is the signer. Agent pods are real DaemonSet pods the scheduler bound
to stand-in storage nodes; tokens bound to them carry the node name that kube-apiserver records
in each CertificateSigningRequest (spec.extra). The agent side is the agent's own code
(agent/certrequest.py) with such a token.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from agent import certrequest
from csi.agents import AgentEndpoint, AgentPool, TlsFiles
from zvolt.errors import ZvoltError
from zvolt.pb import agent_pb2 as pb

from .chartpod import helm_install, helm_uninstall, local_pod, project_commands, run_container
from .conftest import CHART_VALUES
from .controlplane import ControlPlane, Say, api_client
from .nodes import Kubelets, NodeSpec
from .procs import wait_for

pytestmark = pytest.mark.k8s

RELEASE, NAMESPACE = "certs", "zvolt-certs"
FULL = f"{RELEASE}-zvolt"
NODES = ("certs-storage-0", "certs-storage-1")
# A second release beside the session's: its own driver name, and no cluster-scoped classes.
# tls.agentCertificates is left at the chart's default, perNode.
VALUES: dict[str, Any] = {
    "controller": {"replicas": 1}, "storageNetwork": CHART_VALUES["storageNetwork"],
    "driverName": "certs.zvolt.io", "storageClasses": [],
    "volumeSnapshotClass": {"enabled": False}, "volumeGroupSnapshotClass": {"enabled": False},
}


def agent_pod(cp: ControlPlane, node: str) -> client.V1Pod | None:
    pods = client.CoreV1Api(cp.api).list_namespaced_pod(
        NAMESPACE, label_selector="app.kubernetes.io/component=agent").items
    return next((p for p in pods if p.spec.node_name == node and p.metadata.deletion_timestamp is None), None)


def csr_api(cp: ControlPlane, namespace: str, account: str, pod: client.V1Pod | None, path: Path) -> Any:
    bound = (pod.metadata.name, pod.metadata.uid) if pod is not None else None
    kubeconfig = cp.service_account_kubeconfig(namespace, account, path, pod=bound)
    return certrequest.KubernetesCsrApi(api_client(kubeconfig))


def condition(cp: ControlPlane, name: str) -> tuple[str, str]:
    csr = client.CertificatesV1Api(cp.api).read_certificate_signing_request(name)
    conds = csr.status.conditions or []
    return (conds[-1].type, conds[-1].message) if conds else ("", "")


def test_agent_gets_a_certificate_for_its_own_node_only(cluster: ControlPlane, say: Say, tmp_path: Path) -> None:
    t0 = time.monotonic()
    helm_install(cluster, RELEASE, NAMESPACE, VALUES)
    kubelets = Kubelets(cluster.api)
    procs = []
    try:
        for node in NODES:
            kubelets.register(NodeSpec(node, labels={"zvolt.io/storage-node": "true"}))
        pods = {n: wait_for(f"the agent pod bound to {n}", partial(agent_pod, cluster, n), 120) for n in NODES}
        controller = local_pod(cluster, NAMESPACE, f"{FULL}-controller", commands=project_commands())
        procs.append(run_container(cluster, controller, "zvolt-controller"))
        core = client.CoreV1Api(cluster.api)
        ca_file = tmp_path / "agent-ca.crt"
        ca_file.write_bytes(base64.b64decode(core.read_namespaced_secret(f"{FULL}-agent-ca", NAMESPACE).data["ca.crt"]))
        say(f"k8s certs: release {RELEASE} (perNode), 2 storage nodes, controller signer up in "
            f"{time.monotonic() - t0:.1f} s")

        # 1. The agent pod on certs-storage-0, with its own token, gets its node's certificate.
        t1 = time.monotonic()
        own = csr_api(cluster, NAMESPACE, f"{FULL}-agent", pods[NODES[0]], tmp_path / "agent0.kubeconfig")
        keeper = certrequest.NodeCertificate(own, NODES[0], str(tmp_path / "state0"), str(ca_file), 3600, timeout=60)
        cert = keeper.ensure()
        assert cert.subject.rfc4514_string() == f"CN={NODES[0]}"
        say(f"k8s certs: {NODES[0]} issued its own serving certificate in {time.monotonic() - t1:.1f} s")

        # 2. The same pod's token asking for the other node's name: denied, with the reason.
        liar = certrequest.NodeCertificate(own, NODES[1], str(tmp_path / "liar"), str(ca_file), 3600, timeout=60)
        with pytest.raises(certrequest.CertRequestError, match=f"runs on node '{NODES[0]}'") as denied:
            liar.ensure()
        name = str(denied.value).split()[2]
        assert condition(cluster, name)[0] == "Denied"

        # 3. Another ServiceAccount, allowed by RBAC to ask, with a pod on the right node: not signed.
        intruder = intruder_pod(cluster, NODES[0])
        other = csr_api(cluster, NAMESPACE, "intruder", intruder, tmp_path / "intruder.kubeconfig")
        with pytest.raises(certrequest.CertRequestError, match="only the agent ServiceAccount"):
            certrequest.NodeCertificate(other, NODES[0], str(tmp_path / "i"), str(ca_file), 3600, timeout=60).ensure()

        # 4. The agent ServiceAccount's token not bound to a pod (no node in it): not signed.
        unbound = csr_api(cluster, NAMESPACE, f"{FULL}-agent", None, tmp_path / "unbound.kubeconfig")
        with pytest.raises(certrequest.CertRequestError, match="names no pod and node"):
            certrequest.NodeCertificate(unbound, NODES[0], str(tmp_path / "u"), str(ca_file), 3600,
                                        timeout=60).ensure()
        issued = [c for c in client.CertificatesV1Api(cluster.api).list_certificate_signing_request(
            field_selector="spec.signerName=zvolt.io/agent-serving").items if c.status.certificate]
        assert [c.spec.extra["authentication.kubernetes.io/node-name"] for c in issued] == [[NODES[0]]]

        # 5. The controller, with the chart's controller certificate, accepts that certificate
        # where it dials certs-storage-0 and refuses it where it dials certs-storage-1.
        refused_elsewhere(cluster, keeper.paths, ca_file, tmp_path)
        say(f"k8s certs: other node's name denied, other ServiceAccount and unbound token not signed; "
            f"controller refuses the certificate for the other node; {time.monotonic() - t0:.1f} s in all")
    finally:
        cluster.procs.stop(procs)
        for node in NODES:
            kubelets.remove(node)
        kubelets.close()
        helm_uninstall(cluster, RELEASE, NAMESPACE)
        with contextlib.suppress(ApiException):
            client.RbacAuthorizationV1Api(cluster.api).delete_cluster_role_binding("certs-intruder-csr")
        with contextlib.suppress(ApiException):
            client.CoreV1Api(cluster.api).delete_namespace(NAMESPACE)


def intruder_pod(cp: ControlPlane, node: str) -> client.V1Pod:
    core, rbac = client.CoreV1Api(cp.api), client.RbacAuthorizationV1Api(cp.api)
    core.create_namespaced_service_account(NAMESPACE, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="intruder")))
    rbac.create_cluster_role_binding(client.V1ClusterRoleBinding(
        metadata=client.V1ObjectMeta(name="certs-intruder-csr"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=f"{FULL}-agent-csr"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="intruder", namespace=NAMESPACE)]))
    pod: client.V1Pod = core.create_namespaced_pod(NAMESPACE, client.V1Pod(
        metadata=client.V1ObjectMeta(name="intruder"),
        spec=client.V1PodSpec(node_name=node, service_account_name="intruder",
                              containers=[client.V1Container(name="c", image="busybox")])))
    return pod


def refused_elsewhere(cp: ControlPlane, paths: certrequest.Paths, ca_file: Path, tmp_path: Path) -> None:
    from agent.fakes import FakeZfs, _Ds
    from agent.index import Index
    from agent.main import build, parse_settings
    from agent.nvmet import Root

    secret = client.CoreV1Api(cp.api).read_namespaced_secret(f"{FULL}-controller-tls", NAMESPACE).data
    files = {}
    for key in ("tls.crt", "tls.key", "ca.crt"):
        files[key] = tmp_path / f"controller-{key}"
        files[key].write_bytes(base64.b64decode(secret[key]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = parse_settings(["--node-name", NODES[0], "--pool", "tank", "--nvme-listen", "10.42.0.1:4420",
                               "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "agent-state"),
                               "--tls-cert", str(paths.cert), "--tls-key", str(paths.key), "--tls-ca", str(ca_file),
                               "--controller-cn", f"{FULL}-controller", "--move-listen", "off"], env={})
    zfs = FakeZfs()
    zfs.ds["tank"] = _Ds("filesystem")
    root = Root(str(tmp_path / "configfs"), emulate=True)
    root.init_tree()
    index = Index(settings.state_dir)
    agent = build(settings, zfs, root, index)
    agent.server.start()
    agent.recovery.run()
    tls = TlsFiles(str(files["tls.crt"]), str(files["tls.key"]), str(files["ca.crt"]))
    try:
        for node, ok in ((NODES[0], True), (NODES[1], False)):
            pool = AgentPool(partial(list, [AgentEndpoint(node, f"127.0.0.1:{port}")]), tls, timeout=10,
                             per_node_names=True)
            try:
                if ok:
                    assert pool.get(node).call("GetInfo", pb.GetInfoRequest()).node_name == NODES[0]
                else:
                    with pytest.raises(ZvoltError) as err:
                        pool.get(node).call("GetInfo", pb.GetInfoRequest())
                    assert err.value.code == grpc.StatusCode.UNAVAILABLE
            finally:
                pool.close()
    finally:
        agent.server.stop(None)
        index.close()
