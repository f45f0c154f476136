"""The user's path on a real kubelet (issue 15, item 3): `helm install` of charts/zvolt with the
local images, Postgres on a zvolt PVC, `kubectl zvolt branch --checkpoint`, a second Postgres on
the branch, a pod deleted and started again, and `helm uninstall` leaving nothing behind in the
guest. Between install and uninstall, on the same release, what only a kubelet does with a
volume (item 4): fsGroup, a read-only mount, online expansion, a kubelet restart and a node
plugin restart under a writing pod, a raw block volume.

The lab guest is storage node and worker at once (lab/kubenode.py). Its one address,
10.0.2.15 (qemu's user network), is the storage network: agent and node plugin run on the host
network there, so NVMe/TCP goes from the guest to itself, and the guards drop pod traffic to
it. Skips in one line without the k8s binaries or the image archives.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from zvolt.names import (
    DHCHAP_SECRET_PREFIX,
    dhchap_secret_name,
    split_volume_id,
    subsystem_nqn,
    volume_host_id,
    volume_host_nqn,
)

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

# The node behaviours of item 4: pods of the Postgres image running a shell script.
TEST_LABEL = "zvolt.io/lab=helm"
FS_CLASS = "zvolt"  # ext4
WRITER_UID = 1000  # not the owner of the volume root: the pod writes there through fsGroup only
FS_GROUP = 2345
MOUNT = "/data"
BEAT = 9  # bytes of one heartbeat record, "%08d\n"
# The writer appends one record every half second with O_DSYNC (each reaches the device, not
# only the page cache) and never exits: a failed write leaves it asleep, so a restart of the
# container cannot hide the failure and restartCount stays a fact about the pod.
WRITER_SCRIPT = (
    f'i=$(( $(stat -c %s {MOUNT}/beat 2>/dev/null || echo 0) / {BEAT} )); '
    f'while printf "%08d\\n" "$i" | dd of={MOUNT}/beat bs={BEAT} seek="$i" oflag=dsync conv=notrunc status=none; '
    'do i=$((i + 1)); sleep 0.5; done; '
    'echo "zvolt lab: heartbeat write $i failed" >&2; exec sleep 1000000'
)
IDLE_SCRIPT = "exec sleep 1000000"
BLOCK_DEVICE = "/dev/zvolt-data"
BLOCK_OFFSET_MIB = 5  # where the pattern goes: past what a stray filesystem superblock would use
CONTAINER = "main"
READY_AGAIN = 180.0  # kubelet restarted: until exec answers again
RECONCILE_SECONDS = 30  # then the new kubelet's volume manager has had several passes


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
        delete_claim(kn, name)


def settle(what: str, check: Callable[[], bool], timeout: float = GONE_TIMEOUT) -> bool:
    """Like wait, without failing: for clean-up, whose result the test asserts afterwards."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            print(f"helm lab: {what}: not within {timeout:.0f}s", file=sys.stderr)
            return False
        time.sleep(2)
    return True


# --- the shared release ------------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    """The chart installed once for the module; every test below runs against it."""

    node: Node
    installed_at: float  # time.monotonic() at `helm install`

    @property
    def storage(self) -> Any:
        return client.StorageV1Api(self.node.cluster.api)


def remove_test_objects(kn: Node) -> None:
    """Every pod and claim this module made; what is already gone is fine."""
    delete_claims(kn)
    for pod in kn.core.list_namespaced_pod(NS, label_selector=TEST_LABEL).items:
        delete_pod(kn, pod.metadata.name)
    for got in kn.core.list_namespaced_persistent_volume_claim(NS, label_selector=TEST_LABEL).items:
        delete_claim(kn, got.metadata.name)


@pytest.fixture(scope="module")
def release(node: Node, say: Say) -> Iterator[Release]:  # noqa: F811
    core, cp = node.core, node.cluster
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
        yield Release(node=node, installed_at=t_install)
    finally:
        # Also after a failure: what the tests made goes while the driver still runs. After
        # test_helm_uninstall_leaves_nothing_behind this finds nothing to do.
        remove_test_objects(node)
        settle("PVs deleted", lambda: not core.list_persistent_volume().items)
        helm_uninstall(cp, RELEASE, SYSTEM_NS)
        settle("the release's pods gone", lambda: not core.list_namespaced_pod(SYSTEM_NS).items)


