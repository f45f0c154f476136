"""A Kubernetes node in the lab guest: containerd (bookworm's, in the image), a CNI bridge, and
the kubelet binary from $ZVOLT_K8S_BIN, joined to an API server on the host's 127.0.0.1.

The guest's user network is restricted (no path to the host), so the guest reaches the API
server through a qemu guestfwd: a connection to APISERVER_IP:APISERVER_PORT in the guest is
relayed (lab/guestfwd_relay.py) to the host port written into the run directory by
publish_apiserver(). The API server's serving certificate must name APISERVER_IP.

Pods reach the API server at the `kubernetes` Service address (there is no kube-proxy): the
guest DNATs it to the guestfwd address and masquerades pod sources (service_nat). The API
server reaches the kubelet (exec, logs) through a host-side ssh forward to KUBELET_PORT
(KubeletTunnel), which the test control plane's egress proxy routes NODE_IP:KUBELET_PORT to.

One guest is storage and worker node at once: kubelet runs in the guest's root namespace, next
to the lab's storage/worker network namespaces (a second guest would double the TCG cost on
machines with two cores; the guest's 4 GiB hold kubelet, containerd and the pods).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab import guest, qemu, recipe, ssh
from lab.guest import GuestCommandError, Lab

# The address qemu's user network keeps for guestfwd rules (outside its DHCP range).
APISERVER_IP = "10.0.2.100"
APISERVER_PORT = 6443
APISERVER_URL = f"https://{APISERVER_IP}:{APISERVER_PORT}"
NODE_NAME = recipe.GUEST_HOSTNAME
NODE_IP = "10.0.2.15"  # qemu user network's first DHCP lease: the guest's eth0
POD_SUBNET = "10.88.0.0/24"
CNI_BRIDGE = "cni0"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CONTAINERD_NAMESPACE = "k8s.io"
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10"  # one of lab.node_images.PAUSE_REFS
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CONF_DIR = "/etc/zvolt-kube"
KUBELET = "/usr/local/bin/kubelet"
IMAGE_DIR = "/var/tmp/zvolt-images"
KUBELET_SERVICE = "kubelet"  # lab.guest unit name: zvolt-kubelet.service
KUBELET_PORT = 10250
SERVICE_PORT = 443  # the `kubernetes` Service's port
NAT_TABLE = "zvolt_lab_service"

PORT_FILE = "apiserver.port"
RELAY_LOG = "guestfwd-relay.log"


# --- host side: the guestfwd to the API server ------------------------------------------

def apiserver_guestfwd(run_dir: Path) -> qemu.GuestFwd:
    relay = Path(__file__).with_name("guestfwd_relay.py")
    # -I -S: the relay needs only the standard library; skip site and the user's environment.
    return qemu.GuestFwd(APISERVER_IP, APISERVER_PORT, (
        sys.executable, "-I", "-S", str(relay), str(run_dir / PORT_FILE), str(run_dir / RELAY_LOG)))


def publish_apiserver(run_dir: Path, port: int) -> None:
    """Point the guest's APISERVER_IP:APISERVER_PORT at 127.0.0.1:port on the host (read by the
    relay at each new connection)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    tmp = run_dir / f".{PORT_FILE}.tmp"
    tmp.write_text(f"{port}\n")
    os.replace(tmp, run_dir / PORT_FILE)


# --- what the guest runs ------------------------------------------------------------------

def containerd_config() -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return "\n".join([
        "version = 2",
        f"[{cri}]",
        f'  sandbox_image = "{SANDBOX_IMAGE}"',
        f"[{cri}.containerd]",
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        # kubelet's cgroup driver (systemd) and the runtime's must agree.
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = true",
        f"[{cri}.cni]",
        f'  bin_dir = "{CNI_BIN_DIR}"',
        '  conf_dir = "/etc/cni/net.d"',
        "",
    ])


def cni_conflist() -> str:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "zvolt-lab",
        "plugins": [{
            "type": "bridge", "bridge": CNI_BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]},
        }],
    }, indent=1) + "\n"


