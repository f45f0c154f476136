"""A real Kubernetes control plane on 127.0.0.1 for one test session.

etcd, kube-apiserver (RBAC on), kube-controller-manager, kube-scheduler, the snapshot CRDs and
snapshot-controller (its own ServiceAccount and RBAC, snapshot-controller-rbac.yaml), all on
free ports, with a CA and certificates made by openssl, in one temporary directory that
`ControlPlane.close()` removes after stopping every process. kube-apiserver reaches nodes
(kubelet exec and logs) only through egress_proxy.py, along the routes a lab node adds
(`ControlPlane.route`). Flags are the ones recorded in
the project's k8s notes; binaries come from $ZVOLT_K8S_BIN (lab/k8sbin.py), CRDs from
$ZVOLT_K8S_CRDS (default: the `crds` directory next to the binaries directory).
"""

from __future__ import annotations

import atexit
import http.client
import ipaddress
import json
import os
import shutil
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, utils
from kubernetes.client.rest import ApiException

from lab.k8sbin import ENV as K8S_BIN_ENV
from lab.k8sbin import k8s_bin, k8s_bin_dir
from lab.kubenode import APISERVER_IP as GUEST_APISERVER_IP

from .pki import Pki
from .procs import HarnessError, Ports, Process, Processes, wait_for

Obj = dict[str, Any]
Say = Callable[[str], None]

CRDS_ENV = "ZVOLT_K8S_CRDS"
# A directory to copy the processes' logs into before the session's directory is removed.
KEEP_LOGS_ENV = "ZVOLT_K8S_KEEP_LOGS"
CONTROL_PLANE_BINS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "snapshot-controller")
# The kubernetes-csi sidecars of the chart's controller Deployment, by binary (= image) name.
SIDECAR_BINS = ("csi-provisioner", "csi-attacher", "csi-resizer", "csi-snapshotter", "livenessprobe")
SNAPSHOT_CRDS = (
    "snapshot.storage.k8s.io_volumesnapshotclasses.yaml",
    "snapshot.storage.k8s.io_volumesnapshotcontents.yaml",
    "snapshot.storage.k8s.io_volumesnapshots.yaml",
    "groupsnapshot.storage.k8s.io_volumegroupsnapshotclasses.yaml",
    "groupsnapshot.storage.k8s.io_volumegroupsnapshotcontents.yaml",
    "groupsnapshot.storage.k8s.io_volumegroupsnapshots.yaml",
)
SNAPSHOT_CONTROLLER_RBAC = Path(__file__).with_name("snapshot-controller-rbac.yaml")
SNAPSHOT_CONTROLLER_SA = ("kube-system", "snapshot-controller")
SNAPSHOT_CONTROLLER_LEASE = "snapshot-controller-leader"

SERVICE_CIDR = "10.96.0.0/24"
# The `kubernetes` Service's address, where pods reach the API server (its serving cert names it).
KUBERNETES_SERVICE_IP = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
EGRESS_PROXY = Path(__file__).with_name("egress_proxy.py")
ISSUER = "https://kubernetes.default.svc.cluster.local"
# kube-system ServiceAccounts the tests rely on: kube-controller-manager creates one per
# controller (--use-service-account-credentials) as it starts that controller.
KUBE_SYSTEM_SERVICE_ACCOUNTS = (
    "default", "service-account-controller", "deployment-controller", "replicaset-controller",
    "persistent-volume-binder", "pvc-protection-controller", "attachdetach-controller",
)
TOKEN_SECONDS = 3600


def crds_dir() -> Path:
    env = os.environ.get(CRDS_ENV)
    return Path(env).expanduser() if env else k8s_bin_dir().parent / "crds"


