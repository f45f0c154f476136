"""GetUsage and the per-namespace usage metrics, on fakes: which figures, read how (one scoped
`zfs get` per call, never a listing), and sums that follow volumes coming and going."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest

from agent.authz import Authorizer
from agent.fakes import FakeNode, FakeZfs, make_node
from agent.metrics import Metrics
from agent.server import AgentServicer, make_server
from agent.usage import Usage, abnormal_published
from agent.zfs import BatchGet, LibZfs, ZfsError
from zvolt.pb import agent_pb2 as pb
from zvolt.pb import agent_pb2_grpc as pb_grpc

GiB = 1 << 30
MiB = 1 << 20
HOST = "nqn.2014-08.org.nvmexpress:uuid:aaaaaaaa-0000-0000-0000-000000000001"


class CountingZfs(FakeZfs):
    """A fake that batches reads like LibZfs, and records every read and every listing."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.listings = 0

    def get_props_many(self, names: Sequence[str], props: Sequence[str]) -> dict[str, dict[str, str]]:
        self.batches.append(list(names))
        found = {n: self.get_props(n, props) for n in names}
        return {n: p for n, p in found.items() if p is not None}

    def walk(self, parent: str) -> Iterator[dict[str, str]]:
        self.listings += 1
        return super().walk(parent)

    def snapshots_of(self, name: str) -> list[str]:
        self.listings += 1
        return super().snapshots_of(name)


class Pool:
    def __init__(self, frag: int | None) -> None:
        self.frag = frag

    def fragmentation(self, pool: str) -> int | None:
        assert pool == "tank"
        return self.frag


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return make_node(str(tmp_path / "s"), str(tmp_path / "c"), zfs=CountingZfs())


def create(node: FakeNode, name: str, namespace: str | None, size: int = GiB, **zprops: int | str) -> str:
    from agent.volumes import VolumeSpec

    labels = {"pvc-namespace": namespace, "pvc-name": f"claim-{name}"} if namespace else {}
    vol = node.volumes.create_volume(VolumeSpec(name=name, size=size, labels=labels))
    node.zfs.ds[vol.dataset].props.update({k: str(v) for k, v in zprops.items()})
    return vol.id


def serve(tmp_path: Path, node: FakeNode, usage: Usage) -> tuple[pb_grpc.AgentStub, grpc.Server]:
    metrics = Metrics()
    server = make_server(AgentServicer(node.volumes, node.readiness, metrics, usage), metrics, workers=2)
    sock = tmp_path / "agent.sock"
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    return pb_grpc.AgentStub(grpc.insecure_channel(f"unix://{sock}")), server


def test_get_usage_by_ids_reads_only_those_volumes_in_one_call(tmp_path: Path, node: FakeNode) -> None:
    zfs = node.zfs
    assert isinstance(zfs, CountingZfs)
    origin = create(node, "pvc-origin", "team-a", referenced=64 * MiB, used=80 * MiB, usedbyrefreservation=0,
                    written=16 * MiB, compressratio="1.50")
    thick = create(node, "pvc-thick", "team-a", referenced=8 * MiB, used=GiB + 8 * MiB, usedbyrefreservation=GiB,
                   written=8 * MiB, compressratio="1.00")
    create(node, "pvc-other", "team-b", referenced=MiB, used=MiB)
    stub, server = serve(tmp_path, node, Usage(node.volumes, Pool(7)))
    try:
        resp = stub.GetUsage(pb.GetUsageRequest(volume_ids=[origin, thick, "vgone", origin]), timeout=10)
    finally:
        server.stop(None)
    got = {u.volume_id: u for u in resp.volumes}
    assert list(resp.not_found_ids) == ["vgone"] and set(got) == {origin, thick}
    o = got[origin]
    assert (o.name, o.pvc_namespace, o.pvc_name) == ("pvc-origin", "team-a", "claim-pvc-origin")
    assert (o.logical_bytes, o.referenced_bytes, o.unique_bytes, o.written_bytes, o.compress_ratio) == \
        (GiB, 64 * MiB, 80 * MiB, 16 * MiB, 1.5)
    # A thick volume's refreservation is space held for it, not blocks it wrote.
    assert got[thick].unique_bytes == 8 * MiB
    assert zfs.batches == [[node.volumes.index.volume(origin).dataset,  # type: ignore[union-attr]
                            node.volumes.index.volume(thick).dataset]]  # type: ignore[union-attr]
    assert zfs.listings == 0
    assert resp.pool.total_bytes > 0 and resp.pool.fragmentation_percent == -1  # not swept yet


