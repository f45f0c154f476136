"""connect_csi against a real gRPC server on 127.0.0.1 that comes up only when the bench restarts it."""

from concurrent import futures
from typing import Any

import grpc

from bench.progress import Progress
from bench.runner import connect_csi
from lab.qemu import free_port
from zvolt.pb import csi_pb2, csi_pb2_grpc


class _Identity(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def Probe(self, request: Any, context: Any) -> Any:
        return csi_pb2.ProbeResponse()


class _Lab:
    """Only the controller matters; it listens once start_controller runs (as after a lab restart)."""

    def __init__(self, port: int, serve_on_start: bool = True) -> None:
        self.port = port
        self.serve_on_start = serve_on_start
        self.started: list[str] = []
        self.server: grpc.Server | None = None

    def grpc_target(self, name: str) -> str:
        return f"127.0.0.1:{self.port}"

    def start_agent(self) -> None:
        self.started.append("agent")

    def start_controller(self) -> None:
        self.started.append("controller")
        if self.serve_on_start:
            self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            csi_pb2_grpc.add_IdentityServicer_to_server(_Identity(), self.server)
            self.server.add_insecure_port(f"127.0.0.1:{self.port}")
            self.server.start()

    def start_node(self) -> None:
        self.started.append("node")


def test_a_controller_that_comes_up_on_restart_is_used(monkeypatch: Any) -> None:
    # The first probe is refused; the reconnect backoff of that channel must not fail the probe after the restart.
    monkeypatch.setattr("bench.runner.PROBE_TIMEOUT_S", 1.0)
    lab = _Lab(free_port())
    try:
        csi = connect_csi(lab, Progress(enabled=False))  # type: ignore[arg-type]
        assert csi is not None
        assert lab.started == ["agent", "controller", "node"]
        assert csi.probe() is not None
        csi.close()
    finally:
        if lab.server is not None:
            lab.server.stop(None)


def test_a_controller_that_never_answers_gives_no_client_and_says_so(monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setattr("bench.runner.PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setattr("bench.runner.RESTART_PROBE_TIMEOUT_S", 0.5)
    lab = _Lab(free_port(), serve_on_start=False)
    assert connect_csi(lab, Progress()) is None  # type: ignore[arg-type]
    assert lab.started == ["agent", "controller", "node"]
    assert "CSI-side figures will be missing" in capsys.readouterr().err