def kubelet_config() -> str:
    doc = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": f"{CONF_DIR}/ca.crt"}},
        # Only clients with a certificate of the cluster's CA get in (anonymous is off): the API
        # server's kubelet client, through KubeletTunnel.
        "authorization": {"mode": "AlwaysAllow"},
        "port": KUBELET_PORT,
        "cgroupDriver": "systemd",
        "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
        "readOnlyPort": 0,
        "resolvConf": "",  # the guest has no DNS to hand on
        "failSwapOn": False,
        # The lab's disk and memory are small by design: evict only when really out.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "runtimeRequestTimeout": "10m",  # TCG: starting a container can take a while
        "serializeImagePulls": False,
    }
    return yaml.safe_dump(doc, sort_keys=False)


def service_nat_rules(service_ip: str) -> str:
    """nft script: the `kubernetes` Service address to the API server's guestfwd, for pods
    (prerouting) and the node itself (output); pod sources masqueraded to the node's address,
    the only one qemu's user network answers. Replaces the table in one transaction."""
    ip = ipaddress.IPv4Address(service_ip)
    subnet = ipaddress.IPv4Network(POD_SUBNET)
    dnat = f"ip daddr {ip} tcp dport {SERVICE_PORT} dnat to {APISERVER_IP}:{APISERVER_PORT}"
    return "\n".join([
        f"table ip {NAT_TABLE}",
        f"delete table ip {NAT_TABLE}",
        f"table ip {NAT_TABLE} {{",
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; {dnat}; }}",
        f"  chain output {{ type nat hook output priority -100; {dnat}; }}",
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; "
        f"ip saddr {subnet} ip daddr {APISERVER_IP} tcp dport {APISERVER_PORT} masquerade; }}",
        "}",
        "",
    ])


def kubeconfig() -> str:
    doc = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {"server": APISERVER_URL,
                                                 "certificate-authority": f"{CONF_DIR}/ca.crt"}}],
        "users": [{"name": NODE_NAME, "user": {"client-certificate": f"{CONF_DIR}/kubelet.crt",
                                              "client-key": f"{CONF_DIR}/kubelet.key"}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": NODE_NAME}}],
        "current-context": "lab",
    }
    return yaml.safe_dump(doc, sort_keys=False)


def kubelet_argv() -> list[str]:
    return [KUBELET, f"--config={CONF_DIR}/kubelet.yaml", f"--kubeconfig={CONF_DIR}/kubelet.kubeconfig",
            f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1"]


def node_subject() -> str:
    """The client certificate subject the Node authorizer takes as this node's kubelet."""
    return f"/O=system:nodes/CN=system:node:{NODE_NAME}"


# --- putting it into a running guest ---------------------------------------------------------

@dataclass(frozen=True)
class NodeFiles:
    """Host files the node needs: the kubelet binary and its credentials."""

    kubelet: Path
    ca: Path
    cert: Path
    key: Path


def write_file(lab: Lab, path: str, content: str, mode: int = 0o644) -> None:
    lab.run(["install", "-D", "-m", format(mode, "o"), "/dev/stdin", path], input=content, timeout=60)


def put_if_changed(lab: Lab, local: Path, dest: str, mode: int = 0o644) -> bool:
    """Copy unless the guest has the same bytes already (a reused guest); True if copied."""
    want = hashlib.sha256(local.read_bytes()).hexdigest()
    have = lab.run(["sha256sum", "--", dest], check=False, timeout=120).stdout.split()
    if have and have[0] == want:
        return False
    lab.run(["mkdir", "-p", "--", str(Path(dest).parent)], timeout=30)
    lab.put(local, dest, mode=mode, timeout=600)
    return True


def install(lab: Lab, files: NodeFiles, service_ip: str) -> None:
    """Binary, credentials and configs; containerd (re)started on its config; pods' path to
    the API server at service_ip. Idempotent."""
    put_if_changed(lab, files.kubelet, KUBELET, 0o755)
    write_file(lab, f"{CONF_DIR}/ca.crt", files.ca.read_text())
    write_file(lab, f"{CONF_DIR}/kubelet.crt", files.cert.read_text())
    write_file(lab, f"{CONF_DIR}/kubelet.key", files.key.read_text(), 0o600)
    write_file(lab, f"{CONF_DIR}/kubelet.yaml", kubelet_config())
    write_file(lab, f"{CONF_DIR}/kubelet.kubeconfig", kubeconfig(), 0o600)
    write_file(lab, "/etc/cni/net.d/10-zvolt-lab.conflist", cni_conflist())
    write_file(lab, "/etc/containerd/config.toml", containerd_config())
    lab.run(["modprobe", "overlay"], timeout=60)
    # The lab's own services are reached through socat forwarders on the guest's ports 7001-7003
    # (lab.guest.GUEST_PORTS); on a node the chart's agent serves 7001 on the node's address.
    for name in guest.GUEST_PORTS:
        lab.run(["systemctl", "stop", guest.unit_name(f"fwd-{name}")], check=False, timeout=60)
    lab.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], timeout=30)
    lab.run(["nft", "-f", "-"], input=service_nat_rules(service_ip), timeout=60)
    # The node's own processes (host-network pods: the agent asks the API for its certificate)
    # need a route to the Service address before the output hook can rewrite it: the guest has
    # no default route, so without this connect() fails with ENETUNREACH.
    lab.run(["ip", "route", "replace", f"{ipaddress.IPv4Address(service_ip)}/32", "dev", "eth0", "src", NODE_IP],
            timeout=30)
    lab.run(["systemctl", "restart", "containerd.service"], timeout=120)
    lab.run(["ctr", "--timeout", "60s", "version"], timeout=90)


