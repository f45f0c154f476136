"""The Helm chart: lint, render with default and other values, validate every object strictly
against the Kubernetes schemas (offline), and check the fields that make zvolt work.

Helm here is the Helm v4 Go SDK through helm-python-sdk (libhelm_c); the Kubernetes schemas
are kubernetes-validate's (strict: unknown fields fail). Both come from the dev extra.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

# A sibling test module (pytest puts tests/unit on sys.path; mypy's explicit package bases
# cannot see it, so its names are untyped here).
from test_chart_crds import CRD_SCHEMAS, validate_crd  # type: ignore[import-not-found,unused-ignore]

from csi import params
from csi.mounter import check_mount_flags
from zvolt import volprops

CHART = Path(__file__).resolve().parents[2] / "charts" / "zvolt"
KUBE_VERSION = "1.34.0"
RELEASE = "zv"
NAMESPACE = "storage"

Obj = dict[str, Any]

NON_DEFAULT: Obj = {
    "fullnameOverride": "zvolt-prod",
    "kubeletDir": "/var/snap/microk8s/common/var/lib/kubelet",
    "image": {"repository": "registry.example/zvolt", "tag": "0.1.0-rc1"},
    "imagePullSecrets": [{"name": "regcred"}],
    "controller": {"replicas": 3, "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
                   "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]},
    "agent": {"pool": "nvme", "parent": "nvme/k8s/zvolt", "nodeSelector": {"storage": "zfs"}, "port": 7443},
    # cert-manager makes one shared agent certificate (per-node ones need the chart's own CA).
    "tls": {"certManager": {"enabled": True}, "agentCertificates": "shared"},
    # A class naming its own node-stage secret: only with DH-HMAC-CHAP off (on, that is the
    # volume's DH-HMAC-CHAP Secret; tests/unit/test_chart_dhchap.py).
    "dhchap": "off",
    "storageClasses": [{"name": "fast", "isDefault": True, "volblocksize": "8K", "compression": "zstd",
                        "thin": False, "fsType": "xfs", "reclaimPolicy": "Retain",
                        "extraParameters": {"csi.storage.k8s.io/node-stage-secret-name": "zvolt-chap",
                                            "csi.storage.k8s.io/node-stage-secret-namespace": "storage"}}],
    "volumeSnapshotClass": {"enabled": True, "name": "fast-snap", "isDefault": False, "deletionPolicy": "Retain"},
    "volumeGroupSnapshotClass": {"enabled": True, "name": "fast-group", "isDefault": False,
                                 "deletionPolicy": "Retain", "apiVersion": "groupsnapshot.storage.k8s.io/v1beta1"},
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}},
}

VARIANTS: dict[str, Obj] = {
    "default": {},
    "non-default": NON_DEFAULT,
    "cert-manager-external-issuer": {"tls": {"agentCertificates": "shared", "certManager": {
        "enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}},
    "shared-agent-certificate": {"tls": {"agentCertificates": "shared"}},
    "dhchap-unidirectional": {"dhchap": "unidirectional"},
    "insecure-no-agent-no-snapshots": {"tls": {"enabled": False}, "agent": {"enabled": False},
                                       "volumeSnapshotClass": {"enabled": False}, "rbac": {"create": True}},
}


# The one value without a default (no storage network is a safe guess): every render here
# names the lab's; test_storage_network_is_required_and_validated checks the refusal.
STORAGE_NETWORK = "10.42.0.0/24"
REQUIRED: Obj = {"storageNetwork": {"cidr": STORAGE_NETWORK}}


def with_required(values: Obj | None, base: Obj = REQUIRED) -> Obj:
    """`values` over REQUIRED, merged key by key the way Helm merges value files."""
    out = copy.deepcopy(base)
    for key, value in (values or {}).items():
        out[key] = with_required(value, out[key]) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def render(values: Obj | None = None) -> list[Obj]:
    chart = helm_python.Chart.load(CHART)
    manifests = chart.render(with_required(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container(pod_spec: Obj, name: str) -> Obj:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def mounts(c: Obj) -> dict[str, Obj]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def host_paths(pod_spec: Obj) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in pod_spec["volumes"] if "hostPath" in v}


@pytest.fixture(scope="module")
def default_docs() -> list[Obj]:
    return render()


# --- lint, schema of values, strict validation of everything rendered ---------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint_strict(variant: str) -> None:
    report = helm_python.lint(CHART, with_required(VARIANTS[variant]), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert problems == [] and report["errors"] == []


@pytest.mark.parametrize(("values", "complaint"), [
    ({"agent": {"pol": "tank"}}, "additional properties 'pol' not allowed"),
    ({"storageClasses": [{"name": "x", "volblocksize": "7K", "compression": "lz4", "fsType": "ext4"}]},
     "/storageClasses/0/volblocksize"),
    ({"storageClasses": [{"name": "x", "volblocksize": "8K", "compression": "lz4", "fsType": "btrfs"}]},
     "/storageClasses/0/fsType"),
    ({"sidecars": {"provisioner": {"repository": "r", "tag": "latest"}}}, "/sidecars/provisioner/tag"),
    ({"agent": {"pool": ""}}, "/agent/pool"),
    ({"controller": {"replicas": 0}}, "/controller/replicas"),
    ({"node": {"stateDir": "relative/dir"}}, "/node/stateDir"),
    ({"tls": {"certManager": {"enabled": True, "issuerRef": {"kind": "ClusterIssuer"}}}}, "/tls/certManager/issuerRef"),
    # The driver would refuse this class on every CreateVolume: refuse it at install instead.
    ({"storageClasses": [{"name": "x", "volblocksize": "8K", "compression": "lz4", "fsType": "ext4",
                          "extraParameters": {"encryption": "on"}}]}, "invalid propertyName 'encryption'"),
    ({"controller": {"alphaCapabilities": ["MODIFY_VOLUME"]}}, "/controller/alphaCapabilities/0"),
    ({"storageNetwork": {"cidr": "10.42.0.0"}}, "/storageNetwork/cidr"),
    ({"storageNetwork": {"cidr": "10.42.0.0/33"}}, "/storageNetwork/cidr"),
    ({"storageNetwork": {"cidr": "10.42.256.0/24"}}, "/storageNetwork/cidr"),
    ({"storageNetwork": {"cidr": "fd00::/64"}}, "/storageNetwork/cidr"),
    ({"storageNetwork": {"cidr": "10.42.0.0/24 --no-guard"}}, "/storageNetwork/cidr"),
    ({"storageNetwork": {"guard": "yes"}}, "/storageNetwork/guard"),
])
def test_values_schema_rejects_bad_values(values: Obj, complaint: str) -> None:
    report = helm_python.lint(CHART, with_required(values), strict=True)
    errors = " ".join(m["error"] for m in report["messages"] if m["severity"] >= 3)
    assert complaint in errors, report


def validate_strict(doc: Obj) -> str:
    """Validate one rendered object; returns which schema set judged it."""
    if (doc.get("apiVersion"), doc.get("kind")) in CRD_SCHEMAS:
        validate_crd(doc)
        return "crd"
    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {where}") from None
    return "kubernetes"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_rendered_object_is_valid(variant: str) -> None:
    docs = render(VARIANTS[variant])
    judged = {(d["kind"], validate_strict(d)) for d in docs}
    assert ("Deployment", "kubernetes") in judged and ("CSIDriver", "kubernetes") in judged
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    for d in docs:
        ns = d["metadata"].get("namespace")
        cluster_scoped = d["kind"] in {"CSIDriver", "StorageClass", "VolumeSnapshotClass",
                                       "VolumeGroupSnapshotClass", "ClusterRole", "ClusterRoleBinding"}
        assert (ns is None) == cluster_scoped, f"{d['kind']} {d['metadata']['name']} namespace {ns}"
        if not cluster_scoped:
            assert ns == NAMESPACE


def test_strict_validation_catches_a_misspelled_field(default_docs: list[Obj]) -> None:
    ds = copy.deepcopy(by_kind(default_docs, "DaemonSet")[f"{RELEASE}-zvolt-node"])
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][1]["mountPropogation"] = "Bidirectional"
    with pytest.raises(AssertionError, match="mountPropogation"):
        validate_strict(ds)


def test_the_kinds_a_default_install_creates(default_docs: list[Obj]) -> None:
    kinds: dict[str, int] = {}
    for d in default_docs:
        kinds[d["kind"]] = kinds.get(d["kind"], 0) + 1
    assert kinds == {"CSIDriver": 1, "Deployment": 1, "DaemonSet": 2, "ServiceAccount": 3, "ClusterRole": 7,
                     "ClusterRoleBinding": 7, "Role": 4, "RoleBinding": 4, "StorageClass": 2,
                     "VolumeSnapshotClass": 1, "Service": 3, "Secret": 3}


# --- golden checks of the fields that matter ----------------------------------------------

def test_csidriver(default_docs: list[Obj]) -> None:
    drv = by_kind(default_docs, "CSIDriver")["csi.zvolt.io"]
    assert drv["spec"] == {"attachRequired": True, "podInfoOnMount": False, "fsGroupPolicy": "File",
                           "volumeLifecycleModes": ["Persistent"], "storageCapacity": True,
                           "requiresRepublish": False}


SIDECAR_TAGS = {
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.4.0",
    "csi-attacher": "registry.k8s.io/sig-storage/csi-attacher:v4.11.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.3.0",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.7.0",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.20.0",
}


def test_controller_deployment(default_docs: list[Obj]) -> None:
    dep = by_kind(default_docs, "Deployment")[f"{RELEASE}-zvolt-controller"]
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert {c["name"]: c["image"] for c in spec["containers"] if c["name"] != "zvolt-controller"} == SIDECAR_TAGS
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 65532
    assert not spec.get("hostNetwork")
    for c in spec["containers"]:
        assert mounts(c)["/csi"]["name"] == "socket-dir"
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}
        if c["name"] in {"csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter"}:
            assert "--leader-election" in c["args"]
            assert f"--leader-election-namespace={NAMESPACE}" in c["args"]
            assert "--csi-address=$(ADDRESS)" in c["args"]
            assert {"name": "ADDRESS", "value": "/csi/csi.sock"} in c["env"]
    prov = container(spec, "csi-provisioner")
    for flag in ("--enable-capacity", "--capacity-ownerref-level=2", "--extra-create-metadata"):
        assert flag in prov["args"]
    # Topology is GA and on by default; a provisioner that drops the gate would refuse the flag.
    assert not any(a.startswith("--feature-gates") for a in prov["args"])
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in prov["env"]}
    assert env["NAMESPACE"] == "metadata.namespace" and env["POD_NAME"] == "metadata.name"
    assert "--http-endpoint=:9808" in container(spec, "liveness-probe")["args"]  # --health-port is deprecated

    zc = container(spec, "zvolt-controller")
    assert zc["command"] == ["zvolt-csi"]
    assert zc["args"][:3] == ["--mode=controller", "--endpoint=unix:///csi/csi.sock", "--metrics-listen=0.0.0.0:9102"]
    assert "--agents-from-kubernetes" in zc["args"] and f"--agent-namespace={NAMESPACE}" in zc["args"]
    assert "--agent-port=7001" in zc["args"] and "--reconcile-attachments=60" in zc["args"]
    # The same args drive `kubectl zvolt attachments` (it execs zvolt-csi with them): they parse.
    from csi.main import parser
    from kubectl_zvolt.attachments import argv
    parsed = parser().parse_args(argv(zc["args"], clear=False)[1:])
    assert parsed.mode == "attachments" and parsed.agents_from_kubernetes and parsed.tls_ca == "/etc/zvolt/tls/ca.crt"
    assert {"--tls-cert=/etc/zvolt/tls/tls.crt", "--tls-key=/etc/zvolt/tls/tls.key",
            "--tls-ca=/etc/zvolt/tls/ca.crt"} <= set(zc["args"])
    assert zc["livenessProbe"]["httpGet"]["port"] == "healthz"
    assert {p["name"]: p["containerPort"] for p in zc["ports"]} == {"metrics": 9102, "healthz": 9808}
    tls_vol = next(v for v in spec["volumes"] if v["name"] == "tls")
    assert tls_vol["secret"]["secretName"] == f"{RELEASE}-zvolt-controller-tls"


def test_controller_agent_selector_finds_exactly_the_agent_pods(default_docs: list[Obj]) -> None:
    zc = container(by_kind(default_docs, "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"],
                   "zvolt-controller")
    selector = next(a.split("=", 1)[1] for a in zc["args"] if a.startswith("--agent-selector="))
    wanted = dict(term.split("=") for term in selector.split(","))
    pods = {name: d["spec"]["template"]["metadata"]["labels"]
            for name, d in {**by_kind(default_docs, "DaemonSet"), **by_kind(default_docs, "Deployment")}.items()}
    matching = [name for name, labels in pods.items() if all(labels.get(k) == v for k, v in wanted.items())]
    assert matching == [f"{RELEASE}-zvolt-agent"]
    assert wanted["app.kubernetes.io/component"] == "agent"  # the contract's selector key


def test_node_daemonset(default_docs: list[Obj]) -> None:
    ds = by_kind(default_docs, "DaemonSet")[f"{RELEASE}-zvolt-node"]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["automountServiceAccountToken"] is False
    assert spec["tolerations"] == [{"operator": "Exists"}]
    node = container(spec, "zvolt-node")
    assert node["securityContext"]["privileged"] is True and node["securityContext"]["runAsUser"] == 0
    # The guard's nft runs in the node's namespace (hostNetwork above) and needs NET_ADMIN.
    assert node["securityContext"]["capabilities"] == {"add": ["NET_ADMIN"]}
    assert node["args"] == ["--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
                            "--state-dir=/var/lib/zvolt-node", "--metrics-listen=$(POD_IP):9103",
                            "--ctrl-loss-tmo=600", "--reconnect-delay=2", "--trim-interval=3600",
                            f"--storage-network={STORAGE_NETWORK}", "--nvme-port=4420,4421"]
    m = mounts(node)
    assert m["/var/lib/kubelet"]["mountPropagation"] == "Bidirectional"
    assert {"/csi", "/dev", "/sys", "/etc/nvme", "/var/lib/zvolt-node", "/lib/modules"} <= set(m)
    assert [p for p, x in m.items() if x.get("mountPropagation")] == ["/var/lib/kubelet"]
    hp = host_paths(spec)
    assert hp == {"plugin-dir": "/var/lib/kubelet/plugins/csi.zvolt.io",
                  "registration-dir": "/var/lib/kubelet/plugins_registry", "kubelet-dir": "/var/lib/kubelet",
                  "dev": "/dev", "sys": "/sys", "lib-modules": "/lib/modules", "etc-nvme": "/etc/nvme",
                  "state-dir": "/var/lib/zvolt-node"}
    reg = container(spec, "node-driver-registrar")
    assert reg["image"] == "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0"
    assert "--kubelet-registration-path=/var/lib/kubelet/plugins/csi.zvolt.io/csi.sock" in reg["args"]
    assert mounts(reg)["/registration"]["name"] == "registration-dir"
    assert "--http-endpoint=:9809" in container(spec, "liveness-probe")["args"]


def test_kubelet_dir_moves_every_path(tmp_path: Path) -> None:
    docs = render(NON_DEFAULT)
    spec = by_kind(docs, "DaemonSet")["zvolt-prod-node"]["spec"]["template"]["spec"]
    root = "/var/snap/microk8s/common/var/lib/kubelet"
    hp = host_paths(spec)
    assert hp["kubelet-dir"] == root and hp["plugin-dir"] == f"{root}/plugins/csi.zvolt.io"
    assert hp["registration-dir"] == f"{root}/plugins_registry"
    assert mounts(container(spec, "zvolt-node"))[root]["mountPropagation"] == "Bidirectional"
    assert f"--kubelet-registration-path={root}/plugins/csi.zvolt.io/csi.sock" in \
        container(spec, "node-driver-registrar")["args"]


def test_agent_daemonset(default_docs: list[Obj]) -> None:
    ds = by_kind(default_docs, "DaemonSet")[f"{RELEASE}-zvolt-agent"]
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"zvolt.io/storage-node": "true"}
    # Its pod-bound token asks for its own serving certificate (tls.agentCertificates=perNode).
    assert spec["hostNetwork"] is True and spec["automountServiceAccountToken"] is True
    agent = container(spec, "zvolt-agent")
    assert agent["command"] == ["zvolt-agent"]
    assert agent["securityContext"]["privileged"] is True
    assert agent["securityContext"]["capabilities"] == {"add": ["NET_ADMIN"]}
    # NVMe/TCP on the node's address in the storage network (not the pod-reachable primary).
    assert agent["args"] == [
        "--node-name=$(NODE_NAME)", "--pool=tank", "--parent=tank/zvolt", "--listen=$(POD_IP):7001",
        f"--storage-network={STORAGE_NETWORK}", "--nvme-port=4420", "--nvme-tls-port=4421",
        "--metrics-listen=$(POD_IP):9101", "--state-dir=/var/lib/zvolt",
        "--shutdown-grace=20", "--commitment-ratio=3", "--growth-reserve=0.05", "--dhchap",
        "--tls-request", "--tls-request-hours=168", "--tls-ca=/etc/zvolt/tls/ca.crt",
        f"--controller-cn={RELEASE}-zvolt-controller"]
    # Running calls get 20 s after SIGTERM; the kubelet waits 10 s longer before SIGKILL.
    assert spec["terminationGracePeriodSeconds"] == 30
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in agent["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "POD_IP": "status.podIP"}
    assert set(mounts(agent)) == {"/dev", "/sys/kernel/config", "/lib/modules", "/var/lib/zvolt", "/etc/zvolt/tls"}
    assert host_paths(spec) == {"dev": "/dev", "configfs": "/sys/kernel/config", "lib-modules": "/lib/modules",
                                "state-dir": "/var/lib/zvolt"}
    assert {p["name"]: p["containerPort"] for p in agent["ports"]} == {"grpc": 7001, "nvme-tcp": 4420,
                                                                        "nvme-tls": 4421, "metrics": 9101}


def test_agent_values_reach_the_command_line() -> None:
    docs = render(NON_DEFAULT)
    agent = container(by_kind(docs, "DaemonSet")["zvolt-prod-agent"]["spec"]["template"]["spec"], "zvolt-agent")
    assert "--pool=nvme" in agent["args"] and "--parent=nvme/k8s/zvolt" in agent["args"]
    assert "--listen=$(POD_IP):7443" in agent["args"]
    ctrl = container(by_kind(docs, "Deployment")["zvolt-prod-controller"]["spec"]["template"]["spec"],
                     "zvolt-controller")
    assert "--agent-port=7443" in ctrl["args"]
    assert ctrl["image"] == "registry.example/zvolt:0.1.0-rc1"


def test_storage_network_is_required_and_validated() -> None:
    """No default storage network: the render fails and says what to set."""
    chart = helm_python.Chart.load(CHART)
    with pytest.raises(Exception, match=r"storageNetwork\.cidr is required: the IPv4 CIDR"):
        chart.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def test_guard_off_reaches_both_command_lines() -> None:
    docs = render({"storageNetwork": {"cidr": "192.168.7.0/24", "guard": False},
                   "agent": {"nvmePort": 4421, "nvmeTlsPort": 4422}})
    ds = by_kind(docs, "DaemonSet")
    for name, cname, ports in ((f"{RELEASE}-zvolt-agent", "zvolt-agent", "4421"),
                               (f"{RELEASE}-zvolt-node", "zvolt-node", "4421,4422")):
        args = container(ds[name]["spec"]["template"]["spec"], cname)["args"]
        guard = [a for a in args if a.startswith(("--storage-network", "--nvme-port", "--no-guard"))]
        assert guard == ["--storage-network=192.168.7.0/24", f"--nvme-port={ports}", "--no-guard"], name
    default = by_kind(render(), "DaemonSet")
    assert not any("--no-guard" in container(d["spec"]["template"]["spec"], c)["args"]
                   for d, c in ((default[f"{RELEASE}-zvolt-agent"], "zvolt-agent"),
                                (default[f"{RELEASE}-zvolt-node"], "zvolt-node")))


def test_insecure_mode_has_no_tls_anywhere() -> None:
    docs = render(VARIANTS["insecure-no-agent-no-snapshots"])
    assert by_kind(docs, "Secret") == {} and "DaemonSet" not in {d["kind"] for d in docs if "agent" in
                                                                 d["metadata"]["name"]}
    ctrl = container(by_kind(docs, "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"],
                     "zvolt-controller")
    assert "--insecure" in ctrl["args"] and not any(a.startswith("--tls") for a in ctrl["args"])
    assert by_kind(docs, "VolumeSnapshotClass") == {}


# --- RBAC ---------------------------------------------------------------------------------

def rules_of(role: Obj) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in role["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                out.setdefault(f"{g or 'core'}/{res}", set()).update(r["verbs"])
    return out


EXPECTED_RBAC: dict[str, dict[str, set[str]]] = {
    "ClusterRole/provisioner": {
        "core/persistentvolumes": {"get", "list", "watch", "create", "patch", "delete"},
        "core/persistentvolumeclaims": {"get", "list", "watch", "update", "patch"},
        "storage.k8s.io/storageclasses": {"get", "list", "watch"},
        "core/events": {"list", "watch", "create", "update", "patch"},
        "snapshot.storage.k8s.io/volumesnapshots": {"get", "list", "watch", "update"},
        "snapshot.storage.k8s.io/volumesnapshotcontents": {"get", "list"},
        "storage.k8s.io/csinodes": {"get", "list", "watch"},
        "core/nodes": {"get", "list", "watch"},
        "storage.k8s.io/volumeattachments": {"get", "list", "watch"},
        "storage.k8s.io/volumeattributesclasses": {"get", "list", "watch"},
    },
    "Role/provisioner-capacity": {
        "storage.k8s.io/csistoragecapacities": {"get", "list", "watch", "create", "update", "patch", "delete"},
        "core/pods": {"get"},
        "apps/replicasets": {"get"},
    },
    "ClusterRole/attacher": {
        "core/persistentvolumes": {"get", "list", "watch", "patch"},
        "storage.k8s.io/csinodes": {"get", "list", "watch"},
        "storage.k8s.io/volumeattachments": {"get", "list", "watch", "patch"},
        "storage.k8s.io/volumeattachments/status": {"patch"},
    },
    "ClusterRole/resizer": {
        "core/persistentvolumes": {"get", "list", "watch", "patch"},
        "core/persistentvolumeclaims": {"get", "list", "watch"},
        "core/pods": {"get", "list", "watch"},
        "core/persistentvolumeclaims/status": {"patch"},
        "core/events": {"list", "watch", "create", "update", "patch"},
        "storage.k8s.io/volumeattributesclasses": {"get", "list", "watch"},
    },
    "ClusterRole/snapshotter": {
        "core/events": {"list", "watch", "create", "update", "patch"},
        "snapshot.storage.k8s.io/volumesnapshotclasses": {"get", "list", "watch"},
        "snapshot.storage.k8s.io/volumesnapshotcontents": {"get", "list", "watch", "update", "patch"},
        "snapshot.storage.k8s.io/volumesnapshotcontents/status": {"update", "patch"},
        "groupsnapshot.storage.k8s.io/volumegroupsnapshotclasses": {"get", "list", "watch"},
        "groupsnapshot.storage.k8s.io/volumegroupsnapshotcontents": {"get", "list", "watch", "update", "patch"},
        "groupsnapshot.storage.k8s.io/volumegroupsnapshotcontents/status": {"update", "patch"},
    },
    "Role/leader-election": {"coordination.k8s.io/leases": {"get", "watch", "list", "delete", "update", "create"}},
    "Role/agent-discovery": {"core/pods": {"get", "list", "watch"}},
    "ClusterRole/agent-zones": {"core/nodes": {"get"}},
    # dhchap (on by default): the controller keeps each volume's keys in a Secret per PV.
    "Role/dhchap-secrets": {"core/secrets": {"get", "create", "delete"}},
    # tls.agentCertificates=perNode: agents ask, the controller signs (only its own signer name).
    "ClusterRole/agent-csr": {"certificates.k8s.io/certificatesigningrequests": {"create", "get"}},
    "ClusterRole/agent-signer": {
        "certificates.k8s.io/certificatesigningrequests": {"get", "list", "watch"},
        "certificates.k8s.io/certificatesigningrequests/approval": {"update"},
        "certificates.k8s.io/certificatesigningrequests/status": {"update"},
        "certificates.k8s.io/signers": {"approve", "sign"},
    },
}


def test_rbac_is_exactly_what_each_sidecar_needs(default_docs: list[Obj]) -> None:
    prefix = f"{RELEASE}-zvolt-"
    roles = {f"{d['kind']}/{d['metadata']['name'].removeprefix(prefix)}": rules_of(d)
             for d in default_docs if d["kind"] in {"ClusterRole", "Role"}}
    assert roles == EXPECTED_RBAC
    for role, rules in roles.items():
        for res, verbs in rules.items():
            assert "*" not in verbs and not res.endswith("/*")
            # Secrets: only the DH-HMAC-CHAP Role, namespaced (the release's), never list or watch.
            assert "secrets" not in res or (role == "Role/dhchap-secrets" and not verbs & {"list", "watch"})


def test_only_the_controller_is_bound(default_docs: list[Obj]) -> None:
    bindings = [d for d in default_docs if d["kind"] in {"ClusterRoleBinding", "RoleBinding"}]
    subjects = {(s["kind"], s["name"], s["namespace"]) for b in bindings for s in b["subjects"]}
    assert subjects == {("ServiceAccount", f"{RELEASE}-zvolt-controller", NAMESPACE),
                        ("ServiceAccount", f"{RELEASE}-zvolt-agent", NAMESPACE)}
    # The agent's one grant: asking for its own certificate.
    assert [b["roleRef"]["name"] for b in bindings if b["subjects"][0]["name"] == f"{RELEASE}-zvolt-agent"] == [
        f"{RELEASE}-zvolt-agent-csr"]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings}
    defined = {(d["kind"], d["metadata"]["name"]) for d in default_docs if d["kind"] in {"ClusterRole", "Role"}}
    assert bound == defined
    sas = by_kind(default_docs, "ServiceAccount")
    assert sas[f"{RELEASE}-zvolt-node"]["automountServiceAccountToken"] is False
    assert sas[f"{RELEASE}-zvolt-agent"]["automountServiceAccountToken"] is False


# --- classes, metrics, certificates ---------------------------------------------------------

def test_storage_classes_and_snapshot_class(default_docs: list[Obj]) -> None:
    scs = by_kind(default_docs, "StorageClass")
    assert set(scs) == {"zvolt", "zvolt-postgres"}
    for name, bs in (("zvolt", "16K"), ("zvolt-postgres", "8K")):
        sc = scs[name]
        assert sc["provisioner"] == "csi.zvolt.io"
        assert sc["parameters"] == {"volblocksize": bs, "compression": "lz4", "thin": "true",
                                    "csi.storage.k8s.io/fstype": "ext4", "dhchap": "bidirectional",
                                    "csi.storage.k8s.io/node-stage-secret-name": "zvolt-dhchap-${pv.name}",
                                    "csi.storage.k8s.io/node-stage-secret-namespace": NAMESPACE}
        assert sc["allowVolumeExpansion"] is True and sc["volumeBindingMode"] == "WaitForFirstConsumer"
        assert sc["reclaimPolicy"] == "Delete" and "annotations" not in sc["metadata"]
    vsc = by_kind(default_docs, "VolumeSnapshotClass")["zvolt"]
    assert vsc["driver"] == "csi.zvolt.io" and vsc["deletionPolicy"] == "Delete"
    assert vsc["metadata"]["annotations"] == {"snapshot.storage.kubernetes.io/is-default-class": "true"}


def _snapshotter_gates(docs: list[Obj]) -> list[str]:
    spec = next(iter(by_kind(docs, "Deployment").values()))["spec"]["template"]["spec"]
    return [a for a in container(spec, "csi-snapshotter")["args"] if a.startswith("--feature-gates")]


def test_group_snapshot_class_only_where_the_api_is_served(default_docs: list[Obj]) -> None:
    # helm template knows no CRDs: "auto" finds no group snapshot API, so no class and no gate
    # (a v8.2 snapshotter stack with the gate on needs the CRDs). Against a real API server the
    # k8s suite shows "auto" picking the served version.
    assert by_kind(default_docs, "VolumeGroupSnapshotClass") == {}
    assert _snapshotter_gates(default_docs) == []
    named = render({"volumeGroupSnapshotClass": {"apiVersion": "groupsnapshot.storage.k8s.io/v1"}})
    vgsc = by_kind(named, "VolumeGroupSnapshotClass")["zvolt"]
    assert vgsc["apiVersion"] == "groupsnapshot.storage.k8s.io/v1"
    assert vgsc["driver"] == "csi.zvolt.io" and vgsc["deletionPolicy"] == "Delete"
    assert vgsc["metadata"]["annotations"] == {"groupsnapshot.storage.kubernetes.io/is-default-class": "true"}
    assert _snapshotter_gates(named) == ["--feature-gates=CSIVolumeGroupSnapshot=true"]
    off = render({"volumeGroupSnapshotClass": {"enabled": False, "apiVersion": "groupsnapshot.storage.k8s.io/v1"}})
    assert by_kind(off, "VolumeGroupSnapshotClass") == {} and _snapshotter_gates(off) == []


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_driver_accepts_every_storage_class_the_chart_makes(variant: str) -> None:
    """The chart and the driver agree on parameters: each rendered class parses in the driver
    (less the secret references the sidecars take out before calling it)."""
    for sc in by_kind(render(VARIANTS[variant]), "StorageClass").values():
        driver_part = driver_parameters(sc)
        assert set(driver_part) <= set(params.DRIVER_KEYS)
        params.parse(driver_part)


def driver_parameters(sc: Obj) -> dict[str, str]:
    """A rendered class's parameters as CreateVolume gets them: less the secret references,
    which the sidecars resolve and take out."""
    return {k: v for k, v in sc["parameters"].items() if not params.SIDECAR_KEY.fullmatch(k)}


def test_schema_allows_exactly_the_volume_properties_the_driver_takes() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    props = schema["properties"]["storageClasses"]["items"]["properties"]
    assert sorted(props["compression"]["enum"]) == sorted(volprops.COMPRESSION)
    sizes = [int(v[:-1]) * 1024 for v in props["volblocksize"]["enum"]]
    powers = [1 << n for n in range(12, 18)]
    assert sizes == powers and (sizes[0], sizes[-1]) == (volprops.VOLBLOCKSIZE_MIN, volprops.VOLBLOCKSIZE_MAX)


def test_schema_allows_exactly_the_sidecar_keys_as_extra_parameters() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    extra = schema["properties"]["storageClasses"]["items"]["properties"]["extraParameters"]
    assert extra["propertyNames"]["pattern"] == params.SIDECAR_KEY.pattern


def test_agent_certificate_names_are_unique() -> None:
    for values in ({}, {"fullnameOverride": "zvolt"},
                   {"tls": {"certManager": {"enabled": True}, "agentCertificates": "shared"}}):
        for cert in by_kind(render(values), "Certificate").values():
            names = cert["spec"].get("dnsNames", [])
            assert len(names) == len(set(names)), names
    docs = render({"fullnameOverride": "zvolt", "tls": {"agentCertificates": "shared"}})
    crt = base64.b64decode(by_kind(docs, "Secret")["zvolt-agent-tls"]["data"]["tls.crt"])
    text = _openssl(["x509", "-noout", "-ext", "subjectAltName"], data=crt)
    sans = [part.strip() for part in text.splitlines()[-1].split(",")]
    assert len(sans) == len(set(sans)), sans


def test_alpha_capabilities_and_probe_timeout_reach_the_controller() -> None:
    spec = by_kind(render({"controller": {"alphaCapabilities": ["GET_SNAPSHOT"]}}), "Deployment")
    pod = spec[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"]
    assert "--alpha-capabilities=GET_SNAPSHOT" in container(pod, "zvolt-controller")["args"]
    assert "--probe-timeout=5s" in container(pod, "liveness-probe")["args"]
    default = by_kind(render(), "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"]
    assert not any(a.startswith("--alpha") for a in container(default, "zvolt-controller")["args"])


def test_custom_storage_class() -> None:
    sc = by_kind(render(NON_DEFAULT), "StorageClass")["fast"]
    assert sc["parameters"] == {"volblocksize": "8K", "compression": "zstd", "thin": "false",
                                "csi.storage.k8s.io/fstype": "xfs",
                                "csi.storage.k8s.io/node-stage-secret-name": "zvolt-chap",
                                "csi.storage.k8s.io/node-stage-secret-namespace": "storage"}
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}
    assert sc["reclaimPolicy"] == "Retain"


def test_metrics_services_select_their_pods(default_docs: list[Obj]) -> None:
    workloads = {**by_kind(default_docs, "DaemonSet"), **by_kind(default_docs, "Deployment")}
    for name, svc in by_kind(default_docs, "Service").items():
        assert svc["spec"]["clusterIP"] == "None"
        sel = svc["spec"]["selector"]
        targets = [w for w in workloads.values()
                   if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        assert len(targets) == 1, name
        ports = {p["name"]: p["containerPort"] for c in targets[0]["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
        assert ports["metrics"] == svc["spec"]["ports"][0]["port"]
    assert {s["spec"]["ports"][0]["port"] for s in by_kind(default_docs, "Service").values()} == {9101, 9102, 9103}


def test_service_monitor() -> None:
    docs = render(NON_DEFAULT)
    sm = by_kind(docs, "ServiceMonitor")["zvolt-prod"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s" and sm["spec"]["endpoints"][0]["port"] == "metrics"
    services = by_kind(docs, "Service")
    selected = [n for n, s in services.items()
                if all(s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())]
    assert sorted(selected) == ["zvolt-prod-agent-metrics", "zvolt-prod-controller-metrics", "zvolt-prod-node-metrics"]


def test_cert_manager_mode() -> None:
    docs = render(NON_DEFAULT)
    assert by_kind(docs, "Secret") == {}
    issuers = by_kind(docs, "Issuer")
    assert issuers["zvolt-prod-selfsigned"]["spec"] == {"selfSigned": {}}
    assert issuers["zvolt-prod-ca"]["spec"] == {"ca": {"secretName": "zvolt-prod-ca"}}
    certs = by_kind(docs, "Certificate")
    assert certs["zvolt-prod-ca"]["spec"]["isCA"] is True
    agent = certs["zvolt-prod-agent"]["spec"]
    assert agent["secretName"] == "zvolt-prod-agent-tls" and agent["issuerRef"]["name"] == "zvolt-prod-ca"
    assert "zvolt-prod-agent.storage.svc" in agent["dnsNames"] and "server auth" in agent["usages"]
    assert "client auth" not in agent["usages"]  # an agent's certificate is no credential against another
    assert certs["zvolt-prod-controller"]["spec"]["secretName"] == "zvolt-prod-controller-tls"
    assert "client auth" in certs["zvolt-prod-controller"]["spec"]["usages"]
    # The pods mount the Secrets cert-manager fills.
    agent_spec = by_kind(docs, "DaemonSet")["zvolt-prod-agent"]["spec"]["template"]["spec"]
    assert next(v for v in agent_spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == \
        "zvolt-prod-agent-tls"


def test_cert_manager_with_an_external_issuer() -> None:
    docs = render(VARIANTS["cert-manager-external-issuer"])
    assert by_kind(docs, "Issuer") == {}
    certs = by_kind(docs, "Certificate")
    assert set(certs) == {f"{RELEASE}-zvolt-agent", f"{RELEASE}-zvolt-controller"}
    for c in certs.values():
        assert c["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def _openssl(args: list[str], data: bytes | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(["openssl", *args], input=data, capture_output=True, cwd=cwd, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def test_generated_certificates_form_a_working_mtls_pair(tmp_path: Path) -> None:
    """tls.agentCertificates=shared (per-node: tests/unit/test_chart_agent_certificates.py)."""
    default_docs = render(VARIANTS["shared-agent-certificate"])
    secrets = by_kind(default_docs, "Secret")
    files: dict[str, Path] = {}
    for role in ("ca", "agent-tls", "controller-tls"):
        s = secrets[f"{RELEASE}-zvolt-{role}"]
        assert s["type"] == "kubernetes.io/tls"
        for key, val in s["data"].items():
            path = tmp_path / f"{role}-{key}"
            path.write_bytes(base64.b64decode(val))
            files[f"{role}/{key}"] = path
    assert secrets[f"{RELEASE}-zvolt-ca"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    ca = str(files["ca/tls.crt"])
    for role, purpose in (("agent-tls", "sslserver"), ("controller-tls", "sslclient")):
        out = _openssl(["verify", "-CAfile", ca, "-purpose", purpose, str(files[f"{role}/tls.crt"])])
        assert out.strip().endswith(": OK")
        assert files[f"{role}/ca.crt"].read_bytes() == files["ca/tls.crt"].read_bytes()
        # The key belongs to the certificate.
        cert_pub = _openssl(["x509", "-noout", "-pubkey", "-in", str(files[f"{role}/tls.crt"])])
        key_pub = _openssl(["pkey", "-pubout", "-in", str(files[f"{role}/tls.key"])])
        assert cert_pub == key_pub
    text = _openssl(["x509", "-noout", "-text", "-in", str(files["agent-tls/tls.crt"])])
    assert f"DNS:{RELEASE}-zvolt-agent.{NAMESPACE}.svc" in text
    # The name the controller is told to expect is in the agent's certificate.
    ctrl = container(by_kind(default_docs, "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"],
                     "zvolt-controller")
    expected = next(a.split("=", 1)[1] for a in ctrl["args"] if a.startswith("--tls-server-name="))
    assert f"DNS:{expected}" in text
    # The agent lets change volumes only the certificate whose CN it is told: the controller's.
    agent = container(by_kind(default_docs, "DaemonSet")[f"{RELEASE}-zvolt-agent"]["spec"]["template"]["spec"],
                      "zvolt-agent")
    allowed = next(a.split("=", 1)[1] for a in agent["args"] if a.startswith("--controller-cn="))
    subject = _openssl(["x509", "-noout", "-subject", "-nameopt", "multiline", "-in",
                        str(files["controller-tls/tls.crt"])])
    assert f"commonName                = {allowed}" in subject, subject
    assert allowed not in _openssl(["x509", "-noout", "-subject", "-in", str(files["agent-tls/tls.crt"])])


def test_pods_roll_when_certificates_change(default_docs: list[Obj]) -> None:
    """Each offline render makes new certificates; the pod templates carry their checksum."""
    again = render()
    for kind, name in (("Deployment", f"{RELEASE}-zvolt-controller"), ("DaemonSet", f"{RELEASE}-zvolt-agent")):
        a = by_kind(default_docs, kind)[name]["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
        b = by_kind(again, kind)[name]["spec"]["template"]["metadata"]["annotations"]["checksum/tls"]
        assert len(a) == 64 and a != b


def test_values_yaml_documents_every_key() -> None:
    """Every key in values.yaml is declared in values.schema.json (and so validated)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(v: Any, s: Obj, path: str) -> None:
        if isinstance(v, dict) and s.get("additionalProperties") is False:
            for k, sub in v.items():
                assert k in s["properties"], f"{path}.{k} is not in values.schema.json"
                walk(sub, s["properties"][k], f"{path}.{k}")

    walk(values, schema, "")
    text = (CHART / "values.yaml").read_text()
    for top in values:
        idx = text.index(f"\n{top}:")
        assert "#" in text[max(0, idx - 300):idx], f"{top} has no comment in values.yaml"


