"""The user's path on a real kubelet (issue 15, item 3): `helm install` of charts/zvolt with the
local images, Postgres on a zvolt PVC, `kubectl zvolt branch --checkpoint`, a second Postgres on
the branch, a pod deleted and started again, and `helm uninstall` leaving nothing behind in the
guest.

The lab guest is storage node and worker at once (lab/kubenode.py). Its one address,
10.0.2.15 (qemu's user network), is the storage network: agent and node plugin run on the host
network there, so NVMe/TCP goes from the guest to itself, and the guards drop pod traffic to
it. Skips in one line without the k8s binaries or the image archives.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubectl_zvolt.kube import Kube, stream_exec
from lab import kubenode
from lab.guest import Lab
from tests.k8s.chartpod import helm_install, helm_uninstall
from tests.k8s.conftest import cluster, k8s_bins, say  # noqa: F401  (the k8s suite's fixtures)
from tests.k8s.controlplane import Obj, Say

# The shared fixtures are imported by name so pytest finds them here.
from tests.lab.kubelab import (  # noqa: F401
    POD_TIMEOUT,
    Node,
    inputs,
    node,
    wait,
)
from zvolt.names import split_volume_id, subsystem_nqn

# slow: a cold guest spends most of its time unpacking images under TCG; opt-in like
# test_kubelet_lab.py: `python -m pytest tests/lab/test_helm_lab.py`.
pytestmark = [pytest.mark.lab, pytest.mark.slow]

RELEASE = "zvolt"
SYSTEM_NS = "zvolt-system"
NS = "default"
STORAGE_CLASS = "zvolt-postgres"
STORAGE_LABEL = ("zvolt.io/storage-node", "true")  # values.yaml agent.nodeSelector
POSTGRES_UID = 999  # lab/images/postgres: the image's postgres user
DATA_DIR = "/var/lib/postgresql/data"  # the image's PGDATA is a subdirectory of it
SIZE = "1Gi"
KUBECTL_ZVOLT = Path(sys.executable).with_name("kubectl-zvolt")
GONE_TIMEOUT = 300.0


def nested(dotted: dict[str, str]) -> Obj:
    """{"sidecars.provisioner.tag": "v5.1.0"} -> {"sidecars": {"provisioner": {"tag": "v5.1.0"}}}."""
    out: Obj = {}
    for key, value in dotted.items():
        *path, last = key.split(".")
        cur = out
        for part in path:
            cur = cur.setdefault(part, {})
        cur[last] = value
    return out


def merge(a: Obj, b: Obj) -> Obj:
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def chart_values(kn: Node) -> Obj:
    """The chart's own defaults but for what the lab changes: the images imported into
    containerd (never pulled), the guest's pool, its address as the storage network, one
    controller replica (one node)."""
    values: Obj = {
        "image": {"pullPolicy": "Never"},
        "sidecars": {"pullPolicy": "Never"},
        "storageNetwork": {"cidr": f"{kubenode.NODE_IP}/32"},
        "agent": {"pool": kn.lab.pool},
        "controller": {"replicas": 1},
    }
    for image in kn.images.values():
        values = merge(values, nested(image.helm_set))
    return values


def pods_ready(core: Any, namespace: str, selector: str, count: int) -> list[Any] | None:
    pods = [p for p in core.list_namespaced_pod(namespace, label_selector=selector).items
            if p.metadata.deletion_timestamp is None]
    ready = [p for p in pods if p.status.phase == "Running"
             and all(c.ready for c in p.status.container_statuses or [])
             and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
    return ready if len(ready) == count else None


def explain(kn: Node, namespace: str, selector: str = "") -> Callable[[], str]:
    def why() -> str:
        lines = []
        for p in kn.core.list_namespaced_pod(namespace, label_selector=selector).items:
            states = [(c.name, c.ready, c.restart_count, c.state) for c in p.status.container_statuses or []]
            lines.append(f"pod {p.metadata.name} {p.status.phase}: {states}")
        events = kn.core.list_namespaced_event(namespace).items
        lines += [f"{e.involved_object.kind}/{e.involved_object.name} {e.reason}: {e.message}" for e in events[-30:]]
        return "\n".join(lines) + "\nkubelet log:\n" + kn.lab.service_log(kubenode.KUBELET_SERVICE, 40)
    return why


def postgres_pod(kn: Node, name: str, claim: str) -> Any:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace=NS, labels={"app": name}),
        spec=client.V1PodSpec(
            automount_service_account_token=False,
            termination_grace_period_seconds=20,
            # OnRootMismatch: kubelet's recursive fsGroup pass (CSIDriver fsGroupPolicy: File) would
            # make an existing PGDATA group-writable on every new pod (a branch, a restart), and
            # Postgres refuses to start on it ("data directory ... has invalid permissions").
            security_context=client.V1PodSecurityContext(run_as_user=POSTGRES_UID, run_as_group=POSTGRES_UID,
                                                         fs_group=POSTGRES_UID,
                                                         fs_group_change_policy="OnRootMismatch"),
            containers=[client.V1Container(
                name="postgres", image=kn.images["postgres"].refs[0], image_pull_policy="Never",
                volume_mounts=[client.V1VolumeMount(name="data", mount_path=DATA_DIR)],
                readiness_probe=client.V1Probe(_exec=client.V1ExecAction(command=["pg_isready", "-q"]),
                                               period_seconds=2, timeout_seconds=10),
            )],
            volumes=[client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=claim))],
        ),
    )


def pvc(name: str) -> Any:
    return client.V1PersistentVolumeClaim(
        metadata=client.V1ObjectMeta(name=name, namespace=NS),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], storage_class_name=STORAGE_CLASS,
            resources=client.V1VolumeResourceRequirements(requests={"storage": SIZE})),
    )


def start_postgres(kn: Node, name: str, claim: str) -> Any:
    kn.core.create_namespaced_pod(NS, postgres_pod(kn, name, claim))
    return wait(f"Postgres pod {name} Ready", lambda: pods_ready(kn.core, NS, f"app={name}", 1), POD_TIMEOUT,
                explain(kn, NS, f"app={name}"))[0]


def psql(kn: Node, pod: str, sql: str) -> str:
    run = stream_exec(Kube(kn.cluster.api, NS))
    code, out = run(NS, pod, "postgres", ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-U", "postgres",
                                          "-d", "postgres", "-c", sql])
    assert code == 0, f"psql in {pod} exited {code}: {out}"
    return out.strip()


def delete_pod(kn: Node, name: str) -> None:
    try:
        kn.core.delete_namespaced_pod(name, NS)
    except ApiException as err:
        if err.status != 404:
            raise

    def gone() -> bool:
        try:
            kn.core.read_namespaced_pod(name, NS)
        except ApiException as err:
            return bool(err.status == 404)
        return False

    wait(f"pod {name} gone", gone, GONE_TIMEOUT, explain(kn, NS))


def volume_nqn(kn: Node, claim: str) -> str:
    got = kn.core.read_namespaced_persistent_volume_claim(claim, NS)
    pv = kn.core.read_persistent_volume(got.spec.volume_name)
    return subsystem_nqn(*split_volume_id(pv.spec.csi.volume_handle))


def guest_lines(lab: Lab, argv: list[str]) -> list[str]:
    return [line for line in lab.run(argv, timeout=120).stdout.splitlines() if line.strip()]


def connected_nqns(lab: Lab) -> list[str]:
    """Subsystem NQNs of the guest's NVMe controllers (the node plugin's connections)."""
    return guest_lines(lab, ["sh", "-c", "cat /sys/class/nvme/*/subsysnqn 2>/dev/null || true"])


def exported_nqns(lab: Lab) -> list[str]:
    return guest_lines(lab, ["ls", "/sys/kernel/config/nvmet/subsystems"])


def zvolt_mounts(lab: Lab) -> list[str]:
    return [line for line in guest_lines(lab, ["cat", "/proc/mounts"])
            if "/dev/nvme" in line or "kubernetes.io~csi" in line or "csi.zvolt.io" in line]


def zvols(lab: Lab) -> list[str]:
    return guest_lines(lab, ["zfs", "list", "-H", "-o", "name", "-t", "volume,snapshot", "-r", lab.pool])


def delete_claims(kn: Node) -> None:
    """The Postgres pods, then their claims (branch first); what is already gone is fine."""
    for name in ("pg-branch", "pg-0"):
        delete_pod(kn, name)
    for name in ("pg-branch", "pg-0"):
        try:
            kn.core.delete_namespaced_persistent_volume_claim(name, NS)
        except ApiException as err:
            if err.status != 404:
                raise


def settle(what: str, check: Callable[[], bool], timeout: float = GONE_TIMEOUT) -> bool:
    """Like wait, without failing: for clean-up, whose result the test asserts afterwards."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            print(f"helm lab: {what}: not within {timeout:.0f}s", file=sys.stderr)
            return False
        time.sleep(2)
    return True


