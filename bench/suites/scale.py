"""scale: restart-to-ready, RSS, ListVolumes and CreateVolume at the largest pool size, idle cost."""

from __future__ import annotations

from functools import partial
from typing import Any

import grpc

from bench.csiclient import timed
from bench.results import Row, SuiteResult
from bench.stats import summarize
from bench.suites.context import Context


def run(ctx: Context) -> SuiteResult:
    res = SuiteResult("scale")
    size = ctx.cfg.max_size
    ctx.fill_to(size)
    ctx.progress.say(f"scale: one zfs list -r of {ctx.pool} ({ctx.fill.objects:,} filler objects)")
    with ctx.progress.ticking("scale: zfs list -r"):
        listing = ctx.guest.call("zfs-list", {"dataset": ctx.pool}, timeout=7200)
    data: dict[str, Any] = {"lab": True, "size": size, "pool_objects": ctx.fill.objects, "zfs_list": listing}
    res.rows.append(Row("zfs list -r (whole pool)", listing["seconds"], "s", size=size))
    tag = f"s{ctx.run_id}"
    bare = ctx.guest.call("zfs-create", {"parent": f"{ctx.pool}/benchbranch", "tag": tag, "count": ctx.cfg.samples})
    if ctx.cfg.samples and "zfs_create" in bare["samples"]:
        data["bare_create"] = {k: summarize(v).as_dict() for k, v in bare["samples"].items()}
    ctx.save_partial(SuiteResult("scale", rows=list(res.rows), data=dict(data)))
    exported, node_id = _publish_fillers(ctx, data, res)
    try:
        _measure(ctx, data, res, listing)
    finally:
        for vid in exported:  # the pool (often a cached disk) keeps no bench exports
            assert ctx.csi is not None
            ctx.csi.unpublish(vid, node_id)
    if exported:
        ctx.progress.say(f"scale: unpublished the {len(exported)} filler volumes")
    if ctx.fill.steps and "agent" in ctx.fill.steps[-1]:
        data["rebuild"] = ctx.fill.steps[-1]["agent"]
        res.rows.append(Row("agent index rebuild from ZFS (slow path)", data["rebuild"]["rebuild_seconds"], "s",
                            listing["seconds"], "zfs list -r", size=size))
    res.notes.append(f"filler: {ctx.fill.objects:,} volumes+snapshots ({ctx.fill.snaps} per volume) with the agent's "
                     f"properties under {ctx.fill_parent}, indexed by the bench agent (parent "
                     f"{ctx.pool}/{ctx.cfg.fill_parent}); {len(exported)} of them published during the restart")
    res.data = data
    return res


def _publish_fillers(ctx: Context, data: dict[str, Any], res: SuiteResult) -> tuple[list[str], str]:
    """Export the first `published` filler volumes through CSI, as a busy node has a few hundred attached."""
    want = min(ctx.cfg.published, ctx.fill.volumes)
    if not want or ctx.csi is None or ctx.agent is None or ctx.agent.unavailable:
        return [], ""
    csi = ctx.csi
    node_id = csi.node_id()
    exported: list[str] = []
    times: list[float] = []
    try:
        for i in range(want):
            vid = f"{ctx.cfg.node}/f{i:07d}"
            times.append(timed(partial(csi.publish, vid, node_id))[1])
            exported.append(vid)
            if (i + 1) % 50 == 0 or i + 1 == want:
                ctx.progress.say(f"scale: published {i + 1}/{want} filler volumes")
    except grpc.RpcError:
        for vid in exported:
            csi.unpublish(vid, node_id)
        raise
    data["published"] = len(exported)
    data["publish_at_size"] = summarize(times).as_dict()
    res.rows.append(Row("ControllerPublish p50 (first export of an idle volume)", data["publish_at_size"]["p50_ms"],
                        "ms", size=ctx.cfg.max_size))
    return exported, node_id


def _measure(ctx: Context, data: dict[str, Any], res: SuiteResult, listing: dict[str, Any]) -> None:
    size = ctx.cfg.max_size
    idle = ctx.guest.call("idle-cost", {})
    data["idle"] = idle
    restart: dict[str, Any] = {}
    if ctx.agent is not None and ctx.agent.ensure():
        try:
            restart = ctx.agent.restart()
        except (grpc.RpcError, RuntimeError) as e:
            ctx.progress.say(f"scale: agent restart failed: {e}")
            res.notes.append(f"agent restart not measured: {e}")
    else:
        res.notes.append("agent not available: restart, RSS and idle-vs-exports not measured")
    if restart:
        data["restart"] = restart
        res.rows.append(Row("agent restart to ready", restart["seconds"], "s", listing["seconds"],
                            "zfs list -r", "<= 0.05x", size))
        res.rows.append(Row("  of which agent recovery (its own clock)", restart["agent_startup_seconds"], "s",
                            listing["seconds"], "zfs list -r", size=size))
        rss = ctx.guest.call("rss", {"match": ["-m", "agent.main"]})
        data["agent_rss"] = rss
        objects = max(1, restart["volumes"] + restart["snapshots"])
        data["agent_rss_bytes_per_object"] = rss["rss_kib"] * 1024 / objects
        res.rows.append(Row("agent RSS", rss["rss_kib"] / 1024, "MiB", size=size))
        # Whole-process RSS over objects: meaningful only at large N (the interpreter alone is ~40 MiB);
        # the per-volume target is checked on the marginal figure of --simulate.
        res.rows.append(Row("agent RSS / indexed objects (whole process)", rss["rss_kib"] * 1024 / objects, "B",
                            size=size))
        exports = restart["exports"]
        data["idle_devices"] = idle["zd_devices"] - exports
        data["idle_subsystems"] = idle["zvolt_subsystems"] - exports
        res.rows.append(Row("device nodes beyond active exports", data["idle_devices"], "", target="0", size=size))
        res.rows.append(Row("subsystems beyond active exports", data["idle_subsystems"], "", target="0", size=size))
    if ctx.csi is not None:
        csi = ctx.csi
        pages = [timed(partial(csi.list_volumes, 100))[1] for _ in range(ctx.cfg.samples)]
        data["list_volumes_page"] = summarize(pages).as_dict()
        res.rows.append(Row("ListVolumes page (100) p50", data["list_volumes_page"]["p50_ms"], "ms", size=size))
        creates: list[float] = []
        for i in range(ctx.cfg.samples):
            vol, dt = timed(partial(csi.create_volume, f"bench-{ctx.run_id}-scale-{i}"))
            creates.append(dt)
            csi.delete_volume(vol.volume_id)
        data["create_volume"] = summarize(creates).as_dict()
        base = data.get("bare_create", {}).get("zfs_create", {}).get("p50_ms")
        res.rows.append(Row("CreateVolume p50", data["create_volume"]["p50_ms"], "ms", base, "zfs create -s -V",
                            size=size))
    else:
        res.notes.append("CSI controller not reachable: ListVolumes/CreateVolume not measured")