# --- the command lines the chart writes are the ones the programs accept --------------------

def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) substitution from the container's env."""
    out = []
    for arg in args:
        for key, value in env.items():
            arg = arg.replace(f"$({key})", value)
        assert "$(" not in arg, f"unresolved variable in {arg}"
        out.append(arg)
    return out


def test_chart_command_lines_parse_with_the_real_clis(default_docs: list[Obj]) -> None:
    from agent.main import parse_settings, resolve_nvme_address
    from csi.main import parser as csi_parser
    from zvolt.nftguard import GuardSpec, Role, guard_spec
    from zvolt.storagenet import LocalAddress

    pod_env = {"NODE_NAME": "storage-0", "POD_IP": "10.1.2.3", "ADDRESS": "/csi/csi.sock"}
    ds = by_kind(default_docs, "DaemonSet")
    agent = container(ds[f"{RELEASE}-zvolt-agent"]["spec"]["template"]["spec"], "zvolt-agent")
    settings = parse_settings(_expand(agent["args"], pod_env), env={})
    assert (settings.node, settings.pool, settings.parent) == ("storage-0", "tank", "tank/zvolt")
    assert settings.listen == "10.1.2.3:7001" and settings.metrics_listen == "10.1.2.3:9101"
    assert (settings.storage_network, settings.nvme_port, settings.guard) == (STORAGE_NETWORK, "4420", True)
    # The target's address is the node's own inside the storage network, not the pod IP.
    node_addrs = [LocalAddress("eth0", ipaddress.ip_address("10.1.2.3")),
                  LocalAddress("eth1", ipaddress.ip_address("10.42.0.7"))]
    assert resolve_nvme_address(settings, lambda version: node_addrs).nvme_address == "10.42.0.7"
    assert settings.tls == ("/var/lib/zvolt/tls/current/tls.crt", "/var/lib/zvolt/tls/current/tls.key",
                            "/etc/zvolt/tls/ca.crt") and settings.tls_request_seconds == 168 * 3600
    assert settings.dhchap  # publishes without DH-HMAC-CHAP keys refused

    node = container(ds[f"{RELEASE}-zvolt-node"]["spec"]["template"]["spec"], "zvolt-node")
    nargs = csi_parser().parse_args(_expand(node["args"], pod_env))
    assert (nargs.mode, nargs.node_id, nargs.state_dir) == ("node", "storage-0", "/var/lib/zvolt-node")
    assert guard_spec(Role.WORKER, nargs.storage_network, nargs.nvme_port) == \
        GuardSpec(Role.WORKER, ipaddress.ip_network(STORAGE_NETWORK), (4420, 4421)) and not nargs.no_guard

    ctrl = container(by_kind(default_docs, "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["spec"],
                     "zvolt-controller")
    cargs = csi_parser().parse_args(_expand(ctrl["args"], pod_env))
    assert cargs.mode == "controller" and cargs.agents_from_kubernetes and not cargs.insecure
    assert cargs.agent_namespace == NAMESPACE and cargs.agent_port == 7001
    assert cargs.tls_per_node_names and not cargs.tls_server_name and cargs.sign_agent_certificates
    assert cargs.agent_service_account == f"{RELEASE}-zvolt-agent"
    assert cargs.dhchap_secret_namespace == NAMESPACE


def _chart_with_lookup_seam(tmp_path: Path) -> Path:
    """A copy of the chart whose `lookup` of the three TLS Secrets reads .Values.seam instead
    of a cluster (offline, lookup always returns nothing). Only those three calls change."""
    import shutil

    copy_dir = tmp_path / "zvolt"
    shutil.copytree(CHART, copy_dir)
    (copy_dir / "values.schema.json").unlink()  # the seam key is not a real value
    tpl = copy_dir / "templates" / "certificates.yaml"
    text = tpl.read_text()
    for helper, key in (("zvolt.caSecret", "ca"), ("zvolt.agentTlsSecret", "agent"),
                        ("zvolt.controllerTlsSecret", "controller")):
        call = f'lookup "v1" "Secret" $ns (include "{helper}" .)'
        assert text.count(call) == 1
        text = text.replace(call, f'(index (.Values.seam | default dict) "{key}" | default dict)')
    tpl.write_text(text)
    return copy_dir


def _render_at(chart_dir: Path, values: Obj) -> list[Obj]:
    manifests = helm_python.Chart.load(chart_dir).render(with_required(values), name=RELEASE, namespace=NAMESPACE,
                                                         is_upgrade=True)
    return [d for p, t in sorted(manifests.items()) if p.endswith(".yaml") for d in yaml.safe_load_all(t) if d]


def test_certificates_are_stable_across_upgrades_and_reinstalls(tmp_path: Path) -> None:
    chart_dir = _chart_with_lookup_seam(tmp_path)
    shared: Obj = {"tls": {"agentCertificates": "shared"}}
    first = by_kind(_render_at(chart_dir, shared), "Secret")
    existing = {"ca": first[f"{RELEASE}-zvolt-ca"], "agent": first[f"{RELEASE}-zvolt-agent-tls"],
                "controller": first[f"{RELEASE}-zvolt-controller-tls"]}

    # Upgrade: every Secret exists, nothing changes (and so the pods do not roll).
    upgraded = _render_at(chart_dir, {**shared, "seam": existing})
    assert {n: s["data"] for n, s in by_kind(upgraded, "Secret").items()} == \
        {n: s["data"] for n, s in first.items()}
    again = _render_at(chart_dir, {**shared, "seam": existing})
    ann = [by_kind(d, "Deployment")[f"{RELEASE}-zvolt-controller"]["spec"]["template"]["metadata"]["annotations"]
           for d in (upgraded, again)]
    assert ann[0]["checksum/tls"] == ann[1]["checksum/tls"]

    # Reinstall after uninstall: only the kept CA survives; new leaves are signed by it.
    reinstalled = by_kind(_render_at(chart_dir, {**shared, "seam": {"ca": existing["ca"]}}), "Secret")
    assert reinstalled[f"{RELEASE}-zvolt-ca"]["data"] == existing["ca"]["data"]
    agent = reinstalled[f"{RELEASE}-zvolt-agent-tls"]["data"]
    assert agent["tls.crt"] != existing["agent"]["data"]["tls.crt"]
    ca_file, crt_file = tmp_path / "ca.crt", tmp_path / "agent.crt"
    ca_file.write_bytes(base64.b64decode(existing["ca"]["data"]["tls.crt"]))
    crt_file.write_bytes(base64.b64decode(agent["tls.crt"]))
    assert _openssl(["verify", "-CAfile", str(ca_file), str(crt_file)]).strip().endswith(": OK")
    assert agent["ca.crt"] == existing["ca"]["data"]["tls.crt"]


# --- monitoring: Grafana dashboard and PrometheusRule (both off by default) ----------------

MONITORING: Obj = {"metrics": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Storage"}},
                               "prometheusRule": {"enabled": True, "labels": {"release": "prom"}}}}


