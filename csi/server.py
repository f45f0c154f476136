"""The gRPC server for the CSI services: unix socket (0600), request logging, graceful stop."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc

from zvolt.pb import csi_pb2_grpc
from zvolt.rpc import Endpoint, RpcInterceptor, prepare_unix_socket

_log = logging.getLogger("zvolt.csi.server")


@dataclass
class Services:
    identity: Any
    controller: Any = None
    node: Any = None
    health: Any = None  # csi.health.StorageHealth in controller mode
    group_controller: Any = None  # csi.group_controller.GroupControllerService in controller mode

    @property
    def workers(self) -> int:
        # Controller calls mostly wait on agents; a small pool let 20 concurrent CreateVolume
        # calls starve livenessprobe's 1 s Probe. Threads that wait cost little.
        return 64 if self.controller is not None else 16


def build_server(
    services: Services,
    endpoint: Endpoint,
    on_done: Callable[[str, str, float], None] | None = None,
) -> tuple[grpc.Server, str]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=services.workers, thread_name_prefix="csi"),
        interceptors=[RpcInterceptor("csi", on_done)],
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(services.identity, server)
    if services.controller is not None:
        csi_pb2_grpc.add_ControllerServicer_to_server(services.controller, server)
    if services.group_controller is not None:
        csi_pb2_grpc.add_GroupControllerServicer_to_server(services.group_controller, server)
    if services.node is not None:
        csi_pb2_grpc.add_NodeServicer_to_server(services.node, server)
    if endpoint.scheme == "unix":
        prepare_unix_socket(endpoint)
        # Only root (kubelet, the sidecars) may talk to the plugin: create the socket 0600.
        old = os.umask(0o177)
        try:
            server.add_insecure_port(endpoint.grpc_target)
        finally:
            os.umask(old)
        bound = endpoint.grpc_target
    else:
        port = server.add_insecure_port(endpoint.address)
        bound = f"{endpoint.address.rsplit(':', 1)[0]}:{port}"
    return server, bound


def serve(server: grpc.Server, endpoint: Endpoint, grace: float = 10.0) -> None:
    """Start, then block until SIGTERM/SIGINT; in-flight calls get `grace` seconds."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        _log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    if endpoint.scheme == "unix":
        os.chmod(endpoint.path, 0o600)
    _log.info("serving", extra={"fields": {"endpoint": endpoint.grpc_target}})
    stop.wait()
    server.stop(grace).wait()
    if endpoint.scheme == "unix" and os.path.exists(endpoint.path):
        os.unlink(endpoint.path)
    _log.info("stopped")