def test_helm_install_postgres_branch_reattach(release: Release, say: Say) -> None:  # noqa: F811
    kn = release.node
    core, lab = kn.core, kn.lab
    storage = release.storage
    images = {c.image for p in core.list_namespaced_pod(SYSTEM_NS).items for c in p.spec.containers}
    assert images <= {ref for i in kn.images.values() for ref in i.refs}, images
    sc = storage.read_storage_class(STORAGE_CLASS)
    assert sc.provisioner == "csi.zvolt.io" and sc.parameters["volblocksize"] == "8K", sc

    # Postgres on a zvolt claim, and rows in it.
    core.create_namespaced_persistent_volume_claim(NS, pvc("pg-0"))
    start_postgres(kn, "pg-0", "pg-0")
    first_ready = time.monotonic() - release.installed_at
    say(f"helm lab: helm install -> first Postgres pod Ready: {first_ready:.1f} s")
    psql(kn, "pg-0", "CREATE TABLE t (n int, origin text); "
                     "INSERT INTO t SELECT g, 'main' FROM generate_series(1, 1000) g")

    # The plugin, as a user runs it, against the cluster's admin kubeconfig.
    cp = kn.cluster
    t_branch = time.monotonic()
    branch = subprocess.run([str(KUBECTL_ZVOLT), "branch", "--kubeconfig", str(cp.admin_kubeconfig), "-n", NS,
                             "pg-0", "pg-branch", "--checkpoint", "--wait", "--timeout", "600"],
                            capture_output=True, text=True, timeout=700, check=False)
    assert branch.returncode == 0, branch.stdout + branch.stderr
    assert "checkpointed pg-0/postgres" in branch.stdout, branch.stdout
    start_postgres(kn, "pg-branch", "pg-branch")
    branch_ready = time.monotonic() - t_branch
    say(f"helm lab: kubectl zvolt branch -> branch pod Ready: {branch_ready:.1f} s ({branch.stdout.strip()})")
    assert psql(kn, "pg-branch", "SELECT count(*) FROM t WHERE origin = 'main'") == "1000"
    psql(kn, "pg-branch", "INSERT INTO t SELECT g, 'branch' FROM generate_series(1, 10) g")
    assert psql(kn, "pg-branch", "SELECT count(*) FROM t") == "1010"
    assert psql(kn, "pg-0", "SELECT count(*) FROM t") == "1000"  # the source does not see the branch

    # DH-HMAC-CHAP, the chart's default: the PV names its Secret for kubelet, which handed the
    # keys to the node plugin; the worker's controller runs under the per-volume host NQN with
    # that key; the VolumeAttachment holds no key.
    nqn = volume_nqn(kn, "pg-0")
    assert nqn in connected_nqns(lab)
    dhchap_in_use(kn, release, "pg-0", nqn)
    t_detach = time.monotonic()
    delete_pod(kn, "pg-0")
    pv_name = core.read_namespaced_persistent_volume_claim("pg-0", NS).spec.volume_name

    def detached() -> bool:
        return (not attachments_of(release, pv_name)
                and nqn not in connected_nqns(lab) and nqn not in exported_nqns(lab))

    wait(f"volume of pg-0 ({nqn}) detached", detached, GONE_TIMEOUT, explain(kn, NS))
    say(f"helm lab: pg-0 deleted and its volume detached in {time.monotonic() - t_detach:.1f} s")
    t_again = time.monotonic()
    start_postgres(kn, "pg-0", "pg-0")
    assert nqn in connected_nqns(lab)
    say(f"helm lab: pg-0 started again and Ready in {time.monotonic() - t_again:.1f} s")
    assert psql(kn, "pg-0", "SELECT count(*) FROM t") == "1000"
    psql(kn, "pg-0", "INSERT INTO t VALUES (1001, 'main')")

    # Claims first (the controller deletes their volumes): their zvols go too. This test runs
    # first in the module: no other claim exists yet.
    delete_claims(kn)
    wait("every PV deleted", lambda: not core.list_persistent_volume().items, GONE_TIMEOUT,
         explain(kn, SYSTEM_NS))
    wait("every zvol destroyed", lambda: not zvols(lab), GONE_TIMEOUT, lambda: "\n".join(zvols(lab)))
    assert not dhchap_secrets(kn), "each volume's DH-HMAC-CHAP Secret goes with it"