def test_monitoring_is_off_by_default(default_docs: list[Obj]) -> None:
    assert by_kind(default_docs, "ConfigMap") == {} and by_kind(default_docs, "PrometheusRule") == {}


def test_dashboard_configmap_carries_the_chart_dashboard() -> None:
    report = helm_python.lint(CHART, with_required(MONITORING), strict=True, namespace=NAMESPACE,
                              kube_version=f"v{KUBE_VERSION}")
    assert [m for m in report["messages"] if m["severity"] >= 2] == [] and report["errors"] == []
    cm = by_kind(render(MONITORING), "ConfigMap")[f"{RELEASE}-zvolt-dashboard"]
    validate_strict(cm)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Storage"}
    shipped = json.loads((CHART / "dashboards" / "zvolt.json").read_text())
    assert json.loads(cm["data"]["zvolt.json"]) == shipped
    titles = {p["title"] for p in shipped["panels"]}
    for wanted in ("Pool fill", "Commitment ratio and limit", "Fragmentation", "Agent p99 latency by method",
                   "CSI errors by method and status", "Exported (attached) volumes",
                   "Start-up to ready (exports restored)"):
        assert wanted in titles
    assert all(t["expr"] for p in shipped["panels"] for t in p.get("targets", []))


def test_prometheus_rule_alerts() -> None:
    rule = by_kind(render(MONITORING), "PrometheusRule")[RELEASE + "-zvolt"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prom"
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {"ZvoltPoolFilling", "ZvoltPoolFull", "ZvoltCommitmentNearLimit", "ZvoltAgentNotReady",
                          "ZvoltExportsNotRestored", "ZvoltVolumeConditionAbnormal"}
    assert rules["ZvoltPoolFilling"]["expr"].endswith("> 0.8") and rules["ZvoltPoolFull"]["expr"].endswith("> 0.9")
    for r in rules.values():
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}
        assert r["labels"]["severity"] in ("warning", "critical")
        assert "{{ $labels.node }}" in r["annotations"]["summary"]  # Prometheus templating survived Helm's


