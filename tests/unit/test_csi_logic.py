"""Pure logic of the CSI driver: placement, StorageClass parameters, sizes, page tokens, agents."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from csi import TOPOLOGY_ZONE_KEY
from csi.agents import AgentEndpoint, AgentPool, KubernetesDiscovery, parse_static
from csi.controller import GiB, PageToken, choose_size, paginate
from csi.params import parse
from csi.placement import Candidate, choose, largest_volume, zone_requirement
from zvolt.errors import ZvoltError
from zvolt.pb import csi_pb2

K = TOPOLOGY_ZONE_KEY


def code(fn: object) -> grpc.StatusCode:
    with pytest.raises(ZvoltError) as err:
        fn()  # type: ignore[operator]
    return err.value.code


def test_placement_orders_by_preferred_zone_then_free_space() -> None:
    cands = [Candidate("a", "z1", 50, 0), Candidate("b", "z2", 90, 0), Candidate("c", "z1", 70, 0)]
    anywhere = zone_requirement([], [])
    assert choose(cands, 10, False, anywhere) == ["b", "c", "a"]
    pref = zone_requirement([{K: "z1"}, {K: "z2"}], [{K: "z1"}])
    assert choose(cands, 10, False, pref) == ["c", "a", "b"]
    only_z2 = zone_requirement([{K: "z2"}], [])
    assert choose(cands, 10, False, only_z2) == ["b"]
    assert choose(cands, 60, True, anywhere) == ["b", "c"]  # thick needs the space now
    assert code(lambda: choose(cands, 100, True, anywhere)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        code(lambda: choose(cands, 1, False, zone_requirement([{K: "z9"}], []))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    capped = [Candidate("a", "z1", 100, 20)]
    assert code(lambda: choose(capped, 30, False, anywhere)) == grpc.StatusCode.OUT_OF_RANGE
    # A requisite segment without our key constrains nothing.
    assert zone_requirement([{"other": "x"}], []).requisite is None


def test_storage_class_parameters() -> None:
    p = parse({"volblocksize": "8K", "compression": "zstd", "thin": "false", "csi.storage.k8s.io/fstype": "xfs",
               "csi.storage.k8s.io/pvc/name": "db-0"})  # fmt: skip
    assert (p.volblocksize, p.compression, p.thick, p.fstype, p.labels) == (
        8192,
        "zstd",
        True,
        "xfs",
        {"pvc-name": "db-0"},
    )
    d = parse({})
    assert (d.volblocksize, d.compression, d.thick) == (16384, "lz4", False)
    assert parse({"volblocksize": "131072"}).volblocksize == 128 * 1024
    for bad in ({"volblocksize": "1M"}, {"volblocksize": "12K"}, {"thin": "maybe"}, {"compression": "lz4;rm"},
                {"csi.storage.k8s.io/fstype": "ntfs"}, {"volblocksize ": "8K"}):  # fmt: skip
        assert code(lambda bad=bad: parse(bad)) == grpc.StatusCode.INVALID_ARGUMENT


def test_choose_size() -> None:
    R = csi_pb2.CapacityRange
    assert choose_size(None, 16384) == GiB
    assert choose_size(R(required_bytes=1), 16384) == 16384
    assert choose_size(R(limit_bytes=100 * 16384), 16384) == 100 * 16384
    assert choose_size(R(required_bytes=GiB), 8192, minimum=2 * GiB) == 2 * GiB
    assert code(lambda: choose_size(R(required_bytes=5, limit_bytes=4), 1)) == grpc.StatusCode.OUT_OF_RANGE
    assert code(lambda: choose_size(R(limit_bytes=GiB), 1, minimum=2 * GiB)) == grpc.StatusCode.OUT_OF_RANGE
    assert code(lambda: choose_size(R(limit_bytes=-1), 1)) == grpc.StatusCode.INVALID_ARGUMENT
    # int64 max rounded up to a block would not fit the agent's int64 field
    assert code(lambda: choose_size(R(required_bytes=2**63 - 1), 16384)) == grpc.StatusCode.OUT_OF_RANGE


def test_page_token_roundtrip_and_garbage() -> None:
    tok = PageToken("storage-1", "42")
    assert PageToken.decode(tok.encode()) == tok
    for bad in ("", "!!", "e30", "bnVsbA"):  # "", junk, "{}", "null"
        assert code(lambda bad=bad: PageToken.decode(bad)) == grpc.StatusCode.ABORTED


class _Agent:
    def __init__(self, name: str, items: list[int]) -> None:
        self.name, self.items = name, items


def test_paginate_walks_every_agent_once() -> None:
    agents = [_Agent("a", [1, 2, 3]), _Agent("b", []), _Agent("c", [4, 5])]

    def fetch(agent: _Agent, want: int, token: str) -> tuple[list[int], str]:
        start = int(token or 0)
        end = len(agent.items) if not want else min(len(agent.items), start + want)
        return agent.items[start:end], (str(end) if end < len(agent.items) else "")

    for size in (1, 2, 3, 4, 10, 0):
        got, token = [], ""
        for _ in range(20):
            page, token = paginate(agents, size, token, fetch)  # type: ignore[arg-type]
            assert not size or len(page) <= size
            got += page
            if not token:
                break
        assert got == [1, 2, 3, 4, 5], size


def test_static_agents_and_kubernetes_discovery() -> None:
    eps = parse_static("storage-0=unix:///run/a.sock, storage-1=10.0.0.2:7001", zone="z1")
    assert eps == [
        AgentEndpoint("storage-0", "unix:///run/a.sock", "z1"),
        AgentEndpoint("storage-1", "10.0.0.2:7001", "z1"),
    ]
    for bad in ("", "storage-0", "Bad_Name=1.2.3.4:1", "a=1.2.3.4:1,a=1.2.3.4:2", "a=nowhere"):
        assert code(lambda bad=bad: parse_static(bad)) == grpc.StatusCode.INVALID_ARGUMENT
    calls: list[tuple[str, str]] = []

    def lister(ns: str, sel: str) -> list[tuple[str, str, str]]:
        calls.append((ns, sel))
        return [("node-b", "10.1.0.5", "z2"), ("node-a", "fd00::5", "")]

    disc = KubernetesDiscovery(lister, "zvolt", "app.kubernetes.io/component=agent", 7001)
    assert disc() == [
        AgentEndpoint("node-b", "10.1.0.5:7001", "z2"),
        AgentEndpoint("node-a", "[fd00::5]:7001", "default"),
    ]
    assert calls == [("zvolt", "app.kubernetes.io/component=agent")]
    pool = AgentPool(disc, tls=None, ttl=3600)
    try:
        assert [a.name for a in pool.all()] == ["node-a", "node-b"]
        assert pool.get("node-a").zone == "default"
        assert code(lambda: pool.get("node-z")) == grpc.StatusCode.UNAVAILABLE
        assert len(calls) == 3  # direct call, first listing, and one forced re-discovery for the unknown name
    finally:
        pool.close()


def test_largest_volume_thin_is_the_node_limit_thick_the_free_space() -> None:
    c = Candidate("s0", "default", available_bytes=10 * 2**30, max_volume_bytes=64 * 2**40)
    assert largest_volume(c, thick=True) == 10 * 2**30
    assert largest_volume(c, thick=False) == 64 * 2**40
    full = Candidate("s1", "default", available_bytes=0, max_volume_bytes=64 * 2**40)
    assert largest_volume(full, thick=False) == 0
    unlimited = Candidate("s2", "default", available_bytes=5, max_volume_bytes=0)
    assert largest_volume(unlimited, thick=False) == 5


@pytest.mark.parametrize("parameters", [
    {"volblocksize": "512"}, {"volblocksize": "2K"}, {"volblocksize": "4K"}, {"volblocksize": "128K"},
    {"volblocksize": "256K"}, {"compression": "zstd-3"}, {"compression": "gzip-9"}, {"compression": "zstd-fast-1"},
    {"compression": "zstd"}, {"compression": "gzip"}, {"compression": "off"},
])
def test_controller_and_agent_accept_the_same_volume_properties(parameters: dict[str, str], tmp_path: Path) -> None:
    """A class the controller accepts must not fail later in the agent (it did for zstd-3)."""
    from agent.fakes import make_node
    from agent.volumes import VolumeSpec

    try:
        p = parse(parameters)
        controller_ok = True
    except ZvoltError:
        controller_ok = False
    node = make_node(str(tmp_path / "state"), str(tmp_path / "configfs"))
    size = 1 << 30
    try:
        if controller_ok:
            node.volumes.create_volume(VolumeSpec(name="pvc-x", size=size, volblocksize=p.volblocksize,
                                                  compression=p.compression))
        else:
            vbs = parameters.get("volblocksize", "16K")
            raw = int(vbs[:-1]) * 1024 if vbs.endswith("K") else int(vbs)
            node.volumes.create_volume(VolumeSpec(name="pvc-x", size=size, volblocksize=raw,
                                                  compression=parameters.get("compression", "lz4")))
        agent_ok = True
    except ZvoltError:
        agent_ok = False
    assert controller_ok == agent_ok, parameters


def test_paginate_pages_even_without_max_entries() -> None:
    """external-attacher lists with max_entries=0: that must not mean the whole cluster at once."""
    from csi import controller

    class Agent:
        def __init__(self, name: str, n: int) -> None:
            self.name, self.items = name, [f"{name}-{i:05d}" for i in range(n)]

    def fetch(agent: Agent, want: int, token: str) -> tuple[list[str], str]:
        start = int(token or 0)
        page = agent.items[start:start + (want or 10**9)]
        end = start + len(page)
        return page, str(end) if end < len(agent.items) else ""

    agents = [Agent("s0", 1500), Agent("s1", 700)]
    seen: list[str] = []
    token, pages = "", 0
    while True:
        items, token = controller.paginate(agents, 0, token, fetch)  # type: ignore[arg-type]
        assert len(items) <= controller.DEFAULT_PAGE
        seen += items
        pages += 1
        if not token:
            break
    assert seen == agents[0].items + agents[1].items and pages == 3

