"""Fixtures for the CSI conformance suite: real servers on unix sockets, real gRPC clients.

Controller side: the real ControllerService against in-process fake agents (csi.fakes)
served over gRPC. Node side: the real NodeService with fake NVMe host and mounter.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from csi.fakes import FakeAgent, FakeMounter, FakeNvmeHost
from csi.host_identity import HostIdentity
from csi.identity import IdentityService
from csi.node import NodeService
from csi.server import Services, build_server
from zvolt.pb import csi_pb2_grpc
from zvolt.rpc import parse_endpoint

from .support import NODE_A, ControllerEnv, NodeEnv, start_controller, stop_controller


@pytest.fixture
def ctl(sockdir: str) -> Iterator[ControllerEnv]:
    agents = {
        "storage-0": FakeAgent("storage-0", address="10.0.0.1"),
        "storage-1": FakeAgent("storage-1", address="10.0.0.2"),
    }
    server, agent_servers, channel, pool, target = start_controller(sockdir, agents)
    yield ControllerEnv(csi_pb2_grpc.ControllerStub(channel), csi_pb2_grpc.IdentityStub(channel), agents, pool, target)
    stop_controller(server, agent_servers, channel, pool)


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