def images_present(lab: Lab) -> set[str]:
    out = lab.run(["ctr", "-n", CONTAINERD_NAMESPACE, "images", "ls", "-q"], timeout=120).stdout
    return set(out.split())


def import_images(lab: Lab, archives: Sequence[tuple[Path, Sequence[str]]]) -> list[str]:
    """Import each OCI archive whose refs containerd lacks; returns the archives imported."""
    have = images_present(lab)
    done = []
    for archive, refs in archives:
        if set(refs) <= have:
            continue
        dest = f"{IMAGE_DIR}/{archive.name}"
        lab.run(["mkdir", "-p", IMAGE_DIR], timeout=30)
        lab.put(archive, dest, timeout=900)
        try:
            lab.run(["ctr", "-n", CONTAINERD_NAMESPACE, "images", "import", dest], timeout=900)
        finally:
            lab.run(["rm", "-f", "--", dest], check=False, timeout=60)
        done.append(archive.name)
    missing = {ref for _, refs in archives for ref in refs} - images_present(lab)
    if missing:
        raise GuestCommandError(["ctr", "images", "import"], None, f"containerd lacks {sorted(missing)} after import")
    return done


def start_kubelet(lab: Lab) -> None:
    lab.run(["mkdir", "-p", "/var/lib/kubelet"], timeout=30)
    lab.start_service(KUBELET_SERVICE, kubelet_argv())


def stop_kubelet(lab: Lab, *, pods: bool = True) -> None:
    """kubelet, then every container it started (they outlive kubelet in kubepods.slice);
    pods=False leaves them running, as a kubelet restart on a real node does."""
    lab.stop_service(KUBELET_SERVICE)
    if pods:
        lab.run(["systemctl", "stop", "kubepods.slice"], check=False, timeout=120)


# --- the API server's way to the kubelet --------------------------------------------------

@dataclass
class KubeletTunnel:
    """127.0.0.1:port on the host reaches the guest kubelet's KUBELET_PORT (an ssh forward)."""

    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def open(cls, lab: Lab, timeout: float = 60) -> KubeletTunnel:
        port = qemu.free_port()
        argv = ssh.forward_argv(lab.target, port, KUBELET_PORT)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tunnel = cls(proc, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise GuestCommandError(argv, None, f"ssh forward to the kubelet exited {proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                return tunnel
            except OSError:
                time.sleep(0.3)
        tunnel.close()
        raise GuestCommandError(argv, None, f"ssh forward to the kubelet: 127.0.0.1:{port} not open in {timeout:.0f}s")

    @property
    def local(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
