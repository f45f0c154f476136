from typing import Any

from bench.config import make_config
from bench.guest import Guest
from bench.progress import Progress
from bench.suites.context import FILL_CHUNK, Context


class RecordingGuest(Guest):
    """Answers `fill` like bench.inguest would for an empty pool, and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lab = type("L", (), {"pool": "tank"})()  # type: ignore[assignment]

    def call(self, command: str, args: dict[str, Any], *, netns: str | None = None, timeout: float = 600,
             module: str = "bench.inguest") -> Any:
        self.calls.append((command, args))
        if command == "fill":
            return {"created_volumes": args["count"], "created_snapshots": args["count"] * args["snaps"]}
        return {}


def _ctx() -> tuple[Context, RecordingGuest]:
    g = RecordingGuest()
    cfg = make_config(("branch",), True, (100,))
    return Context(cfg=cfg, guest=g, progress=Progress(enabled=False), run_id="abc"), g


def test_fill_grows_in_chunks_and_never_shrinks() -> None:
    ctx, g = _ctx()
    target = 2 * (FILL_CHUNK * 2 + 10)  # objects = volumes * 2 (one snapshot each)
    step = ctx.fill_to(target)
    fills = [a for c, a in g.calls if c == "fill"]
    assert [f["count"] for f in fills] == [FILL_CHUNK, FILL_CHUNK, 10]
    assert [f["start"] for f in fills] == [0, FILL_CHUNK, 2 * FILL_CHUNK]
    assert all(f["parent"] == "tank/benchfill/v" and f["agent_props"] for f in fills)
    assert ctx.agent is not None and ctx.agent.unavailable  # the fake lab has no agent: fill still works
    assert ctx.fill.objects == target
    assert step["created_volumes"] == FILL_CHUNK * 2 + 10
    g.calls.clear()
    assert ctx.fill_to(10)["created_volumes"] == 0
    assert g.calls == []
    ctx.fill_to(target + 3)  # odd object counts round up to whole volumes
    assert [a["count"] for c, a in g.calls if c == "fill"] == [2]
    assert ctx.fill.objects >= target + 3


def test_snaps_per_volume_sets_the_fill_mix() -> None:
    import dataclasses

    g = RecordingGuest()
    cfg = dataclasses.replace(make_config(("scale",), False, (10_000,)), snaps_per_volume=4)
    ctx = Context(cfg=cfg, guest=g, progress=Progress(enabled=False), run_id="abc")
    ctx.fill_to(10_000)  # 2,000 volumes x (1 + 4 snapshots)
    fills = [a for c, a in g.calls if c == "fill"]
    assert {f["snaps"] for f in fills} == {4} and sum(f["count"] for f in fills) == 2_000
    assert ctx.fill.objects == 10_000


class BranchGuest(RecordingGuest):
    """Also answers the bare branch timings the branch suite asks for."""

    def call(self, command: str, args: dict[str, Any], *, netns: str | None = None, timeout: float = 600,
             module: str = "bench.inguest") -> Any:
        out = super().call(command, args, netns=netns, timeout=timeout, module=module)
        if command == "zfs-branch":
            n = args["count"]
            return {"samples": {k: [0.01] * n for k in ("zfs_snapshot", "zfs_clone", "lzc_snapshot", "lzc_clone")}}
        return out


def test_the_branch_suite_saves_each_pool_size_as_soon_as_it_is_measured() -> None:
    from bench.results import SuiteResult
    from bench.suites import branch

    g = BranchGuest()
    ctx = Context(cfg=make_config(("branch",), True, (100, 1000)), guest=g, progress=Progress(enabled=False),
                  run_id="abc")
    saved: list[SuiteResult] = []
    ctx.checkpoint = saved.append
    branch.run(ctx)
    assert [[e["size"] for e in s.data["per_size"]] for s in saved] == [[100], [100, 1000]]
    assert [len(s.data["fill_steps"]) for s in saved] == [1, 2]
    assert saved[0].rows and all(r.size == 100 for r in saved[0].rows)


def test_the_runner_writes_a_running_suite_into_the_json(tmp_path: Any) -> None:
    import json

    from bench.results import Report, Row, SuiteResult
    from bench.runner import _write_with_partial

    out = tmp_path / "run.json"
    report = Report(quick=True, suites=[SuiteResult("branch", rows=[Row("x", 1.0, "ms")])])
    _write_with_partial(report, out, SuiteResult("scale", data={"zfs_list": {"seconds": 9.5}}))
    doc = json.loads(out.read_text())
    assert set(doc["suites"]) == {"branch", "scale"}
    assert doc["suites"]["scale"]["data"]["zfs_list"]["seconds"] == 9.5
    assert "partial" in doc["suites"]["scale"]["notes"][-1]
    assert [s.name for s in report.suites] == ["branch"]  # the finished report is not touched


def test_a_long_step_says_it_is_still_running() -> None:
    import io
    import time

    stream = io.StringIO()
    progress = Progress(stream=stream)
    with progress.ticking("agent index rebuild", every=0.05):
        time.sleep(0.18)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all("agent index rebuild: still running" in line for line in lines)
    time.sleep(0.12)
    assert stream.getvalue().splitlines() == lines  # the ticker stops with the step