def test_monitoring_values_are_checked() -> None:
    report = helm_python.lint(CHART, with_required({"metrics": {"prometheusRule": {"enabled": True,
                                                                                   "poolFillWarning": 80}}}),
                              strict=True)
    assert "/metrics/prometheusRule/poolFillWarning" in " ".join(m["error"] for m in report["messages"]
                                                                  if m["severity"] >= 3)


def test_trim_interval_and_class_mount_options_reach_the_driver() -> None:
    """Reclaim (csi/README.md): the node plugin's periodic trim is set from values, and a class
    may ask for online discard instead; every option a class sets passes the node plugin's own
    allow-list, so no volume of the class fails to stage."""
    sc = {"name": "online", "volblocksize": "8K", "compression": "lz4", "fsType": "ext4",
          "mountOptions": ["discard", "noatime"]}
    docs = render({"node": {"trimIntervalSeconds": 0}, "storageClasses": [sc]})
    node = container(by_kind(docs, "DaemonSet")[f"{RELEASE}-zvolt-node"]["spec"]["template"]["spec"], "zvolt-node")
    assert "--trim-interval=0" in node["args"]
    rendered = by_kind(docs, "StorageClass")["online"]
    assert rendered["mountOptions"] == ["discard", "noatime"]
    assert check_mount_flags(rendered["mountOptions"]) == ["discard", "noatime"]
    assert all("mountOptions" not in c for c in by_kind(render(), "StorageClass").values())
    for bad, where in (({"node": {"trimIntervalSeconds": -1}}, "/node/trimIntervalSeconds"),
                       ({"storageClasses": [{**sc, "mountOptions": ["discard,dev"]}]},
                        "/storageClasses/0/mountOptions/0")):
        report = helm_python.lint(CHART, with_required(bad), strict=True)
        assert where in " ".join(m["error"] for m in report["messages"] if m["severity"] >= 3), report