def find_binaries(names: Iterable[str]) -> tuple[dict[str, Path], str | None]:
    """The binaries found, and one line naming what is missing and where it looked (or None)."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in names:
        path = k8s_bin(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    crds = crds_dir()
    missing_crds = [f for f in SNAPSHOT_CRDS if not (crds / f).is_file()]
    problems = []
    if missing:
        problems.append(f"{', '.join(missing)} not found in {k8s_bin_dir()} (${K8S_BIN_ENV})")
    if missing_crds:
        problems.append(f"{len(missing_crds)} snapshot CRDs not found in {crds} (${CRDS_ENV})")
    if shutil.which("openssl") is None:
        problems.append("openssl not on PATH")
    return found, ("; ".join(problems) or None)


def write_kubeconfig(path: Path, server: str, ca: Path, user: str, *, cert: Path | None = None,
                     key: Path | None = None, token: str | None = None, namespace: str | None = None) -> Path:
    creds: Obj = {}
    if cert is not None and key is not None:
        creds = {"client-certificate": str(cert), "client-key": str(key)}
    if token is not None:
        creds["token"] = token
    context: Obj = {"cluster": "zvolt-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "zvolt-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": "zvolt-test", "context": context}],
        "current-context": "zvolt-test",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)
    return path


def api_client(kubeconfig: Path) -> Any:
    """A kubernetes.client.ApiClient for a kubeconfig file (the project's pinned client)."""
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    return client.ApiClient(cfg)


def status_of(err: ApiException) -> int:
    return int(err.status or 0)


@dataclass
class ControlPlane:
    root: Path
    procs: Processes
    ports: Ports
    say: Say
    pki: Pki | None = None
    server: str = ""
    admin_kubeconfig: Path = Path()
    timings: dict[str, float] = field(default_factory=dict)
    # What kube-apiserver's "cluster" egress proxy (egress_proxy.py) dials per target address.
    egress_routes: Path = Path()
    _api: Any = None
    _closed: bool = False

    # --- clients ---------------------------------------------------------------------

    @property
    def api(self) -> Any:
        """The admin ApiClient (system:masters)."""
        if self._api is None:
            self._api = api_client(self.admin_kubeconfig)
        return self._api

    @property
    def ca(self) -> Path:
        assert self.pki is not None
        return self.pki.ca.cert

    def kubeconfig_dir(self) -> Path:
        path = self.root / "kubeconfigs"
        path.mkdir(exist_ok=True)
        return path

    def service_account_token(self, namespace: str, name: str, *, pod: tuple[str, str] | None = None,
                              seconds: int = TOKEN_SECONDS) -> str:
        """A token for ServiceAccount namespace/name from the TokenRequest API; bound to the pod
        (name, uid) when given, like the projected token kubelet gives that pod."""
        bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod[0], uid=pod[1]) if pod else None
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds, bound_object_ref=bound)
        )
        answer = client.CoreV1Api(self.api).create_namespaced_service_account_token(name, namespace, request)
        token = answer.status.token
        assert isinstance(token, str) and token
        return token

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None, *,
                                   pod: tuple[str, str] | None = None) -> Path:
        token = self.service_account_token(namespace, name, pod=pod)
        path = path or self.kubeconfig_dir() / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(path, self.server, self.ca, f"system:serviceaccount:{namespace}:{name}",
                                token=token, namespace=namespace)

    def apply(self, docs: Iterable[Obj]) -> None:
        """Create each object (as the admin); an object that already exists is left as it is."""
        for doc in docs:
            try:
                utils.create_from_dict(self.api, doc)
            except utils.FailToCreateError as err:
                if not all(status_of(e) == 409 for e in err.api_exceptions):
                    raise

    def route(self, target: str, local: str) -> None:
        """Let kube-apiserver reach `target` (a node's "IP:PORT", e.g. a lab kubelet's) at
        `local` ("127.0.0.1:PORT") through its egress proxy; local "" removes the route."""
        routes = json.loads(self.egress_routes.read_text()) if self.egress_routes.is_file() else {}
        if local:
            routes[target] = local
        else:
            routes.pop(target, None)
        tmp = self.egress_routes.with_suffix(".tmp")
        tmp.write_text(json.dumps(routes))
        os.replace(tmp, self.egress_routes)

    # --- lifecycle -------------------------------------------------------------------

    def check_alive(self) -> None:
        for proc in self.procs.started:
            if proc.name in CONTROL_PLANE_BINS:
                proc.check()

    def close(self) -> None:
        """Stop every process (clients, then kube-apiserver, then etcd) and remove the directory."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            killed = self.procs.stop_all()
            if killed:
                self.say(f"k8s: had to SIGKILL {', '.join(killed)}")
        finally:
            if self._api is not None:
                self._api.close()
                self._api = None
            keep = os.environ.get(KEEP_LOGS_ENV)
            if keep and (self.root / "logs").is_dir():
                shutil.copytree(self.root / "logs", Path(keep) / self.root.name, dirs_exist_ok=True)
            shutil.rmtree(self.root, ignore_errors=True)
        left = self.procs.still_running()
        if left:
            raise HarnessError(f"processes survived the stop: {[(p.name, p.pid) for p in left]}")
        if self.root.exists():
            raise HarnessError(f"could not remove {self.root}")


def _timed(cp: ControlPlane, what: str, t0: float) -> None:
    cp.timings[what] = time.monotonic() - t0
    cp.say(f"k8s: {what} in {cp.timings[what]:.1f} s")


def _http_json(url: str, context: ssl.SSLContext | None = None) -> Any:
    with urllib.request.urlopen(url, timeout=5, context=context) as resp:
        return json.loads(resp.read())


def _https_ok(port: int, path: str, context: ssl.SSLContext) -> bool | None:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
    finally:
        conn.close()
    return True if resp.status == 200 and body.strip() == "ok" else None


def start(bins: Mapping[str, Path], crds: Path, say: Say) -> ControlPlane:
    """Start everything and wait until it is usable; on failure stop what started and remove
    the directory, raising HarnessError with the relevant log tail."""
    root = Path(tempfile.mkdtemp(prefix="zvolt-k8s-"))
    cp = ControlPlane(root=root, procs=Processes(root / "logs"), ports=Ports(), say=say)
    atexit.register(cp.close)  # the safety net if the caller never gets to close it
    try:
        _start(cp, bins, crds)
    except BaseException:
        cp.close()
        raise
    return cp


def _start(cp: ControlPlane, bins: Mapping[str, Path], crds: Path) -> None:
    t_all = time.monotonic()
    root = cp.root
    ports = cp.ports

    # etcd
    t0 = time.monotonic()
    etcd_port, peer_port = ports.take(), ports.take()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = cp.procs.start("etcd", [
        bins["etcd"], "--name=zvolt-test", f"--data-dir={root / 'etcd'}",
        f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=zvolt-test={peer_url}", "--initial-cluster-state=new",
        "--logger=zap", "--log-outputs=stderr",
    ])
    # The certificates meanwhile (openssl, ~0.3 s).
    pki = cp.pki = Pki(root / "pki")
    serving = pki.issue("kube-apiserver", "/CN=kube-apiserver",
                        server_sans=("IP:127.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
                                     "DNS:kubernetes.default.svc",
                                     # what a lab guest's kubelet dials (its guestfwd to this port)
                                     f"IP:{GUEST_APISERVER_IP}",
                                     # what pods dial (a lab node DNATs it to the guestfwd)
                                     f"IP:{KUBERNETES_SERVICE_IP}"), client=False)
    # kube-apiserver -> kubelet (exec, logs): the kubelet authorizes any client of the CA.
    kubelet_client = pki.issue("apiserver-kubelet-client", "/CN=kube-apiserver-kubelet-client")
    admin = pki.issue("admin", "/O=system:masters/CN=kubernetes-admin")
    kcm = pki.issue("kube-controller-manager", "/CN=system:kube-controller-manager")
    sched = pki.issue("kube-scheduler", "/CN=system:kube-scheduler")
    # The aggregation layer's client (kube-apiserver -> extension API servers). Configuring it
    # also publishes the request-header CA, which the controller-manager and the scheduler
    # otherwise complain about every few seconds.
    proxy = pki.issue("front-proxy-client", "/CN=front-proxy-client")
    wait_for("etcd", lambda: True if _http_json(f"{etcd_url}/health").get("health") == "true" else None,
             30, watch=[etcd])
    _timed(cp, "etcd ready", t0)

    # kube-apiserver, its traffic to nodes through the egress proxy
    t0 = time.monotonic()
    cp.egress_routes = root / "egress-routes.json"
    cp.egress_routes.write_text("{}")
    egress_socket = root / "egress.sock"
    cp.procs.start("egress-proxy", [sys.executable, "-I", "-S", EGRESS_PROXY, egress_socket, cp.egress_routes])
    egress_config = root / "egress-selector.yaml"
    egress_config.write_text(yaml.safe_dump({
        "apiVersion": "apiserver.k8s.io/v1beta1", "kind": "EgressSelectorConfiguration",
        "egressSelections": [{"name": "cluster", "connection": {
            "proxyProtocol": "HTTPConnect", "transport": {"uds": {"udsName": str(egress_socket)}}}}],
    }))
    api_port = ports.take()
    cp.server = f"https://127.0.0.1:{api_port}"
    apiserver = cp.procs.start("kube-apiserver", [
        bins["kube-apiserver"],
        f"--etcd-servers={etcd_url}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
        f"--cert-dir={root / 'apiserver'}",
        f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
        f"--client-ca-file={pki.ca.cert}",
        f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
        f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
        "--authorization-mode=Node,RBAC",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--endpoint-reconciler-type=none",
        "--allow-privileged=true",
        f"--requestheader-client-ca-file={pki.ca.cert}", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={proxy.cert}", f"--proxy-client-key-file={proxy.key}",
        f"--kubelet-client-certificate={kubelet_client.cert}", f"--kubelet-client-key={kubelet_client.key}",
        # A node's address, as egress routes name it (the default prefers its host name).
        "--kubelet-preferred-address-types=InternalIP",
        f"--egress-selector-config-file={egress_config}",
        "--v=1",
    ])
    kubeconfigs = cp.kubeconfig_dir()
    cp.admin_kubeconfig = write_kubeconfig(kubeconfigs / "admin.kubeconfig", cp.server, pki.ca.cert,
                                           "kubernetes-admin", cert=admin.cert, key=admin.key)
    admin_tls = ssl.create_default_context(cafile=str(pki.ca.cert))
    admin_tls.load_cert_chain(str(admin.cert), str(admin.key))
    wait_for("kube-apiserver /readyz", lambda: _https_ok(api_port, "/readyz", admin_tls), 120,
             watch=[apiserver, etcd], interval=0.3)
    _timed(cp, "kube-apiserver ready", t0)

    # kube-controller-manager and kube-scheduler
    t0 = time.monotonic()
    kcm_kc = write_kubeconfig(kubeconfigs / "kube-controller-manager.kubeconfig", cp.server, pki.ca.cert,
                              "system:kube-controller-manager", cert=kcm.cert, key=kcm.key)
    sched_kc = write_kubeconfig(kubeconfigs / "kube-scheduler.kubeconfig", cp.server, pki.ca.cert,
                                "system:kube-scheduler", cert=sched.cert, key=sched.key)
    kcm_port, sched_port = ports.take(), ports.take()
    controller_manager = cp.procs.start("kube-controller-manager", [
        bins["kube-controller-manager"],
        f"--kubeconfig={kcm_kc}", f"--authentication-kubeconfig={kcm_kc}", f"--authorization-kubeconfig={kcm_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={kcm_port}", f"--cert-dir={root / 'kcm'}",
        "--controllers=*", "--use-service-account-credentials=true",
        f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca.cert}",
        f"--cluster-signing-cert-file={pki.ca.cert}", f"--cluster-signing-key-file={pki.ca.key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--leader-elect=false", "--v=1",
    ])
    scheduler = cp.procs.start("kube-scheduler", [
        bins["kube-scheduler"],
        f"--kubeconfig={sched_kc}", f"--authentication-kubeconfig={sched_kc}",
        f"--authorization-kubeconfig={sched_kc}",
        "--bind-address=127.0.0.1", f"--secure-port={sched_port}", f"--cert-dir={root / 'scheduler'}",
        "--leader-elect=false", "--v=1",
    ])
    # Their serving certificates are self-signed (--cert-dir); /healthz is open to anyone.
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    wait_for("kube-controller-manager /healthz", lambda: _https_ok(kcm_port, "/healthz", loose), 60,
             watch=[controller_manager, apiserver])
    wait_for("kube-scheduler /healthz", lambda: _https_ok(sched_port, "/healthz", loose), 60,
             watch=[scheduler, apiserver])
    core = client.CoreV1Api(cp.api)

    def accounts() -> bool | None:
        core.read_namespace("default")
        have = {sa.metadata.name for sa in core.list_namespaced_service_account("kube-system").items}
        if not set(KUBE_SYSTEM_SERVICE_ACCOUNTS) <= have:
            return None
        core.read_namespaced_service_account("default", "default")
        return True

    wait_for("the default namespace and the kube-system ServiceAccounts", accounts, 60,
             watch=[controller_manager, apiserver])
    _timed(cp, "controller-manager and scheduler healthy, ServiceAccounts created", t0)
    _timed(cp, "control plane ready", t_all)

    # Snapshot CRDs (VolumeSnapshot* v1 and VolumeGroupSnapshot* v1beta1) and snapshot-controller
    t0 = time.monotonic()
    ext = client.ApiextensionsV1Api(cp.api)
    names = []
    for file in SNAPSHOT_CRDS:
        doc = yaml.safe_load((crds / file).read_text())
        names.append(doc["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(doc)
        except ApiException as err:
            if status_of(err) != 409:
                raise

    def established() -> bool | None:
        for name in names:
            conds = ext.read_custom_resource_definition(name).status.conditions or []
            if not any(c.type == "Established" and c.status == "True" for c in conds):
                return None
        return True

    wait_for("snapshot CRDs Established", established, 60, watch=[apiserver])
    _timed(cp, "snapshot CRDs established", t0)

    t0 = time.monotonic()
    start_snapshot_controller(cp, bins["snapshot-controller"])
    _timed(cp, "snapshot-controller leading", t0)


def start_snapshot_controller(cp: ControlPlane, binary: Path) -> Process:
    cp.apply(d for d in yaml.safe_load_all(SNAPSHOT_CONTROLLER_RBAC.read_text()) if d)
    namespace, name = SNAPSHOT_CONTROLLER_SA
    kubeconfig = cp.service_account_kubeconfig(namespace, name)
    proc = cp.procs.start("snapshot-controller", [
        binary, f"--kubeconfig={kubeconfig}", "--v=2",
        "--leader-election=true", f"--leader-election-namespace={namespace}",
        "--retry-interval-start=500ms",
        # v8.2 ships VolumeGroupSnapshot (beta) off; the chart's snapshotter turns it on too.
        "--feature-gates=CSIVolumeGroupSnapshot=true",
    ])
    coordination = client.CoordinationV1Api(cp.api)

    def leading() -> bool | None:
        try:
            lease = coordination.read_namespaced_lease(SNAPSHOT_CONTROLLER_LEASE, namespace)
        except ApiException as err:
            if status_of(err) == 404:
                return None
            raise
        if not lease.spec.holder_identity:
            return None
        return True if "Starting snapshot controller" in proc.log_text() else None

    wait_for("snapshot-controller to hold its lease and start", leading, 60,
             watch=[proc, cp.procs.get("kube-apiserver")])
    return proc


def forbidden_lines(text: str) -> list[str]:
    """Log lines of a Kubernetes client that was refused by RBAC."""
    return [line for line in text.splitlines() if "forbidden" in line.lower() and "cannot" in line.lower()]
