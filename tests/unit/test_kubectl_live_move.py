"""`kubectl zvolt move` of a volume in use: the plugin relays the controller's host steps to the
node plugin of each host (csi/pathrelay.py, csi/livepath.py). Here the controller is the real
zvolt-csi entry point in a thread of this process with two real agent servicers over gRPC (each
on its own fake ZFS and configfs, at its own NVMe address), and the node exec runs the node's
live-path step on a fake NVMe host. The kernel's half is in tests/lab/test_live_move_lab.py."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

import csi.main
from agent.volumes import VolumeSpec
from csi import dhchap, livepath
from csi.agents import AgentClient, AgentEndpoint
from csi.fakes import FakeMounter, FakeNvmeHost
from csi.host_identity import HostIdentity
from csi.node import NodeService
from kubectl_zvolt import cli
from tests.unit.kubectlfakes import FakeKube, InProcessSession
from tests.unit.test_kubectl_move import Cluster, two_agents
from zvolt import names
from zvolt.pb import agent_pb2 as pb

MiB = 1 << 20
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"
HOSTID = "11111111-1111-4111-8111-111111111111"
ADDRESS = {"storage-a": "10.42.0.1", "storage-b": "10.42.0.2"}
PV = "pvc-db"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with two_agents(tmp_path, ADDRESS, auth=True) as found:
        yield found


class LiveKube(FakeKube):
    """One worker node, worker-0, with a node plugin pod and its CSINode naming HOST."""

    def __init__(self, agents: str, handle: str, context: dict[str, str], secret: dict[str, str] | None,
                 key_dir: str) -> None:
        super().__init__(agents, {"db": handle})
        self.context, self.secret, self.key_dir = context, secret, key_dir
        self.node_pods = True

    def get_pv(self, name: str) -> dict[str, Any] | None:
        csi_spec: dict[str, Any] = {"driver": "csi.zvolt.io", "volumeHandle": self.handles["db"],
                                    "volumeAttributes": self.context}
        if self.secret is not None:
            csi_spec["nodeStageSecretRef"] = {"name": names.dhchap_secret_name(PV), "namespace": "zvolt"}
        return {"metadata": {"name": PV}, "spec": {"csi": csi_spec}}

    def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        assert (namespace, name) == ("zvolt", names.dhchap_secret_name(PV))
        return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in (self.secret or {}).items()}}

    def list_csinodes(self) -> list[dict[str, Any]]:
        return [{"metadata": {"name": "worker-0"}, "spec": {"drivers": [{"name": "csi.zvolt.io", "nodeID": HOST}]}}]

    def list_pods(self) -> list[dict[str, Any]]:
        pods = super().list_pods()
        pods[0]["spec"]["containers"][0]["args"].append(f"--dhchap-secret-dir={self.key_dir}")
        if self.node_pods:
            # As the chart's: kubelet expands $(NODE_NAME) for the plugin's own process, not for an exec.
            args = ["--mode=node", "--endpoint=unix:///csi/csi.sock", "--node-id=$(NODE_NAME)",
                    "--metrics-listen=$(POD_IP):9103", "--ctrl-loss-tmo=30"]
            env = [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                   {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
            pods.append({"metadata": {"name": "node-w0"}, "status": {"phase": "Running", "podIP": "10.0.0.7"},
                         "spec": {"nodeName": "worker-0",
                                  "containers": [{"name": "zvolt-node", "args": args, "env": env}]}})
        return pods


class NodeExec:
    """`kubectl exec -i` into worker-0's node plugin: the live-path step on this node's NVMe host."""

    def __init__(self, node: NodeService) -> None:
        self.node = node
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __call__(self, namespace: str, pod: str, container: str, argv: Sequence[str],
                 stdin: str | None = None) -> tuple[int, str]:
        assert (namespace, pod, container) == ("zvolt", "node-w0", "zvolt-node") and stdin is not None
        args = csi.main.parser().parse_args(list(argv[1:]))
        assert args.mode == "live-path" and args.node_id == "worker-0" and args.ctrl_loss_tmo == 30
        self.calls.append((list(argv), json.loads(stdin)))
        out = io.StringIO()
        code = livepath.serve_one(self.node, io.StringIO(stdin), out)
        return code, out.getvalue()


@dataclass
class Staged:
    vid: str  # local id
    handle: str
    nvme: FakeNvmeHost
    node: NodeService


def staged(cluster: Cluster, tmp_path: Path, mode: str = "") -> tuple[Staged, LiveKube]:
    """A volume on storage-a, published to HOST and connected as NodeStageVolume would have."""
    a = cluster.nodes["storage-a"]
    context = {dhchap.CONTEXT_KEY: mode} if mode else {}
    store = dhchap.VolumeKeys(dhchap.FileSecrets(str(tmp_path / "keys")))
    keys = store.ensure(PV, mode) if mode else dhchap.Keys("")
    vol = a.volumes.create_volume(VolumeSpec(name=PV, size=64 * MiB))
    a.volumes.create_snapshot("snap-db", vol.id)
    handle = f"storage-a/{vol.id}"
    ctrl = a.volumes.exports
    pub = pb.PublishVolumeRequest(volume_id=vol.id, host_nqn=HOST, dhchap_key=keys.key, dhchap_ctrl_key=keys.ctrl_key)
    stub = AgentStub(cluster, "storage-a")
    resp = stub.call("PublishVolume", pub)
    assert resp.address == ADDRESS["storage-a"] and ctrl is not None
    nvme = FakeNvmeHost()
    nvme.add_subsystem(resp.nqn, 64 * MiB)
    node = NodeService(HostIdentity(HOST, HOSTID), nvme, FakeMounter(nvme.device_size), zone="z", ctrl_loss_tmo=30)
    secrets = {dhchap.KEY: keys.key, dhchap.CTRL_KEY: keys.ctrl_key} if mode else {}
    ctx = {"nqn": resp.nqn, "transport": resp.transport, "address": resp.address, "port": resp.port, **context}
    nvme.connect(node.connect_spec(handle, ctx, secrets))
    kube = LiveKube(cluster.agents, handle, context, secrets if mode else None, str(tmp_path / "keys"))
    return Staged(vol.id, handle, nvme, node), kube


class AgentStub:
    def __init__(self, cluster: Cluster, name: str) -> None:
        addr = dict(a.split("=") for a in cluster.agents.split(","))[name]
        self.channel = grpc.insecure_channel(addr)
        self.client = AgentClient(AgentEndpoint(name, addr), self.channel, 30.0)

    def call(self, method: str, request: Any) -> Any:
        return self.client.call(method, request)


def run(kube: LiveKube, node_exec: NodeExec) -> tuple[int, str, InProcessSession]:
    out = io.StringIO()
    session = InProcessSession()
    code = cli.run(["move", "db", "--to", "storage-b", "--pvc-namespace", "team-a", "-n", "zvolt"],
                   connect=lambda t: kube, session=session, execute_input=node_exec,  # type: ignore[arg-type,return-value]
                   out=out)
    return code, out.getvalue(), session


def paths(nvme: FakeNvmeHost, nqn: str) -> list[tuple[str, str]]:
    return sorted(livepath.address_of(c) for c in nvme.controllers(nqn))


@pytest.mark.parametrize("mode", ["", "bidirectional"])
def test_a_volume_in_use_moves_live_through_the_plugin(cluster: Cluster, tmp_path: Path, mode: str) -> None:
    s, kube = staged(cluster, tmp_path, mode)
    nqn = names.subsystem_nqn("storage-a", s.vid)
    node_exec = NodeExec(s.node)
    code, text, session = run(kube, node_exec)
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0] == (f"volume {s.handle} is published to 1 host(s): moving it live (each host adds a path to "
                        "storage-b before the cutover)"), lines
    assert any("target prepares the hosts' second path" in ln for ln in lines)
    assert lines[-1].startswith(f"moved volume {s.handle} to storage node storage-b") and "waited" in lines[-1]
    # The first stdin line carried the PV's context; the node steps went with the stage secret on
    # stdin, never in argv.
    assert json.loads(session.firsts[0]) == {"volume_context": kube.context}
    assert [c[1]["op"] for c in node_exec.calls] == ["add", "drop"]
    for argv, _ in node_exec.calls:
        assert not any(k in " ".join(argv) for k in ("DHHC-1", "secret"))
    assert node_exec.calls[0][1]["secrets"] == (kube.secret or {})
    assert node_exec.calls[0][1]["publish_context"]["address"] == ADDRESS["storage-b"]
    # The host: a second path to the target under the same NQN, then only that one.
    assert [c.address for c in s.nvme.connects] == [ADDRESS["storage-a"], ADDRESS["storage-b"]]
    assert paths(s.nvme, nqn) == [(ADDRESS["storage-b"], "4420")]
    if mode:
        assert s.nvme.connects[1].dhchap_secret == kube.secret[dhchap.KEY]  # type: ignore[index]
    b = cluster.nodes["storage-b"]
    held = AgentStub(cluster, "storage-b").call("GetVolume", pb.GetVolumeRequest(volume_id=s.vid))
    assert held.placement == pb.PLACEMENT_HELD and len(held.volume.published_hosts) == 1
    # The target allows the host under the NQN its first publish gave it: per volume with keys.
    allowed = names.volume_host_nqn(HOST, s.vid) if mode else HOST
    assert b.volumes.exports.root.subsystem(nqn).allowed_hosts() == [allowed]
    assert {c.hostnqn for c in s.nvme.connects} == {allowed}
    assert not cluster.nodes["storage-a"].volumes.exports.root.subsystem(nqn).exists()


def test_a_node_without_multipath_leaves_the_volume_where_it_was(cluster: Cluster, tmp_path: Path) -> None:
    s, kube = staged(cluster, tmp_path)
    s.nvme.native_multipath = False
    code, text, _ = run(kube, NodeExec(s.node))
    assert code == 1
    assert f"{HOST}: native NVMe multipath is off on this node" in text and "move it offline" in text, text
    assert "the same command carries on" in text
    a = AgentStub(cluster, "storage-a").call("GetVolume", pb.GetVolumeRequest(volume_id=s.vid))
    assert a.placement == pb.PLACEMENT_HELD and list(a.volume.published_hosts) == [HOST]
    assert len(s.nvme.connects) == 1 and paths(s.nvme, names.subsystem_nqn("storage-a", s.vid)) == [
        (ADDRESS["storage-a"], "4420")]
    assert not [n for n in cluster.nodes["storage-b"].zfs.ds if s.vid in n]


def test_the_node_step_refuses_bad_requests_and_never_drops_its_last_live_path(tmp_path: Path) -> None:
    nvme = FakeNvmeHost()
    node = NodeService(HostIdentity(HOST, HOSTID), nvme, FakeMounter(nvme.device_size), zone="z")
    handle = "storage-a/vol1"
    nqn = names.subsystem_nqn("storage-a", "vol1")
    nvme.add_subsystem(nqn, 1 << 30)
    ctx = {"nqn": nqn, "transport": "tcp", "address": "10.42.0.1", "port": "4420"}
    assert livepath.run(node, "not json")["ok"] is False
    assert "op" in livepath.run(node, json.dumps({"op": "rm", "volume_id": handle}))["error"]
    other = dict(ctx, nqn=names.subsystem_nqn("storage-a", "vol2"))
    assert "does not belong" in livepath.run(node, json.dumps({"op": "add", "volume_id": handle,
                                                               "publish_context": other}))["error"]
    add = json.dumps({"op": "add", "volume_id": handle, "publish_context": ctx})
    assert livepath.run(node, add)["connected"] is True
    assert livepath.run(node, add)["connected"] is False  # a repeat connects nothing more
    second = dict(ctx, address="10.42.0.2")
    livepath.run(node, json.dumps({"op": "add", "volume_id": handle, "publish_context": second}))
    # A repeat of a committed move knows no target: the live paths stay, the others go.
    nvme.ctrls["nvme0"] = dataclasses.replace(nvme.ctrls["nvme0"], state="connecting")
    dropped = livepath.run(node, json.dumps({"op": "drop", "volume_id": handle}))
    assert dropped["dropped"] == ["nvme0"] and paths(nvme, nqn) == [("10.42.0.2", "4420")]
    nvme.set_state(nqn, "connecting")
    assert livepath.run(node, json.dumps({"op": "drop", "volume_id": handle}))["dropped"] == []
    assert paths(nvme, nqn) == [("10.42.0.2", "4420")]
    assert grpc.StatusCode.INVALID_ARGUMENT.name == livepath.run(node, "{}")["code"]