def dhchap_secrets(kn: Node) -> list[str]:
    return [s.metadata.name for s in kn.core.list_namespaced_secret(SYSTEM_NS).items
            if s.metadata.name.startswith(DHCHAP_SECRET_PREFIX)]


def dhchap_in_use(kn: Node, release: Release, claim: str, nqn: str) -> None:
    pv = kn.core.read_persistent_volume(kn.core.read_namespaced_persistent_volume_claim(claim, NS).spec.volume_name)
    ref = pv.spec.csi.node_stage_secret_ref
    assert ref is not None and (ref.name, ref.namespace) == (dhchap_secret_name(pv.metadata.name), SYSTEM_NS), ref
    data = kn.core.read_namespaced_secret(ref.name, SYSTEM_NS).data
    keys = {k: base64.b64decode(v).decode() for k, v in data.items()}
    assert sorted(keys) == ["dhchapCtrlKey", "dhchapKey"], sorted(keys)  # the chart's default: bidirectional
    meta = [a.status.attachment_metadata or {} for a in attachments_of(release, pv.metadata.name)]
    assert meta and all(m.get("dhchap") == "bidirectional" for m in meta), meta
    assert not [v for m in meta for v in m.values() if "DHHC-1" in v], "a key in the VolumeAttachment"
    node_id = release.storage.read_csi_node(kubenode.NODE_NAME).spec.drivers[0].node_id
    local = split_volume_id(pv.spec.csi.volume_handle)[1]
    code = f"""
import glob, json, os
for d in sorted(glob.glob('/sys/class/nvme/nvme*')):
    if open(d + '/subsysnqn').read().strip() == {nqn!r}:
        print(json.dumps({{a: open(d + '/' + a).read().strip() for a in ('hostnqn', 'hostid', 'dhchap_secret',
                                                                       'dhchap_ctrl_secret')}}))
"""
    seen = [json.loads(line) for line in kn.lab.py(code).stdout.splitlines() if line.startswith("{")]
    want = {"hostnqn": volume_host_nqn(node_id, local), "hostid": volume_host_id(node_id, local),
            "dhchap_secret": keys["dhchapKey"], "dhchap_ctrl_secret": keys["dhchapCtrlKey"]}
    # Compared, never printed: they are the volume's secrets.
    shown = [{k: v if "secret" not in k else ("<the Secret's>" if v == want[k] else "<other>") for k, v in c.items()}
             for c in seen]
    assert seen == [want], shown


# --- node behaviour only a kubelet shows (issue 15, item 4) ------------------------------------



def labelled(name: str) -> Any:
    key, value = TEST_LABEL.split("=")
    return client.V1ObjectMeta(name=name, namespace=NS, labels={key: value, "app": name})


def claim(name: str, *, block: bool = False, size: str = SIZE) -> Any:
    return client.V1PersistentVolumeClaim(
        metadata=labelled(name),
        spec=client.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteOnce"], storage_class_name=FS_CLASS,
            volume_mode="Block" if block else "Filesystem",
            resources=client.V1VolumeResourceRequirements(requests={"storage": size})),
    )


def shell_pod(kn: Node, name: str, claim_name: str, script: str, *, block: bool = False,
              read_only: bool = False) -> Any:
    """A pod of the Postgres image running `sh -c script` with the claim at MOUNT (or, block,
    the device at BLOCK_DEVICE, as root: the device node is root's)."""
    security = (client.V1PodSecurityContext(run_as_user=0, run_as_group=0) if block else
                client.V1PodSecurityContext(run_as_user=WRITER_UID, run_as_group=WRITER_UID, fs_group=FS_GROUP))
    container = client.V1Container(
        name=CONTAINER, image=kn.images["postgres"].refs[0], image_pull_policy="Never", command=["sh", "-c", script])
    if block:
        container.volume_devices = [client.V1VolumeDevice(name="data", device_path=BLOCK_DEVICE)]
    else:
        container.volume_mounts = [client.V1VolumeMount(name="data", mount_path=MOUNT)]
    return client.V1Pod(
        metadata=labelled(name),
        spec=client.V1PodSpec(
            automount_service_account_token=False, termination_grace_period_seconds=2,
            security_context=security, containers=[container],
            volumes=[client.V1Volume(name="data", persistent_volume_claim=client.V1PersistentVolumeClaimVolumeSource(
                claim_name=claim_name, read_only=read_only))],
        ),
    )


