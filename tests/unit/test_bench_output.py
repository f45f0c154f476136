import json
from pathlib import Path

from bench.results import Report, Row, SuiteResult
from bench.schema import validate
from bench.table import render


def _lat(p50: float, p95: float) -> dict[str, float]:
    return {"n": 5, "p50_ms": p50, "p95_ms": p95, "mean_ms": p50, "min_ms": p50, "max_ms": p95}


def _branch(csi: bool) -> SuiteResult:
    stats = {k: _lat(10.0, 12.0) for k in ("zfs_snapshot", "zfs_clone", "lzc_snapshot", "lzc_clone")}
    if csi:
        stats.update({k: _lat(11.0, 14.0) for k in ("csi_snapshot", "csi_clone_snapshot", "csi_clone_volume")})
    return SuiteResult(
        "branch",
        rows=[Row("CreateSnapshot p50", 11.0, "ms", 10.0, "zfs snapshot", "<= 1.2x", 100)],
        data={"sizes": [100], "csi": csi, "fill_seconds_total": 3.0,
              "per_size": [{"size": 100, "pool_objects": 100, "stats": stats}]},
    )


def test_row_ratio_and_table() -> None:
    suite = _branch(csi=True)
    suite.notes.append("a note")
    text = render(Report(quick=True, suites=[suite]))
    assert "== branch" in text
    assert "1.10x" in text  # 11 / 10
    assert "note: a note" in text
    assert Row("x", 5.0, "ms").ratio is None
    assert Row("x", 5.0, "ms", 0.0).ratio is None


def test_json_roundtrip_and_schema(tmp_path: Path) -> None:
    report = Report(quick=True, suites=[_branch(csi=True)])
    out = tmp_path / "r.json"
    report.write_json(out)
    doc = json.loads(out.read_text())
    assert doc["suites"]["branch"]["rows"][0]["ratio"] == 1.1
    assert validate(doc, ["branch"]) == []


def test_schema_reports_missing_and_insane_fields() -> None:
    doc = Report(quick=True, suites=[_branch(csi=True)]).as_dict()
    del doc["suites"]["branch"]["data"]["per_size"][0]["stats"]["csi_clone_volume"]
    doc["suites"]["branch"]["data"]["per_size"][0]["stats"]["zfs_clone"]["p50_ms"] = -1.0
    problems = validate(doc, ["branch", "datapath"])
    assert any("csi_clone_volume.p50_ms: missing" in p for p in problems)
    assert any("zfs_clone.p50_ms" in p and "not >" in p for p in problems)
    assert any(p.startswith("suites.datapath: missing") for p in problems)


def test_schema_requires_csi_fields_only_when_csi_was_reached() -> None:
    doc = Report(quick=True, suites=[_branch(csi=False)]).as_dict()
    assert validate(doc, ["branch"]) == []
    doc["suites"]["branch"]["data"]["csi"] = True
    assert validate(doc, ["branch"]) != []


def test_failed_suite_is_a_problem() -> None:
    report = Report(quick=True, suites=[SuiteResult("attach", error="RuntimeError: boom")])
    assert validate(report.as_dict(), ["attach"]) == ["suites.attach: failed: RuntimeError: boom"]
    assert "FAILED: RuntimeError: boom" in render(report)


def test_branch_size_summary_gives_each_csi_p50_with_its_bare_ratio() -> None:
    from bench.suites.branch import size_summary

    stats = {"zfs_snapshot": {"p50_ms": 200.0}, "zfs_clone": {"p50_ms": 300.0},
             "csi_snapshot": {"p50_ms": 220.0}, "csi_clone_snapshot": {"p50_ms": 600.0},
             "csi_clone_volume": {"p50_ms": 250.0}}
    line = size_summary(10000, stats)
    assert line.startswith("branch at 10,000 objects, p50: zfs snapshot 200 ms, zfs clone 300 ms")
    assert "CreateSnapshot 220 ms (1.10x)" in line
    assert "clone from snapshot 600 ms (2.00x)" in line
    assert "clone from volume 250 ms (0.50x)" in line  # against snapshot + clone
    bare_only = size_summary(100, {"zfs_snapshot": {"p50_ms": 1.0}, "zfs_clone": {"p50_ms": 2.0}})
    assert "CreateSnapshot" not in bare_only
