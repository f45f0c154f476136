"""attach: NodeStage/NodeUnstage through the node plugin vs the same kernel steps run bare."""

from __future__ import annotations

from functools import partial
from typing import Any

from bench.csiclient import timed
from bench.results import Row, SuiteResult
from bench.stats import summarize
from bench.suites.context import Context
from bench.suites.datapath import RawExport


def _csi_samples(ctx: Context) -> dict[str, list[float]]:
    """One fresh volume per sample, so every NodeStage pays connect + device + mkfs + mount."""
    assert ctx.csi is not None
    csi = ctx.csi
    out: dict[str, list[float]] = {"node_stage": [], "node_unstage": [], "publish": [], "unpublish": []}
    node_id = csi.node_id()
    for i in range(ctx.cfg.attach_samples):
        vol = csi.create_volume(f"bench-{ctx.run_id}-attach-{i}")
        vid = vol.volume_id
        path = f"/run/zvolt-bench/stage/{ctx.run_id}-{i}"
        published = staged = False
        try:
            ctx.guest.lab.run(["mkdir", "-p", path], netns="worker")
            pctx, dt = timed(partial(csi.publish, vid, node_id))
            published = True
            out["publish"].append(dt)
            _, dt = timed(partial(csi.stage, vid, pctx, path))
            staged = True
            out["node_stage"].append(dt)
            _, dt = timed(partial(csi.unstage, vid, path))
            staged = False
            out["node_unstage"].append(dt)
            _, dt = timed(partial(csi.unpublish, vid, node_id))
            published = False
            out["unpublish"].append(dt)
        finally:
            if staged:
                csi.unstage(vid, path)
            if published:
                csi.unpublish(vid, node_id)
            csi.delete_volume(vid)
            ctx.guest.lab.run(["rmdir", path], netns="worker", check=False)
        ctx.progress.say(f"attach: CSI sample {i + 1}/{ctx.cfg.attach_samples}")
    return out


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("attach")
    with RawExport(ctx, f"att{ctx.run_id}", 1 << 30) as ex:
        ctx.guest.call("disconnect", {"nqn": ex.nqn}, netns="worker")
        ctx.progress.say(f"attach: bare connect+mkfs+mount x{ctx.cfg.attach_samples}")
        bare = ctx.guest.call(
            "attach-bare", {**ex.target(), "count": ctx.cfg.attach_samples, "mountpoint": "/run/zvolt-bench/attach"},
            netns="worker", timeout=600,
        )
    stats: dict[str, Any] = {"bare_stage": summarize(bare["stage"]).as_dict(),
                             "bare_unstage": summarize(bare["unstage"]).as_dict()}
    if ctx.csi is not None and ctx.csi.node is not None:
        for k, v in _csi_samples(ctx).items():
            stats[k] = summarize(v).as_dict()
        for q in ("p50", "p95"):
            res.rows.append(Row(f"NodeStage {q}", stats["node_stage"][f"{q}_ms"], "ms", stats["bare_stage"][f"{q}_ms"],
                                "bare connect+mkfs+mount", "p50 <= 1000 ms" if q == "p50" else ""))
        for q in ("p50", "p95"):
            res.rows.append(Row(f"NodeUnstage {q}", stats["node_unstage"][f"{q}_ms"], "ms",
                                stats["bare_unstage"][f"{q}_ms"], "bare umount+disconnect"))
        res.rows.append(Row("ControllerPublish p50", stats["publish"]["p50_ms"], "ms"))
        res.rows.append(Row("ControllerUnpublish p50", stats["unpublish"]["p50_ms"], "ms"))
    else:
        res.notes.append("CSI node plugin not reachable: only the bare kernel steps measured")
        res.rows.append(Row("bare connect+mkfs+mount p50", stats["bare_stage"]["p50_ms"], "ms"))
        res.rows.append(Row("bare umount+disconnect p50", stats["bare_unstage"]["p50_ms"], "ms"))
    res.data = {"stats": stats, "samples": ctx.cfg.attach_samples, "csi": "node_stage" in stats}
    return res
