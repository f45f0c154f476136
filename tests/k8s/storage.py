"""The storage side of the k8s suite: zvolt's agent and node plugin in the lab guest (real ZFS,
nvmet, NVMe/TCP), serving with the certificates the installed chart made, and reads of ZFS and
configfs that the scenarios check their end states against."""

from __future__ import annotations

import os
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from kubernetes import client

from lab.guest import Lab
from zvolt.names import split_volume_id, subsystem_nqn, volume_host_nqn
from zvolt.pb import csi_pb2, csi_pb2_grpc

GUEST_TLS = "/etc/zvolt-k8s/tls"
STORAGE_NODE = "storage-0"  # the lab agent's --node-name
KEY_WRAPPING_FILE = "key-wrapping.hex"
CONFIGFS = "/sys/kernel/config/nvmet/subsystems"
HOSTS = "/sys/kernel/config/nvmet/hosts"
# What nvmet keeps on a host entry for DH-HMAC-CHAP (agent/nvmet.py _HOST_ATTRS).
HOST_AUTH_ATTRS = ("dhchap_key", "dhchap_ctrl_key", "dhchap_hash", "dhchap_dhgroup")
# Deleted volumes kept for their branches are collected by a periodic sweep: short in tests.
GC_INTERVAL = "3"


@dataclass(frozen=True)
class Storage:
    lab: Lab
    node_id: str  # the worker's node plugin: its NVMe host NQN

    def datasets(self) -> list[str]:
        """Every zvol and snapshot under the agent's parent dataset (volumes, trash, snapshots)."""
        out = self.lab.run(["zfs", "list", "-H", "-o", "name", "-r", "-t", "volume,snapshot", f"{self.lab.pool}/zvolt"])
        return [line for line in out.stdout.splitlines() if line]

    def zvol(self, volume_id: str) -> str:
        node, local = split_volume_id(volume_id)
        assert node == STORAGE_NODE, volume_id
        return f"{self.lab.pool}/zvolt/v/{local}"

    def prop(self, dataset: str, name: str) -> str:
        out = self.lab.run(["zfs", "get", "-H", "-p", "-o", "value", name, dataset], check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    def subsystems(self) -> list[str]:
        out = self.lab.run(["ls", "-1", CONFIGFS])
        return [line for line in out.stdout.splitlines() if line]

    def allowed_hosts(self, volume_id: str) -> list[str]:
        node, local = split_volume_id(volume_id)
        out = self.lab.run(["ls", "-1", f"{CONFIGFS}/{subsystem_nqn(node, local)}/allowed_hosts"], check=False)
        return [line for line in out.stdout.splitlines() if line] if out.returncode == 0 else []

    def volume_host(self, volume_id: str, host_nqn: str = "") -> str:
        """The host NQN a node (default: the worker) reaches an authenticated volume under: one of
        its own per volume, since nvmet keeps the keys on the host entry (zvolt/names.py)."""
        _, local = split_volume_id(volume_id)
        return volume_host_nqn(host_nqn or self.node_id, local)

    def port_links(self, volume_id: str) -> dict[str, str]:
        """trsvcid -> addr_tsas of every nvmet port the volume's subsystem is linked to."""
        node, local = split_volume_id(volume_id)
        script = ('for p in /sys/kernel/config/nvmet/ports/*; do [ -L "$p/subsystems/$1" ] && '
                  'echo "$(cat $p/addr_trsvcid) $(cat $p/addr_tsas 2>/dev/null || echo none)"; done; true')
        out = self.lab.run(["sh", "-c", script, "sh", subsystem_nqn(node, local)])
        return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)

    def keyring_holds(self, identity: str) -> bool:
        """Whether a TLS PSK of this identity is in the storage node's kernel keyring."""
        return identity in self.lab.run(["cat", "/proc/keys"]).stdout

    def host_auth(self, host_nqn: str) -> dict[str, str]:
        """The DH-HMAC-CHAP attributes of nvmet's host entry (root-only configfs in the storage
        node; the keys are secrets: compare them, never print them). {} when there is no entry."""
        script = 'd=$1; shift; [ -d "$d" ] || exit 3; for a; do printf "%s=" "$a"; cat "$d/$a" || echo; done'
        out = self.lab.run(["sh", "-c", script, "sh", f"{HOSTS}/{host_nqn}", *HOST_AUTH_ATTRS], check=False)
        if out.returncode != 0:
            return {}
        return {name: value for name, _, value in (line.partition("=") for line in out.stdout.splitlines())
                if name in HOST_AUTH_ATTRS}


def _secret_files(api: Any, namespace: str, name: str) -> dict[str, bytes]:
    secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    return {key: b64decode(value) for key, value in (secret.data or {}).items()}


def start(lab: Lab, api: Any, namespace: str, agent_secret: str, controller_cn: str,
          agent_args: Sequence[str] = ()) -> Storage:
    """Agent (storage netns) with the chart's agent certificate, mTLS required, changes allowed
    to the chart's controller certificate only; node plugin (worker netns). The agent is what
    the controller discovers behind the agent pod's IP. `agent_args`: more of the chart's agent
    flags (--dhchap: every publish must bring the volume's DH-HMAC-CHAP keys)."""
    lab.run(["mkdir", "-p", "-m", "0700", GUEST_TLS])
    for key, data in _secret_files(api, namespace, agent_secret).items():
        dest = f"{GUEST_TLS}/{key}"
        lab.run(["tee", dest], input=data.decode())
        lab.run(["chmod", "0600", dest])
    # The node key that wraps the kept keys of attached encrypted volumes (chart: agent.keyWrappingSecret).
    lab.run(["tee", f"{GUEST_TLS}/{KEY_WRAPPING_FILE}"], input=os.urandom(32).hex())
    lab.run(["chmod", "0600", f"{GUEST_TLS}/{KEY_WRAPPING_FILE}"])
    lab.start_agent("--tls-cert", f"{GUEST_TLS}/tls.crt", "--tls-key", f"{GUEST_TLS}/tls.key",
                    "--tls-ca", f"{GUEST_TLS}/ca.crt", "--controller-cn", controller_cn, "--gc-interval", GC_INTERVAL,
                    "--key-wrapping-file", f"{GUEST_TLS}/{KEY_WRAPPING_FILE}", *agent_args)
    lab.start_node()
    with grpc.insecure_channel(lab.grpc_target("node")) as channel:
        info = csi_pb2_grpc.NodeStub(channel).NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=60)
    return Storage(lab=lab, node_id=info.node_id)


def stop(lab: Lab) -> None:
    for name in ("node", "agent"):
        lab.stop_service(name)
    lab.run(["rm", "-rf", GUEST_TLS])