def start_pod(kn: Node, pod: Any) -> tuple[Any, float]:
    """Create, wait Running and Ready; the pod and the seconds that took."""
    name = pod.metadata.name
    t0 = time.monotonic()
    kn.core.create_namespaced_pod(NS, pod)
    got = wait(f"pod {name} Ready", lambda: pods_ready(kn.core, NS, f"app={name}", 1), POD_TIMEOUT,
               explain(kn, NS, f"app={name}"))[0]
    return got, time.monotonic() - t0


def pod_exec(kn: Node, pod: str, argv: list[str]) -> tuple[int, str]:
    return stream_exec(Kube(kn.cluster.api, NS))(NS, pod, CONTAINER, argv)


def delete_claim(kn: Node, name: str) -> None:
    try:
        kn.core.delete_namespaced_persistent_volume_claim(name, NS)
    except ApiException as err:
        if err.status != 404:
            raise


def attachments_of(release: Release, pv: str) -> list[Any]:
    return [a for a in release.storage.list_volume_attachment().items if a.spec.source.persistent_volume_name == pv]


def publish_dir(pod_uid: str, pv: str) -> str:
    """Where kubelet has the node plugin publish a filesystem volume for a pod."""
    return f"/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~csi/{pv}/mount"


def mount_of(lab: Lab, target: str) -> list[str] | None:
    """The /proc/mounts fields of the mount at target in the guest, None if nothing is mounted there."""
    found = [line.split() for line in guest_lines(lab, ["cat", "/proc/mounts"])]
    return next((f for f in found if len(f) > 3 and f[1] == target), None)


def mounts_of_volume(lab: Lab, pv: str, device: str) -> list[str]:
    """Its publish mounts (their paths name the PV) and its staging mount (named by a hash of
    the volume handle: found by its device)."""
    return [line for line in guest_lines(lab, ["cat", "/proc/mounts"]) if pv in line or line.split()[0] == device]


def container_state(kn: Node, pod: str) -> tuple[str, str, int, str]:
    """(pod uid, container id, restart count, phase): what a restart of the pod would change."""
    got = kn.core.read_namespaced_pod(pod, NS)
    status = got.status.container_statuses[0]
    return got.metadata.uid, status.container_id, status.restart_count, got.status.phase


@dataclass(frozen=True)
class Writer:
    """A pod that keeps writing to a filesystem claim (WRITER_SCRIPT), as fsGroup's user."""

    pod: str
    claim: str
    pv: str
    nqn: str
    uid: str
    ready_seconds: float

    @property
    def target(self) -> str:
        return publish_dir(self.uid, self.pv)


@pytest.fixture(scope="module")
def writer(release: Release) -> Iterator[Writer]:
    kn = release.node
    kn.core.create_namespaced_persistent_volume_claim(NS, claim("kl-fs"))
    try:
        pod, seconds = start_pod(kn, shell_pod(kn, "kl-writer", "kl-fs", WRITER_SCRIPT))
        pv = kn.core.read_namespaced_persistent_volume_claim("kl-fs", NS).spec.volume_name
        yield Writer(pod="kl-writer", claim="kl-fs", pv=pv, nqn=volume_nqn(kn, "kl-fs"), uid=pod.metadata.uid,
                     ready_seconds=seconds)
    finally:
        for name in ("kl-reader", "kl-writer"):
            delete_pod(kn, name)
        delete_claim(kn, "kl-fs")