def test_helm_install_postgres_branch_reattach_uninstall(node: Node, say: Say) -> None:  # noqa: F811
    core, lab, cp = node.core, node.lab, node.cluster
    storage = client.StorageV1Api(cp.api)
    # The operator's step before the install (README): the storage node carries the label.
    core.patch_node(kubenode.NODE_NAME, {"metadata": {"labels": {STORAGE_LABEL[0]: STORAGE_LABEL[1]}}})

    t_install = time.monotonic()
    helm_install(cp, RELEASE, SYSTEM_NS, chart_values(node), timeout=300)
    say(f"helm lab: helm install in {time.monotonic() - t_install:.1f} s")
    try:
        for component in ("agent", "node", "controller"):
            wait(f"the {component} pod Running and Ready", partial(
                pods_ready, core, SYSTEM_NS, f"app.kubernetes.io/component={component}", 1), POD_TIMEOUT,
                explain(node, SYSTEM_NS))
            say(f"helm lab: {component} pod Ready {time.monotonic() - t_install:.1f} s after helm install")
        images = {c.image for p in core.list_namespaced_pod(SYSTEM_NS).items for c in p.spec.containers}
        assert images <= {ref for i in node.images.values() for ref in i.refs}, images
        sc = storage.read_storage_class(STORAGE_CLASS)
        assert sc.provisioner == "csi.zvolt.io" and sc.parameters["volblocksize"] == "8K", sc

        # Postgres on a zvolt claim, and rows in it.
        core.create_namespaced_persistent_volume_claim(NS, pvc("pg-0"))
        start_postgres(node, "pg-0", "pg-0")
        first_ready = time.monotonic() - t_install
        say(f"helm lab: helm install -> first Postgres pod Ready: {first_ready:.1f} s")
        psql(node, "pg-0", "CREATE TABLE t (n int, origin text); "
                           "INSERT INTO t SELECT g, 'main' FROM generate_series(1, 1000) g")

        # The plugin, as a user runs it, against the cluster's admin kubeconfig.
        t_branch = time.monotonic()
        branch = subprocess.run([str(KUBECTL_ZVOLT), "branch", "--kubeconfig", str(cp.admin_kubeconfig), "-n", NS,
                                 "pg-0", "pg-branch", "--checkpoint", "--wait", "--timeout", "600"],
                                capture_output=True, text=True, timeout=700, check=False)
        assert branch.returncode == 0, branch.stdout + branch.stderr
        assert "checkpointed pg-0/postgres" in branch.stdout, branch.stdout
        start_postgres(node, "pg-branch", "pg-branch")
        branch_ready = time.monotonic() - t_branch
        say(f"helm lab: kubectl zvolt branch -> branch pod Ready: {branch_ready:.1f} s ({branch.stdout.strip()})")
        assert psql(node, "pg-branch", "SELECT count(*) FROM t WHERE origin = 'main'") == "1000"
        psql(node, "pg-branch", "INSERT INTO t SELECT g, 'branch' FROM generate_series(1, 10) g")
        assert psql(node, "pg-branch", "SELECT count(*) FROM t") == "1010"
        assert psql(node, "pg-0", "SELECT count(*) FROM t") == "1000"  # the source does not see the branch

        # Delete the pod: its volume is detached (VolumeAttachment gone, no NVMe controller to
        # its subsystem, no subsystem exported), then a new pod attaches it again.
        nqn = volume_nqn(node, "pg-0")
        assert nqn in connected_nqns(lab)
        t_detach = time.monotonic()
        delete_pod(node, "pg-0")
        pv_name = core.read_namespaced_persistent_volume_claim("pg-0", NS).spec.volume_name

        def detached() -> bool:
            attachments = storage.list_volume_attachment().items
            return (not any(a.spec.source.persistent_volume_name == pv_name for a in attachments)
                    and nqn not in connected_nqns(lab) and nqn not in exported_nqns(lab))

        wait(f"volume of pg-0 ({nqn}) detached", detached, GONE_TIMEOUT, explain(node, NS))
        say(f"helm lab: pg-0 deleted and its volume detached in {time.monotonic() - t_detach:.1f} s")
        t_again = time.monotonic()
        start_postgres(node, "pg-0", "pg-0")
        assert nqn in connected_nqns(lab)
        say(f"helm lab: pg-0 started again and Ready in {time.monotonic() - t_again:.1f} s")
        assert psql(node, "pg-0", "SELECT count(*) FROM t") == "1000"
        psql(node, "pg-0", "INSERT INTO t VALUES (1001, 'main')")

        # Claims first (the controller deletes their volumes), then the release.
        delete_claims(node)
        wait("every PV deleted", lambda: not core.list_persistent_volume().items, GONE_TIMEOUT,
             explain(node, SYSTEM_NS))
        wait("every zvol destroyed", lambda: not zvols(lab), GONE_TIMEOUT, lambda: "\n".join(zvols(lab)))
    finally:
        # Also after a failure: what the test made goes while the driver still runs.
        delete_claims(node)
        settle("PVs deleted", lambda: not core.list_persistent_volume().items)
        t_uninstall = time.monotonic()
        helm_uninstall(cp, RELEASE, SYSTEM_NS)
        settle("the release's pods gone", lambda: not core.list_namespaced_pod(SYSTEM_NS).items)
        say(f"helm lab: helm uninstall, pods gone in {time.monotonic() - t_uninstall:.1f} s")
    assert not core.list_namespaced_pod(SYSTEM_NS).items
    assert zvols(lab) == []
    assert exported_nqns(lab) == []
    assert connected_nqns(lab) == []
    assert zvolt_mounts(lab) == []
