"""What the controller asks an agent for one host's publish, and what it tells that host's node.

ControllerPublishVolume and a live move's second path (csi/pathrelay.py) both go through here,
so a host is allowed on the target under exactly the NQN and keys its first publish gave it, and
its node connects the second path from exactly the context NodeStageVolume would have read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from csi import dhchap
from zvolt.errors import precondition
from zvolt.pb import agent_pb2


def modes(volume_context: Mapping[str, str]) -> tuple[str, bool]:
    """(DH-HMAC-CHAP mode or "", TLS on) as the volume's context names them."""
    return (volume_context.get(dhchap.CONTEXT_KEY, ""), volume_context.get(dhchap.TLS_CONTEXT_KEY, "") == "psk")


def agent_request(keys: dhchap.VolumeKeys | None, volume_id: str, volume_name: str, local: str, host: str,
                  volume_context: Mapping[str, str], encryption_key: bytes = b"") -> agent_pb2.PublishVolumeRequest:
    """The agent's PublishVolumeRequest for node `host` (its own host NQN), with the volume's keys."""
    pub = agent_pb2.PublishVolumeRequest(volume_id=local, host_nqn=host, encryption_key=encryption_key)
    mode, tls = modes(volume_context)
    if mode or tls:
        if keys is None:
            raise precondition(f"volume {volume_id} uses DH-HMAC-CHAP or TLS but this controller keeps no keys: "
                               "start it with --dhchap-secret-namespace (the chart does)")
        found = keys.get(volume_name, mode, tls)
        pub.dhchap_key, pub.dhchap_ctrl_key, pub.tls_psk = found.key, found.ctrl_key, found.tls_psk
    return pub


def node_context(resp: Any, volume_context: Mapping[str, str]) -> dict[str, str]:
    """The publish_context a node stages from (agent PublishVolumeResponse in, no key ever in it):
    the node takes the keys from its node-stage secrets, the context names only the modes."""
    ctx = {"nqn": resp.nqn, "transport": resp.transport, "address": resp.address, "port": resp.port}
    mode, tls = modes(volume_context)
    if mode:
        ctx[dhchap.CONTEXT_KEY] = mode
    if tls:
        ctx[dhchap.TLS_CONTEXT_KEY] = "psk"
    return ctx
