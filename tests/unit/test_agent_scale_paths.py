"""Paths that must not grow with the pool: GetInfo (called by every controller Probe) and the
start-up / capacity queries of the index."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.fakes import make_node
from agent.metrics import Metrics
from agent.server import AgentServicer
from agent.volumes import VolumeSpec
from zvolt.pb import agent_pb2 as pb


def test_getinfo_reports_cached_counts_without_counting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    servicer = AgentServicer(node.volumes, node.readiness, Metrics())
    node.volumes.create_volume(VolumeSpec(name="a", size=1 << 30))
    servicer.refresh_metrics()  # the periodic refresher
    calls: list[int] = []
    real = node.index.counts

    def counting() -> tuple[int, int, int]:
        calls.append(1)
        return real()

    monkeypatch.setattr(node.index, "counts", counting)
    for _ in range(5):
        info = servicer.GetInfo(pb.GetInfoRequest(), None)
    assert info.ready and info.volumes == 1
    assert calls == [], "GetInfo counted the index"
    node.volumes.create_volume(VolumeSpec(name="b", size=1 << 30))
    servicer.refresh_metrics()
    assert servicer.GetInfo(pb.GetInfoRequest(), None).volumes == 2


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("SELECT * FROM volumes WHERE hosts != ''", "volumes_published"),
        ("SELECT count(*) FROM volumes WHERE hosts != ''", "volumes_published"),
        ("SELECT coalesce(sum(size), 0) FROM volumes WHERE thick=1", "volumes_thick"),
    ],
)
def test_startup_and_capacity_queries_use_partial_indexes(tmp_path: Path, query: str, index: str) -> None:
    node = make_node(str(tmp_path / "s"), str(tmp_path / "c"))
    plan = " ".join(str(row) for row in node.index._db.execute(f"EXPLAIN QUERY PLAN {query}").fetchall())
    assert index in plan, plan
