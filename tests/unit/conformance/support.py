"""Helpers of the CSI conformance suite: capabilities, error-code checks, server start-up.

Controller side: the real ControllerService against in-process fake agents (csi.fakes)
served over gRPC. Node side: the real NodeService with fake NVMe host and mounter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from csi.agents import AgentPool, parse_static
from csi.fakes import FakeAgent, FakeMounter, FakeNvmeHost, serve_fake_agent
from csi.main import controller_services
from csi.server import build_server
from zvolt.pb import csi_pb2, csi_pb2_grpc
from zvolt.rpc import parse_endpoint

Mode = csi_pb2.VolumeCapability.AccessMode
NODE_A = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
NODE_B = "nqn.2026-11.io.zvolt:host:worker-1:22222222-2222-4222-8222-222222222222"


def mount_cap(
    mode: Any = Mode.SINGLE_NODE_WRITER, fs: str = "", flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs, mount_flags=list(flags)),
        access_mode=Mode(mode=mode),
    )


def block_cap(mode: Any = Mode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=Mode(mode=mode))


def code_of(call: object, request: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(request)  # type: ignore[operator]
    return err.value.code()  # type: ignore[no-any-return]


@dataclass
class ControllerEnv:
    controller: csi_pb2_grpc.ControllerStub
    identity: csi_pb2_grpc.IdentityStub
    agents: dict[str, FakeAgent]
    pool: AgentPool
    endpoint: str


def start_controller(
    sockdir: str, agents: dict[str, FakeAgent], zones: dict[str, str] | None = None
) -> tuple[Any, list[Any], grpc.Channel, AgentPool, str]:
    servers = []
    spec = []
    for name, agent in agents.items():
        path = f"{sockdir}/{name}.sock"
        servers.append(serve_fake_agent(agent, path))
        spec.append(f"{name}=unix://{path}")
    endpoints = parse_static(",".join(spec))
    if zones:
        from dataclasses import replace

        endpoints = [replace(ep, zone=zones.get(ep.name, ep.zone)) for ep in endpoints]
    pool = AgentPool(lambda: endpoints, tls=None, timeout=5)
    endpoint = parse_endpoint(f"unix://{sockdir}/controller.sock")
    services = controller_services(pool)
    server, target = build_server(services, endpoint)
    server.start()
    channel = grpc.insecure_channel(target)
    return server, servers, channel, pool, target


def stop_controller(server: Any, agent_servers: list[Any], channel: grpc.Channel, pool: AgentPool) -> None:
    channel.close()
    server.stop(None)
    pool.close()
    for s in agent_servers:
        s.stop(None)


@dataclass
class NodeEnv:
    node: csi_pb2_grpc.NodeStub
    identity: csi_pb2_grpc.IdentityStub
    nvme: FakeNvmeHost
    mounter: FakeMounter
    hostnqn: str
    root: str
