"""zvolt-bench cluster: CLI routing (no guest, not in `all`), the table rows, the JSON check, paging."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from bench import cli, clusteragents
from bench.config import EXTRA_SUITES, SUITES
from bench.progress import Progress
from bench.results import SuiteResult
from bench.schema import validate
from bench.suites import cluster
from zvolt.pb import csi_pb2


def _lat(p50: float) -> dict[str, float]:
    return {"n": 3, "p50_ms": p50, "p95_ms": p50 * 1.5, "mean_ms": p50, "min_ms": p50, "max_ms": p50 * 2}


def _listing(entries: int) -> dict[str, Any]:
    return {"seconds": entries / 1e4, "pages": entries // 1000 + 1, "entries": entries, "largest_bytes": 130_000,
            "slowest_page_seconds": 0.1, "us_per_entry": 40.0, "controller_rss_before_kib": 60_000,
            "controller_rss_after_kib": 70_000, "controller_hwm_kib": 75_000}


def sample_data() -> dict[str, Any]:
    silent = {"p50_ms": 10_000.0, "codes": ["OK"] * 3, "label": "x"}
    return {
        "config": {"agents": 100, "volumes_per_agent": 10_000, "agents_per_process": 1, "samples": 20},
        "load_average": [3.0, 3.0, 3.0],
        "agents": {"agents": 100, "processes": 100, "rss_kib_total": 5_000_000, "pss_kib_total": 3_000_000,
                   "start_seconds": 150.0},
        "start_1": {"seconds": 1.0}, "start_n": {"seconds": 1.5},
        "controller_rss_kib_ready": 60_000,
        "create": {"one": _lat(14), "many": _lat(270), "many_static": _lat(300)},
        "clone": {"one": _lat(15), "many": _lat(165), "many_static": _lat(200)},
        "list_volumes": {"one": _listing(10_014), "many": _listing(1_000_082)},
        "list_snapshots": {"one": _listing(10_002), "many": _listing(1_000_002)},
        "silent": {"node": "node-099", "samples": 3,
                   "before": {"create_records": silent, "clone_records": silent},
                   "during": {"create_static": silent, "create_records": silent, "clone_records": silent},
                   "list_first_page": {"seconds": 0.01, "code": "OK"},
                   "list_page_at_silent": {"seconds": 30.0, "code": "DEADLINE_EXCEEDED"},
                   "get_capacity": {"seconds": 10.0, "code": "OK"},
                   "one_agent_controller_create": {"seconds": 0.01, "code": "OK"}},
    }


def _doc(data: dict[str, Any]) -> dict[str, Any]:
    res = SuiteResult("cluster", rows=cluster.rows(sample_data()), data=data)
    return {"suites": {"cluster": res.as_dict()}}


def test_rows_put_each_figure_next_to_its_same_run_baseline() -> None:
    rows = {r.metric: r for r in cluster.rows(sample_data())}
    create = rows["CreateVolume p50, 100 agents"]
    assert (create.value, create.baseline, create.target) == (270, 14, "<= 1.2x")
    assert create.ratio is not None and create.ratio > 19
    largest = rows["ListVolumes: largest response"]
    assert largest.baseline == 4096 and largest.ratio is not None and largest.ratio < 0.04


def test_the_json_check_wants_every_cluster_figure() -> None:
    data = sample_data()
    assert validate(_doc(data), ["cluster"]) == []
    for path in (("create", "many"), ("silent", "during", "create_records"), ("list_snapshots", "one")):
        broken = copy.deepcopy(data)
        parent = broken
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
        problems = validate(_doc(broken), ["cluster"])
        assert problems and all(".".join(path) in p for p in problems), problems


class _Pages:
    """ListVolumes over 2,500 entries in pages of 1,000."""

    def __init__(self) -> None:
        self.tokens: list[str] = []

    def ListVolumes(self, request: Any, timeout: float) -> Any:
        self.tokens.append(request.starting_token)
        start = int(request.starting_token or 0)
        entries = [csi_pb2.ListVolumesResponse.Entry(volume=csi_pb2.Volume(volume_id=f"n/{i}"))
                   for i in range(start, min(start + 1000, 2500))]
        nxt = str(start + 1000) if start + 1000 < 2500 else ""
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=nxt)


def test_page_through_follows_tokens_to_the_end_and_keeps_the_largest_message() -> None:
    stub = _Pages()
    out = cluster.page_through(stub, "ListVolumes", Progress(enabled=False), "t", os.getpid())
    assert stub.tokens == ["", "1000", "2000"]
    assert (out["pages"], out["entries"]) == (3, 2500)
    assert out["largest_bytes"] == stub.ListVolumes(csi_pb2.ListVolumesRequest(starting_token="1000"), 1).ByteSize()
    assert out["controller_rss_after_kib"] > 0


def test_memory_helpers_read_this_process() -> None:
    pid = os.getpid()
    assert clusteragents.rss_kib(pid) > 1000 and clusteragents.hwm_kib(pid) >= clusteragents.rss_kib(pid)
    assert 0 < clusteragents.pss_kib(pid) <= clusteragents.rss_kib(pid) * 2


def test_memory_records_keep_the_last_attempt() -> None:
    rec = clusteragents.MemoryRecords()
    assert rec.get("ns", "p") is None
    rec.put("ns", "p", "pvc-1", "node-000")
    rec.put("ns", "p", "pvc-1", "node-001")
    assert rec.get("ns", "p") == ("pvc-1", "node-001")


def test_cli_runs_cluster_alone_without_a_guest_and_not_in_all(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[cluster.ClusterConfig] = []

    def fake_run(cfg: cluster.ClusterConfig, progress: Progress) -> SuiteResult:
        seen.append(cfg)
        return SuiteResult("cluster", rows=cluster.rows(sample_data()), data=sample_data())

    def no_lab(*_: Any) -> Any:
        raise AssertionError("cluster must not open the lab")

    monkeypatch.setattr(cluster, "run", fake_run)
    monkeypatch.setattr("bench.labconn.open_lab", no_lab)
    assert cli.main(["cluster", "--quick", "--cluster-agents", "7", "--agents-per-process", "2", "-q"]) == 0
    assert seen == [cluster.ClusterConfig(agents=7, volumes=1000, per_process=2, samples=5)]
    assert "CreateVolume p50, 100 agents" in capsys.readouterr().out
    assert "cluster" not in SUITES + EXTRA_SUITES  # so `all` never runs it
    with pytest.raises(SystemExit):
        cli.main(["cluster", "--cluster-agents", "1"])
