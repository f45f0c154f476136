"""`kubectl zvolt attachments [--clear]`: the plugin execs `zvolt-csi --mode attachments` in the
controller container with that container's own args; here the exec runs the real zvolt-csi
entry point in-process against fake agents over gRPC, with Kubernetes' view stubbed."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import pytest

import csi.main
from csi.attachments import KubeAttachments
from csi.fakes import FakeAgent
from kubectl_zvolt import cli
from kubectl_zvolt.attachments import argv, controller, parse
from kubectl_zvolt.errors import PluginError
from zvolt.pb import agent_pb2, agent_pb2_grpc

W0 = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-1111-1111-111111111111"
GONE = "nqn.2026-11.io.zvolt:host:worker-9:99999999-9999-9999-9999-999999999999"


class Pods:
    namespace = "zvolt"

    def __init__(self, args: list[str]) -> None:
        self.args = args

    def list_pods(self) -> list[dict[str, Any]]:
        pending = {"metadata": {"name": "ctrl-new"}, "status": {"phase": "Pending"},
                   "spec": {"containers": [{"name": "zvolt-controller", "args": ["--bad"]}]}}
        running = {"metadata": {"name": "ctrl-1"}, "status": {"phase": "Running"},
                   "spec": {"containers": [{"name": "csi-attacher", "args": []},
                                           {"name": "zvolt-controller", "args": self.args}]}}
        return [pending, running]


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeAgent, dict[str, str], int]]:
    fake = FakeAgent("storage-0")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    agent_pb2_grpc.add_AgentServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ids = {}
    for name, host in (("kept", W0), ("stale", GONE)):
        vid = fake.CreateVolume(agent_pb2.CreateVolumeRequest(name=name, size_bytes=1 << 30), None).volume.id
        fake.PublishVolume(agent_pb2.PublishVolumeRequest(volume_id=vid, host_nqn=host), None)
        ids[name] = f"storage-0/{vid}"
    view = KubeAttachments({ids["kept"]: frozenset({"worker-0"})}, {"worker-0": W0})
    monkeypatch.setattr(csi.main, "kubernetes_pod_lister", lambda *a: lambda ns, sel: [("storage-0", "127.0.0.1", "")])
    monkeypatch.setattr(csi.main, "kubernetes_attachments", lambda *a: (lambda: view, lambda: True))
    yield fake, ids, port
    server.stop(None)


def run_in_process(namespace: str, pod: str, container: str, argv: Sequence[str]) -> tuple[int, str]:
    assert (namespace, pod, container) == ("zvolt", "ctrl-1", "zvolt-controller")
    assert argv[0] == "zvolt-csi"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = csi.main.main(list(argv[1:]))
    return code, out.getvalue()


def test_lists_then_clears_only_what_kubernetes_no_longer_attaches(
        agent: tuple[FakeAgent, dict[str, str], int]) -> None:
    fake, ids, port = agent
    args = ["--mode=controller", "--endpoint=unix:///csi/csi.sock", "--agents-from-kubernetes",
            f"--agent-port={port}", "--insecure", "--reconcile-attachments=60"]
    out = io.StringIO()
    code = cli.run(["attachments", "-n", "zvolt"], connect=lambda t: Pods(args),  # type: ignore[arg-type,return-value]
                   execute=run_in_process, out=out)
    lines = out.getvalue().splitlines()
    assert code == 0 and lines[0].split() == ["VOLUME", "NODE", "STATE", "HOST", "NQN"]
    assert sorted(line.split()[:3] for line in lines[1:]) == sorted(
        [[ids["kept"], "worker-0", "attached"], [ids["stale"], "worker-9", "stale"]])
    assert all(v.published_hosts for v in fake.state.volumes.values())  # listing changes nothing

    out = io.StringIO()
    assert cli.run(["attachments", "--clear", "-o", "json"],
                   connect=lambda t: Pods(args), execute=run_in_process, out=out) == 0  # type: ignore[arg-type,return-value]
    assert '"state": "cleared"' in out.getvalue()
    hosts = {f"storage-0/{v.id}": list(v.published_hosts) for v in fake.state.volumes.values()}
    assert hosts == {ids["kept"]: [W0], ids["stale"]: []}


def test_argv_keeps_the_controllers_settings_and_drops_serving_ones() -> None:
    got = argv(["--mode=controller", "--endpoint=unix:///csi/csi.sock", "--metrics-listen=0.0.0.0:9102",
                "--agents-from-kubernetes", "--tls-ca=/etc/zvolt/tls/ca.crt", "--reconcile-attachments=60"], clear=True)
    assert got == ["zvolt-csi", "--agents-from-kubernetes", "--tls-ca=/etc/zvolt/tls/ca.crt", "--mode=attachments",
                   "--output=json", "--log-level=error", "--clear"]


def test_clear_errors() -> None:
    with pytest.raises(PluginError, match="no running pod"):
        controller([])
    with pytest.raises(PluginError, match="gave no result"):
        parse("zvolt-csi: storage node storage-0 has no known agent")
    with pytest.raises(PluginError, match="cannot read"):
        parse('{\n  "attachments": [{"volume_id": 1}]}')