def test_get_usage_pages_through_all_volumes(tmp_path: Path, node: FakeNode) -> None:
    ids = sorted(create(node, f"pvc-{i}", "ns", referenced=i * MiB, used=i * MiB) for i in range(3))
    stub, server = serve(tmp_path, node, Usage(node.volumes))
    seen: list[str] = []
    token = ""
    try:
        while True:
            resp = stub.GetUsage(pb.GetUsageRequest(max_entries=2, starting_token=token), timeout=10)
            assert len(resp.volumes) <= 2
            seen += [u.volume_id for u in resp.volumes]
            token = resp.next_token
            if not token:
                break
        with pytest.raises(grpc.RpcError) as err:
            stub.GetUsage(pb.GetUsageRequest(volume_ids=["../etc"]), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(None)
    assert seen == ids
    assert isinstance(node.zfs, CountingZfs) and len(node.zfs.batches) == 2 and node.zfs.listings == 0


def test_only_the_controller_may_read_usage() -> None:
    authz = Authorizer(["zvolt-controller"])
    assert authz.allowed("GetUsage", "zvolt-controller")
    assert not authz.allowed("GetUsage", "storage-1")  # another node's or a node plugin's certificate


def test_namespace_sums_follow_a_rolling_sweep_and_forget_deleted_volumes(node: FakeNode) -> None:
    metrics = Metrics()
    usage = Usage(node.volumes, Pool(12), metrics, sweep_page=2, min_cycle=0.0)  # unpaced: a page per tick
    a1 = create(node, "pvc-a1", "team-a", referenced=10, used=7)
    create(node, "pvc-a2", "team-a", size=2 * GiB, referenced=20, used=5)
    create(node, "pvc-b", "team-b", referenced=1, used=1)
    create(node, "pvc-raw", None, referenced=3, used=3)  # no --extra-create-metadata labels
    reg = metrics.registry

    def val(name: str, ns: str) -> float | None:
        return reg.get_sample_value(name, {"namespace": ns})

    usage.tick()
    assert isinstance(node.zfs, CountingZfs) and node.zfs.batches[-1].__len__() == 2  # one page per tick
    usage.tick()
    assert val("zvolt_agent_namespace_volumes", "team-a") == 2
    assert val("zvolt_agent_namespace_logical_bytes", "team-a") == 3 * GiB
    assert val("zvolt_agent_namespace_unique_bytes", "team-a") == 12
    assert val("zvolt_agent_namespace_referenced_bytes", "team-a") == 30
    assert val("zvolt_agent_namespace_unique_bytes", "team-b") == 1
    assert val("zvolt_agent_namespace_unique_bytes", "") == 3
    assert reg.get_sample_value("zvolt_agent_pool_fragmentation_percent") == 12
    assert b"zvolt_agent_volume_unique_bytes" not in generate_latest(reg)  # no per-volume series by default
    assert node.zfs.listings == 0

    node.volumes.delete_volume(a1)
    node.zfs.ds[node.volumes.index.volume(create(node, "pvc-b2", "team-b")).dataset].props.update(  # type: ignore[union-attr]
        used="4")
    usage.tick()
    usage.tick()  # a full cycle after the change
    usage.tick()
    assert val("zvolt_agent_namespace_volumes", "team-a") == 1
    assert val("zvolt_agent_namespace_unique_bytes", "team-a") == 5
    assert val("zvolt_agent_namespace_unique_bytes", "team-b") == 5


def test_the_sweep_is_paced_so_a_cycle_takes_at_least_min_cycle(node: FakeNode) -> None:
    now = [0.0]
    usage = Usage(node.volumes, None, None, sweep_page=2, min_cycle=300.0, clock=lambda: now[0])
    for i in range(4):
        create(node, f"pvc-{i}", "team-a")
    assert isinstance(node.zfs, CountingZfs)
    read_at: list[float] = []
    for t in range(0, 700, 15):  # the agent's main loop ticks every 15 s
        now[0] = float(t)
        before = len(node.zfs.batches)
        usage.tick()
        if len(node.zfs.batches) > before:
            read_at.append(now[0])
    # A page of 2 of the 4 volumes waits half of the 300 s: two pages per cycle, one cycle per 300 s.
    assert read_at == [0.0, 150.0, 300.0, 450.0, 600.0], read_at
    assert usage.totals()["team-a"].volumes == 4


def test_per_volume_series_only_when_asked(node: FakeNode) -> None:
    metrics = Metrics()
    usage = Usage(node.volumes, None, metrics, per_volume=True)
    vid = create(node, "pvc-one", "team-a", referenced=9, used=4)
    usage.tick()
    assert metrics.registry.get_sample_value(
        "zvolt_agent_volume_unique_bytes", {"volume": vid, "namespace": "team-a", "pvc": "claim-pvc-one"}) == 4


def test_abnormal_counts_published_volumes_whose_export_is_broken(node: FakeNode) -> None:
    vid = create(node, "pvc-pub", "team-a")
    create(node, "pvc-idle", "team-a")
    node.volumes.publish(vid, HOST)
    assert abnormal_published(node.volumes) == 0
    node.volumes.exports.unexport(vid)  # e.g. configfs lost the subsystem
    assert abnormal_published(node.volumes) == 1


def _libzfs(monkeypatch: pytest.MonkeyPatch, returncode: int, stdout: str, stderr: str = "") -> list[list[str]]:
    monkeypatch.setitem(sys.modules, "libzfs_core", types.ModuleType("libzfs_core"))
    calls: list[list[str]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_libzfs_reads_many_datasets_with_one_scoped_zfs_get(monkeypatch: pytest.MonkeyPatch) -> None:
    # `zfs get` of a missing dataset complains, exits 1 and still prints the others.
    out = "tank/zvolt/v/a\tused\t100\ntank/zvolt/v/a\tzvolt:label:pvc-namespace\tteam a\n"
    calls = _libzfs(monkeypatch, 1, out, "cannot open 'tank/zvolt/v/b': dataset does not exist")
    zfs = LibZfs()
    assert isinstance(zfs, BatchGet)
    got = zfs.get_props_many(["tank/zvolt/v/a", "tank/zvolt/v/b"], ("used", "zvolt:label:pvc-namespace"))
    assert got == {"tank/zvolt/v/a": {"used": "100", "zvolt:label:pvc-namespace": "team a"}}
    assert calls == [["zfs", "get", "-H", "-p", "-o", "name,property,value", "used,zvolt:label:pvc-namespace",
                      "tank/zvolt/v/a", "tank/zvolt/v/b"]]
    assert zfs.get_props_many([], ("used",)) == {} and len(calls) == 1


def test_libzfs_batch_read_fails_on_anything_but_missing_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    _libzfs(monkeypatch, 1, "", "cannot open 'tank/zvolt/v/a': dataset does not exist")
    assert LibZfs().get_props_many(["tank/zvolt/v/a"], ("used",)) == {}
    _libzfs(monkeypatch, 1, "", "bad property list: invalid property 'usd'")
    with pytest.raises(ZfsError, match="invalid property"):
        LibZfs().get_props_many(["tank/zvolt/v/a"], ("usd",))