def beats(lab: Lab, w: Writer) -> int:
    """Heartbeats the writer has written, read in the guest from the published mount (works
    while kubelet is down: no exec)."""
    out = lab.run(["stat", "-c", "%s", f"{w.target}/beat"], check=False, timeout=60)
    return int(out.stdout) // BEAT if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def beats_grow(lab: Lab, w: Writer, what: str, timeout: float = 60) -> int:
    before = beats(lab, w)
    return int(wait(f"the writer's heartbeat advancing {what}", lambda: (n := beats(lab, w)) > before and n,
                    timeout, lambda: f"stuck at {before} records; writer log:\n" + log_of(lab, w.pod)))


def log_of(lab: Lab, pod: str) -> str:
    return "\n".join(guest_lines(lab, ["sh", "-c", f"tail -n 20 /var/log/pods/{NS}_{pod}_*/*/*.log 2>&1 || true"]))


def df_total(kn: Node, pod: str) -> int:
    code, out = pod_exec(kn, pod, ["df", "-P", "-B1", MOUNT])
    assert code == 0, out
    return int(out.strip().splitlines()[-1].split()[1])


def test_fs_group_applied_by_kubelet(writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    """CSIDriver fsGroupPolicy File: kubelet gives the volume to the pod's fsGroup."""
    kn = release.node
    code, out = pod_exec(kn, writer.pod, ["stat", "-c", "%n %u %g %a", MOUNT, f"{MOUNT}/lost+found"])
    assert code == 0, out
    got = {name: (int(uid), int(gid), int(mode, 8)) for name, uid, gid, mode in (line.split() for line in
                                                                               out.strip().splitlines())}
    root, lost = got[MOUNT], got[f"{MOUNT}/lost+found"]
    # mkfs made both root:root, 0755 and 0700: kubelet's pass turned them to the group, with
    # group rwx and setgid (so what the pod creates joins the group too).
    assert root[1] == FS_GROUP and root[2] & 0o2070 == 0o2070, f"volume root {root} (uid, gid, mode): {out}"
    assert lost[1] == FS_GROUP and lost[2] & 0o2070 == 0o2070, f"lost+found {lost}: {out}"
    assert root[0] != WRITER_UID  # the pod writes there through its group, nothing else
    beats_grow(kn.lab, writer, "(the non-root pod writes to the volume root)")
    code, out = pod_exec(kn, writer.pod, ["stat", "-c", "%u %g", f"{MOUNT}/beat"])
    assert code == 0 and out.split() == [str(WRITER_UID), str(FS_GROUP)], out
    say(f"helm lab: fsGroup: writer pod (uid {WRITER_UID}, fsGroup {FS_GROUP}) Ready in {writer.ready_seconds:.1f} s;"
        f" volume root gid {root[1]} mode {root[2]:o}, lost+found gid {lost[1]} mode {lost[2]:o}")


def test_read_only_mount(writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    """A second pod with the claim readOnly: it reads what the writer wrote, its writes fail
    with EROFS, while the writer's own mount stays writable."""
    kn = release.node
    reader, seconds = start_pod(kn, shell_pod(kn, "kl-reader", writer.claim, IDLE_SCRIPT, read_only=True))
    try:
        code, out = pod_exec(kn, "kl-reader", ["head", "-c", str(BEAT), f"{MOUNT}/beat"])
        assert (code, out) == (0, "00000000\n"), (code, out)
        code, out = pod_exec(kn, "kl-reader", ["sh", "-c", f"echo x > {MOUNT}/ro-probe"])
        assert code != 0 and "Read-only file system" in out, (code, out)
        mount = mount_of(kn.lab, publish_dir(reader.metadata.uid, writer.pv))
        assert mount is not None and "ro" in mount[3].split(","), mount
        beats_grow(kn.lab, writer, "beside the read-only pod")
    finally:
        t_delete = time.monotonic()
        delete_pod(kn, "kl-reader")
    say(f"helm lab: read-only: reader pod Ready in {seconds:.1f} s (same node, volume already staged); write "
        f"failed with EROFS, read worked; deleted in {time.monotonic() - t_delete:.1f} s")


def test_online_expansion_seen_by_the_pod(writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    kn = release.node
    before_state = container_state(kn, writer.pod)
    before = df_total(kn, writer.pod)
    t0 = time.monotonic()
    kn.core.patch_namespaced_persistent_volume_claim(writer.claim, NS, {"spec": {"resources": {"requests": {
        "storage": "2Gi"}}}})
    after = wait("the pod's filesystem grown", lambda: (t := df_total(kn, writer.pod)) > before + 2**29 and t,
                 POD_TIMEOUT, explain(kn, NS))
    t_fs = time.monotonic() - t0

    def capacity() -> Any:
        got = kn.core.read_namespaced_persistent_volume_claim(writer.claim, NS).status.capacity or {}
        return got.get("storage") == "2Gi"

    wait("the PVC's status.capacity 2Gi", capacity, POD_TIMEOUT, explain(kn, NS))
    t_cap = time.monotonic() - t0
    assert container_state(kn, writer.pod) == before_state  # same pod, same container, no restart
    beats_grow(kn.lab, writer, "after the expansion")
    say(f"helm lab: online expansion: df {before / 2**30:.2f} -> {after / 2**30:.2f} GiB in the running pod "
        f"{t_fs:.1f} s after the PVC patch, PVC status.capacity 2Gi after {t_cap:.1f} s, no restart")


# In the controller container: what `zvolt-csi --mode move --live-relay` does at a host step, and
# nothing else. It reads the first line the plugin sends, prints one request line, waits for the
# answer on stdin (so the line must cross the exec stream while the process runs) and says it on
# stderr; exit 0 only when every node answered ok.
RELAY_STEP = """
import json, sys
first = json.loads(sys.stdin.readline())
print(PREFIX + json.dumps(REQUEST), flush=True)
answer = json.loads(sys.stdin.readline())
print("answer " + json.dumps(answer), file=sys.stderr, flush=True)
sys.exit(0 if answer.get("ok") and "volume_context" in first else 3)
"""


def test_a_live_moves_relay_runs_both_exec_legs_through_the_real_kubelet(
        writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    """The Kubernetes side of `kubectl zvolt move` for a volume in use (kubectl_zvolt/move.py),
    through the API server's exec streams into containers the real kubelet runs: the controller
    leg (a line out, the answer back in, while the process runs) and the node leg (`zvolt-csi
    --mode live-path` in the node plugin pod that the real CSINode names, the PV's node-stage
    secret on stdin). This lab has one storage node, so nothing can move: each host step names
    the writer's own path, which makes `add` a repeat (already connected) and `drop` keep it. The
    writer must see neither."""
    from csi.pathrelay import RELAY_PREFIX
    from kubectl_zvolt.attachments import CONTAINER as CONTROLLER_CONTAINER
    from kubectl_zvolt.attachments import controller
    from kubectl_zvolt.kube import stream_session
    from kubectl_zvolt.model import DRIVER
    from kubectl_zvolt.move import Relay, relaying

    kn = release.node
    kube = Kube(kn.cluster.api, SYSTEM_NS)
    pv = kube.get_pv(writer.pv)
    assert pv is not None
    handle = pv["spec"]["csi"]["volumeHandle"]
    ctx = dict(attachments_of(release, writer.pv)[0].status.attachment_metadata or {})
    csinode = release.storage.read_csi_node(kubenode.NODE_NAME)
    host = next(d.node_id for d in csinode.spec.drivers if d.name == DRIVER)
    before = container_state(kn, writer.pod)
    paths = connected_nqns(kn.lab).count(writer.nqn)
    assert paths == 1, connected_nqns(kn.lab)
    relay = Relay(kube, stream_exec(kube), DRIVER, pv)
    lines: list[str] = []
    timings = []
    for op in ("add", "drop"):
        request = {"op": op, "volume_id": handle, "nodes": {host: ctx}}
        script = RELAY_STEP.replace("PREFIX", repr(RELAY_PREFIX)).replace("REQUEST", repr(request))
        pod, _ = controller(kube.list_pods())
        t0 = time.monotonic()
        first = json.dumps({"volume_context": pv["spec"]["csi"].get("volumeAttributes") or {}})
        code, err = stream_session(kube, timeout=300)(
            SYSTEM_NS, pod, CONTROLLER_CONTAINER, ["python3", "-c", script], first, relaying(relay, lines.append))
        timings.append(time.monotonic() - t0)
        assert code == 0, f"{op}: exit {code}; stderr: {err}; relayed: {relay.log}"
        assert '"ok": true' in err, err
    said = [json.loads(entry.split(": ", 1)[1]) for entry in relay.log]
    assert [s.get("connected") for s in said[:1]] == [False], relay.log  # add: that path is there already
    assert said[1].get("dropped") == [], relay.log  # drop: the path named is kept, nothing else was there
    assert not lines, lines
    assert connected_nqns(kn.lab).count(writer.nqn) == 1
    assert container_state(kn, writer.pod) == before
    beats_grow(kn.lab, writer, "after both host steps")
    say(f"helm lab: live-move relay through kubelet: add {timings[0]:.1f} s, drop {timings[1]:.1f} s "
        f"(controller exec + node plugin exec each); node said {relay.log}")


def test_kubelet_restart_keeps_volumes_mounted(writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    kn = release.node
    lab = kn.lab
    before_state = container_state(kn, writer.pod)
    assert mount_of(lab, writer.target) is not None
    t0 = time.monotonic()
    kubenode.stop_kubelet(lab, pods=False)
    t_stopped = time.monotonic() - t0
    try:
        assert not lab.service_running(kubenode.KUBELET_SERVICE)
        beats_grow(lab, writer, "while kubelet is stopped")
        assert mount_of(lab, writer.target) is not None
    finally:
        t_start = time.monotonic()
        kubenode.start_kubelet(lab)
    def exec_answers() -> bool:
        try:
            return pod_exec(kn, writer.pod, ["true"])[0] == 0
        except (ApiException, OSError, ValueError):  # the stream's handshake while kubelet starts
            return False

    wait("exec through the restarted kubelet", exec_answers, READY_AGAIN,
         lambda: lab.service_log(kubenode.KUBELET_SERVICE, 40))
    t_exec = time.monotonic() - t_start
    # Give the new kubelet's volume manager time to reconstruct and reconcile: a volume it did
    # not recognise would be unmounted (or the pod restarted) within this window.
    time.sleep(RECONCILE_SECONDS)
    assert mount_of(lab, writer.target) is not None
    assert container_state(kn, writer.pod) == before_state
    count = beats_grow(lab, writer, "after kubelet restarted")
    code, out = pod_exec(kn, writer.pod, ["head", "-c", str(BEAT), f"{MOUNT}/beat"])
    assert (code, out) == (0, "00000000\n"), (code, out)
    say(f"helm lab: kubelet restart: stopped in {t_stopped:.1f} s, pod kept writing while it was down; exec "
        f"answered {t_exec:.1f} s after start; {RECONCILE_SECONDS} s later still mounted, same container, "
        f"restartCount {before_state[2]}, {count} heartbeats")


def test_node_plugin_restart_keeps_io_then_unstages(writer: Writer, release: Release, say: Say) -> None:  # noqa: F811
    """Last of the writer's tests: it deletes the writer."""
    kn = release.node
    lab = kn.lab
    selector = "app.kubernetes.io/component=node"
    old = pods_ready(kn.core, SYSTEM_NS, selector, 1)
    assert old, explain(kn, SYSTEM_NS, selector)()
    before_state = container_state(kn, writer.pod)
    t0 = time.monotonic()
    kn.core.delete_namespaced_pod(old[0].metadata.name, SYSTEM_NS)
    during = beats(lab, writer)

    def replaced() -> Any:
        ready = pods_ready(kn.core, SYSTEM_NS, selector, 1)
        return ready if ready and ready[0].metadata.uid != old[0].metadata.uid else None

    wait("a new node plugin pod Ready", replaced, POD_TIMEOUT, explain(kn, SYSTEM_NS, selector))
    t_new = time.monotonic() - t0
    at_ready = beats(lab, writer)
    assert at_ready > during, f"no heartbeat while the node plugin was replaced ({during} -> {at_ready})"
    beats_grow(lab, writer, "after the node plugin came back")
    assert container_state(kn, writer.pod) == before_state

    # The new plugin unpublishes and unstages what the old one staged.
    published = mount_of(lab, writer.target)
    assert published is not None and published[0].startswith("/dev/nvme"), published
    device = published[0]
    t_del = time.monotonic()
    delete_pod(kn, writer.pod)

    def unstaged() -> bool:
        return (not mounts_of_volume(lab, writer.pv, device) and writer.nqn not in connected_nqns(lab)
                and not attachments_of(release, writer.pv))

    wait(f"volume {writer.pv} unmounted, disconnected and detached", unstaged, GONE_TIMEOUT,
         lambda: "\n".join([*mounts_of_volume(lab, writer.pv, device), *connected_nqns(lab),
                            explain(kn, SYSTEM_NS)()]))
    say(f"helm lab: node plugin restart: new plugin pod Ready {t_new:.1f} s after delete, writer kept writing "
        f"({during} -> {at_ready} heartbeats meanwhile); writer deleted -> unstaged and detached in "
        f"{time.monotonic() - t_del:.1f} s")


def test_raw_block_volume_keeps_its_data(release: Release, say: Say) -> None:  # noqa: F811
    kn = release.node
    kn.core.create_namespaced_persistent_volume_claim(NS, claim("kl-block", block=True))
    dd_at = f"bs=1M seek={BLOCK_OFFSET_MIB} count=1"
    try:
        _, first = start_pod(kn, shell_pod(kn, "kl-block", "kl-block", IDLE_SCRIPT, block=True))
        code, out = pod_exec(kn, "kl-block", ["sh", "-c", f"test -b {BLOCK_DEVICE} && blockdev --getsize64 "
                                                          f"{BLOCK_DEVICE}"])
        assert (code, out.strip()) == (0, str(2**30)), (code, out)
        code, out = pod_exec(kn, "kl-block", ["sh", "-c", (
            f"head -c {2**20} /dev/urandom > /tmp/pattern && "
            f"dd if=/tmp/pattern of={BLOCK_DEVICE} {dd_at} oflag=direct conv=fsync status=none && "
            f"sha256sum < /tmp/pattern && "
            f"dd if={BLOCK_DEVICE} bs=1M skip={BLOCK_OFFSET_MIB} count=1 iflag=direct status=none | sha256sum")])
        sums = out.split()
        assert code == 0 and len(sums) == 4 and sums[0] == sums[2], (code, out)
        t_delete = time.monotonic()
        delete_pod(kn, "kl-block")
        deleted = time.monotonic() - t_delete
        _, again = start_pod(kn, shell_pod(kn, "kl-block", "kl-block", IDLE_SCRIPT, block=True))
        code, out = pod_exec(kn, "kl-block", ["sh", "-c", f"dd if={BLOCK_DEVICE} bs=1M skip={BLOCK_OFFSET_MIB} "
                                                          "count=1 iflag=direct status=none | sha256sum"])
        assert code == 0 and out.split()[0] == sums[0], f"pattern {sums[0]} written, {out!r} read after a new pod"
    finally:
        delete_pod(kn, "kl-block")
        delete_claim(kn, "kl-block")
    say(f"helm lab: raw block: pod Ready in {first:.1f} s, 1 MiB pattern written and read back; pod deleted in "
        f"{deleted:.1f} s, new pod Ready in {again:.1f} s reads the same sha256")


def test_helm_uninstall_leaves_nothing_behind(release: Release, say: Say) -> None:  # noqa: F811
    """Last in the module: claims first (the controller deletes their volumes), then the release."""
    kn = release.node
    core, lab = kn.core, kn.lab
    remove_test_objects(kn)
    wait("every PV deleted", lambda: not core.list_persistent_volume().items, GONE_TIMEOUT,
         explain(kn, SYSTEM_NS))
    wait("every zvol destroyed", lambda: not zvols(lab), GONE_TIMEOUT, lambda: "\n".join(zvols(lab)))
    t_uninstall = time.monotonic()
    helm_uninstall(kn.cluster, RELEASE, SYSTEM_NS)
    settle("the release's pods gone", lambda: not core.list_namespaced_pod(SYSTEM_NS).items)
    say(f"helm lab: helm uninstall, pods gone in {time.monotonic() - t_uninstall:.1f} s")
    assert not core.list_namespaced_pod(SYSTEM_NS).items
    assert zvols(lab) == []
    assert exported_nqns(lab) == []
    assert connected_nqns(lab) == []
    assert zvolt_mounts(lab) == []
