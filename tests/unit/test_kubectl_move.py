"""`kubectl zvolt move <pvc> --to <node>`: the plugin resolves the PVC's volume handle and runs
`zvolt-csi --mode move` in the controller container. Here the exec runs the real zvolt-csi entry
point in-process against two real agent servicers (each on its own fake ZFS) over gRPC, moving
over a real localhost stream."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.dhchap import AuthConfig, HostKeys
from agent.fakes import FakeNode, make_node
from agent.keystore import KeyStore
from agent.metrics import Metrics
from agent.moves import SendServer
from agent.server import AgentServicer, make_server
from agent.volumes import VolumeSpec
from kubectl_zvolt import cli
from kubectl_zvolt.errors import PluginError
from tests.unit.kubectlfakes import FakeKube, InProcessSession, NoNodes

MiB = 1 << 20
KEY = bytes(range(32))
HOST = "nqn.2026-11.io.zvolt:host:worker-0:11111111-1111-4111-8111-111111111111"


@dataclass
class Cluster:
    nodes: dict[str, FakeNode]
    agents: str  # --agents of the controller


@contextlib.contextmanager
def two_agents(tmp_path: Path, addresses: dict[str, str] | None = None, auth: bool = False) -> Iterator[Cluster]:
    """storage-a and storage-b: agent servicers on 127.0.0.1 over their own fake ZFS and configfs,
    each with a move port; `addresses`: their NVMe addresses; `auth`: they keep hosts' keys."""
    nodes: dict[str, FakeNode] = {}
    agents: list[str] = []
    with contextlib.ExitStack() as stops:
        for name, pool in (("storage-a", "tanka"), ("storage-b", "tankb")):
            store = KeyStore(str(tmp_path / name / "keys"), os.urandom(32))
            node = make_node(str(tmp_path / name), str(tmp_path / f"{name}-c"), node=name, pool=pool, keystore=store,
                             nvme_address=(addresses or {}).get(name, "10.42.0.1"))
            if auth:
                node.volumes.exports.auth = HostKeys(str(tmp_path / f"{name}-auth"), AuthConfig(bidirectional=False))
            send = SendServer(node.moves, "127.0.0.1:0")
            send.start()
            stops.callback(send.close)
            metrics = Metrics()
            server = make_server(AgentServicer(node.volumes, node.readiness, metrics, moves=node.moves), metrics,
                                 workers=4)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            stops.callback(server.stop, None)
            nodes[name] = node
            agents.append(f"{name}=127.0.0.1:{port}")
        yield Cluster(nodes, ",".join(agents))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with two_agents(tmp_path) as found:
        yield found


def run(kube: FakeKube, pvc: str, to: str) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.run(["move", pvc, "--to", to, "--pvc-namespace", "team-a", "-n", "zvolt"],
                   connect=lambda t: kube, session=InProcessSession(), execute_input=NoNodes(),  # type: ignore[arg-type,return-value]
                   out=out)
    return code, out.getvalue()


def test_move_a_pvc_with_progress_then_a_rerun_is_a_no_op(cluster: Cluster) -> None:
    a, b = cluster.nodes["storage-a"], cluster.nodes["storage-b"]
    vol = a.volumes.create_volume(VolumeSpec(name="pvc-db", size=64 * MiB))
    a.volumes.create_snapshot("snap-db", vol.id)
    kube = FakeKube(cluster.agents, {"db": f"storage-a/{vol.id}"})
    code, text = run(kube, "db", "storage-b")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[0] == f"moving volume storage-a/{vol.id} (67108864 bytes) from storage node storage-a to storage-b"
    steps = [ln.split(":", 1)[1].split("(")[0].strip() for ln in lines[1:-1]]
    assert steps == ["source snapshots it", "target receives", "target commits", "source drops its copy, keeps a "
                     "tombstone"], lines
    assert lines[-1].startswith(f"moved volume storage-a/{vol.id} to storage node storage-b: ")
    assert b.index.volume(vol.id) is not None and a.index.volume(vol.id) is None
    assert [s.name for s in b.index.snapshots(volume_id=vol.id)] == ["snap-db"]
    code, text = run(kube, "db", "storage-b")
    assert code == 0 and text.strip() == f"volume storage-a/{vol.id} is on storage node storage-b already"


@pytest.mark.parametrize("blocker", ["published", "clone", "encrypted", "unknown node"])
def test_refusals_name_what_blocks(cluster: Cluster, blocker: str) -> None:
    a, b = cluster.nodes["storage-a"], cluster.nodes["storage-b"]
    key = KEY if blocker == "encrypted" else b""
    vol = a.volumes.create_volume(VolumeSpec(name="pvc-db", size=64 * MiB, encryption_key=key))
    to, expect = "storage-b", ""
    if blocker == "published":
        # In use: it moves live, and a node without a node plugin to add the path undoes the move.
        a.volumes.publish(vol.id, HOST, key=key)
        expect = f"cannot move live: the hosts could not add their path to volume storage-a/{vol.id}: {HOST}: no " \
            "running zvolt-node pod"
    elif blocker == "clone":
        snap = a.volumes.create_snapshot("snap-db", vol.id)
        clone = a.volumes.create_volume(VolumeSpec(name="pvc-branch", size=64 * MiB, source_snapshot=snap.id))
        expect = f"clones of its snapshots exist: {clone.id}"
    elif blocker == "encrypted":
        expect = "it is encrypted"
    else:
        to, expect = "storage-x", "storage node storage-x is unknown to the controller (storage nodes: storage-a, " \
            "storage-b)"
    code, text = run(FakeKube(cluster.agents, {"db": f"storage-a/{vol.id}"}), "db", to)
    assert code == 1 and expect in text, text
    assert "the same command carries on" in text
    assert a.index.volume(vol.id) is not None and a.index.move(vol.id) is None, "refused before anything changed"
    assert b.index.volume(vol.id) is None


def test_a_pvc_that_is_not_ours_or_not_bound_is_refused(cluster: Cluster) -> None:
    with pytest.raises(PluginError, match="PVC team-a/nope not found"):
        run(FakeKube(cluster.agents, {}), "nope", "storage-b")
    with pytest.raises(PluginError, match=r"not a valid|storage node"):
        run(FakeKube(cluster.agents, {}), "nope", "Bad_Node")
