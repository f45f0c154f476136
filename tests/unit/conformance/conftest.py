"""Fixtures for the CSI conformance suite: real servers on unix sockets, real gRPC clients.

Controller side: the real ControllerService against in-process fake agents (csi.fakes)
served over gRPC. Node side: the real NodeService with fake NVMe host and mounter.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from csi.agents import AgentPool, parse_static
from csi.controller import ControllerService, all_ready
from csi.fakes import FakeAgent, FakeMounter, FakeNvmeHost, serve_fake_agent
from csi.host_identity import HostIdentity
from csi.identity import IdentityService
from csi.node import NodeService
from csi.server import Services, build_server
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


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths must stay short (108 bytes): pytest's tmp_path can be too deep.
    path = tempfile.mkdtemp(prefix="zvcsi", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


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
    services = Services(
        identity=IdentityService(controller=True, ready=lambda: any(ok for _, ok in all_ready(pool))),
        controller=ControllerService(pool),
    )
    server, target = build_server(services, endpoint)
    server.start()
    channel = grpc.insecure_channel(target)
    return server, servers, channel, pool, target


@pytest.fixture
def ctl(sockdir: str) -> Iterator[ControllerEnv]:
    agents = {
        "storage-0": FakeAgent("storage-0", address="10.0.0.1"),
        "storage-1": FakeAgent("storage-1", address="10.0.0.2"),
    }
    server, agent_servers, channel, pool, target = start_controller(sockdir, agents)
    yield ControllerEnv(csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.IdentityStub(channel), agents, pool, target)
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


@pytest.fixture
def nde(sockdir: str) -> Iterator[NodeEnv]:
    nvme = FakeNvmeHost()
    mounter = FakeMounter(nvme.device_size)
    ident = HostIdentity(hostnqn=NODE_A, hostid="11111111-1111-4111-8111-111111111111")
    service = NodeService(ident, nvme, mounter, zone="default", max_volumes=100, device_timeout=0.5, resize_timeout=0.3)
    endpoint = parse_endpoint(f"unix://{sockdir}/node.sock")
    server, target = build_server(Services(identity=IdentityService(False, lambda: True), node=service), endpoint)
    server.start()
    channel = grpc.insecure_channel(target)
    yield NodeEnv(csi_pb2_grpc.NodeStub(channel), csi_pb2_grpc.IdentityStub(channel), nvme, mounter, NODE_A, sockdir)
    channel.close()
    server.stop(None)
