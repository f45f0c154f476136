"""A Kubernetes node in the lab guest: containerd (bookworm's, in the image), a CNI bridge, and
the kubelet binary from $ZVOLT_K8S_BIN, joined to an API server on the host's 127.0.0.1.

The guest's user network is restricted (no path to the host), so the guest reaches the API
server through a qemu guestfwd: a connection to APISERVER_IP:APISERVER_PORT in the guest is
relayed (lab/guestfwd_relay.py) to the host port written into the run directory by
publish_apiserver(). The API server's serving certificate must name APISERVER_IP.

One guest is storage and worker node at once: kubelet runs in the guest's root namespace, next
to the lab's storage/worker network namespaces (a second guest would double the TCG cost on
machines with two cores; the guest's 4 GiB hold kubelet, containerd and the pods).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from lab import qemu, recipe
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
        # Nothing outside the guest reaches the kubelet's port (no hostfwd for it).
        "authorization": {"mode": "AlwaysAllow"},
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


def install(lab: Lab, files: NodeFiles) -> None:
    """Binary, credentials and configs; containerd (re)started on its config. Idempotent."""
    put_if_changed(lab, files.kubelet, KUBELET, 0o755)
    write_file(lab, f"{CONF_DIR}/ca.crt", files.ca.read_text())
    write_file(lab, f"{CONF_DIR}/kubelet.crt", files.cert.read_text())
    write_file(lab, f"{CONF_DIR}/kubelet.key", files.key.read_text(), 0o600)
    write_file(lab, f"{CONF_DIR}/kubelet.yaml", kubelet_config())
    write_file(lab, f"{CONF_DIR}/kubelet.kubeconfig", kubeconfig(), 0o600)
    write_file(lab, "/etc/cni/net.d/10-zvolt-lab.conflist", cni_conflist())
    write_file(lab, "/etc/containerd/config.toml", containerd_config())
    lab.run(["modprobe", "overlay"], timeout=60)
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


def stop_kubelet(lab: Lab) -> None:
    """kubelet, then every container it started (they outlive kubelet in kubepods.slice)."""
    lab.stop_service(KUBELET_SERVICE)
    lab.run(["systemctl", "stop", "kubepods.slice"], check=False, timeout=120)
