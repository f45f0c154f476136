"""`kubectl zvolt usage`: the plugin execs `zvolt-csi --mode usage` in the controller container with
that container's own args; here the exec runs the real zvolt-csi entry point in-process against
a real agent servicer (on fake ZFS) over gRPC."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_kubectl_attachments import run_in_process  # type: ignore[import-not-found]

from agent.fakes import FakeNode, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from kubectl_zvolt import cli
from kubectl_zvolt.errors import PluginError
from kubectl_zvolt.usage import argv, parse, size, totals

MiB = 1 << 20
GiB = 1 << 30


class Pods:
    namespace = "zvolt"

    def __init__(self, args: list[str]) -> None:
        self.args = args

    def list_pods(self) -> list[dict[str, Any]]:
        return [{"metadata": {"name": "ctrl-1"}, "status": {"phase": "Running"},
                 "spec": {"containers": [{"name": "zvolt-controller", "args": self.args}]}}]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[FakeNode, int]]:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics), metrics, workers=2)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    for name, ns, pvc, used, ratio in (("pvc-1", "team-a", "db", 64 * MiB, "1.25"),
                                       ("pvc-2", "team-a", "db-branch", 8 * MiB, "1.00"),
                                       ("pvc-3", "team-b", "cache", 3 * MiB, "2.00")):
        vol = node.volumes.create_volume(VolumeSpec(name=name, size=GiB,
                                                    labels={"pvc-namespace": ns, "pvc-name": pvc}))
        node.zfs.ds[vol.dataset].props.update(used=str(used), referenced=str(64 * MiB), compressratio=ratio)
    yield node, port
    server.stop(None)


def controller_args(port: int) -> list[str]:
    return ["--mode=controller", "--endpoint=unix:///csi/csi.sock", f"--agents=storage-0=127.0.0.1:{port}",
            "--insecure", "--metrics-listen=0.0.0.0:9102"]


def test_table_per_pvc_and_per_namespace(agent: tuple[FakeNode, int]) -> None:
    _, port = agent
    out = io.StringIO()
    code = cli.run(["usage", "-n", "zvolt"], connect=lambda t: Pods(controller_args(port)),  # type: ignore[arg-type,return-value]
                   execute=run_in_process, out=out)
    pvc_table, ns_table = out.getvalue().strip().split("\n\n")
    rows = [line.split() for line in pvc_table.splitlines()]
    assert code == 0 and rows[0] == ["NAMESPACE", "PVC", "PV", "NODE", "SIZE", "USED", "UNIQUE", "RATIO"]
    assert [r[:2] + r[3:] for r in rows[1:]] == [
        ["team-a", "db", "storage-0", "1Gi", "64Mi", "64Mi", "1.25x"],
        ["team-a", "db-branch", "storage-0", "1Gi", "64Mi", "8Mi", "1.00x"],
        ["team-b", "cache", "storage-0", "1Gi", "64Mi", "3Mi", "2.00x"],
    ]
    assert [line.split() for line in ns_table.splitlines()] == [
        ["NAMESPACE", "PVCS", "SIZE", "USED", "UNIQUE"], ["team-a", "2", "2Gi", "128Mi", "72Mi"],
        ["team-b", "1", "1Gi", "64Mi", "3Mi"]]


def test_json_filtered_to_one_namespace(agent: tuple[FakeNode, int]) -> None:
    _, port = agent
    out = io.StringIO()
    code = cli.run(["usage", "-o", "json", "--pvc-namespace", "team-b"],
                   connect=lambda t: Pods(controller_args(port)), execute=run_in_process, out=out)  # type: ignore[arg-type,return-value]
    doc = json.loads(out.getvalue())
    assert code == 0 and [p["pvc"] for p in doc["pvcs"]] == ["cache"]
    assert doc["pvcs"][0]["volume_id"].startswith("storage-0/") and doc["pvcs"][0]["unique_bytes"] == 3 * MiB
    assert doc["namespaces"] == [{"namespace": "team-b", "pvcs": 1, "logical_bytes": GiB,
                                  "referenced_bytes": 64 * MiB, "unique_bytes": 3 * MiB}]
    assert doc["pools"][0]["node"] == "storage-0" and doc["pools"][0]["total_bytes"] > 0


def test_an_unreachable_storage_node_is_named_and_fails_the_command() -> None:
    out = io.StringIO()
    args = ["--agents=storage-0=127.0.0.1:1", "--insecure"]
    code = cli.run(["usage"], connect=lambda t: Pods(args), execute=run_in_process, out=out)  # type: ignore[arg-type,return-value]
    assert code == 1 and "storage node storage-0 did not answer" in out.getvalue()


def test_argv_parse_and_sizes() -> None:
    assert argv(["--mode=controller", "--endpoint=unix:///x", "--agents-from-kubernetes", "--tls-ca=/ca"]) == \
        ["zvolt-csi", "--agents-from-kubernetes", "--tls-ca=/ca", "--mode=usage", "--output=json", "--log-level=error"]
    with pytest.raises(PluginError, match="gave no result"):
        parse("zvolt-csi: controller needs --agents")
    with pytest.raises(PluginError, match="cannot read"):
        parse('{\n  "usage": [{"namespace": "a"}]}')
    assert [size(n) for n in (0, 1023, 1536, 64 * MiB, 3 * GiB // 2, 5 << 40)] == \
        ["0", "1023", "1.5Ki", "64Mi", "1.5Gi", "5Ti"]
    assert totals([]) == []
